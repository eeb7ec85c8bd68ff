"""Agents as local subprocesses: loopback clusters and single-machine tests."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence

from .. import envpolicy, netif
from ..host import Host
from .base import AgentConnection, Capabilities, Transport, TransportError


class ProcessConnection(AgentConnection):
    """An agent behind a local process's pipes: the agent itself, or srun standing in for it."""

    def __init__(self, host: Host, popen: subprocess.Popen):
        super().__init__(host)
        self.popen = popen
        threading.Thread(target=self._collect_stderr, args=(popen.stderr,), daemon=True).start()

    def send(self, data: bytes) -> None:
        self.popen.stdin.write(data)
        self.popen.stdin.flush()

    def readline(self) -> bytes:
        return self.popen.stdout.readline()

    def close_stdin(self) -> None:
        try:
            self.popen.stdin.close()
        except OSError:
            pass

    def terminate(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGKILL):
            if self.popen.poll() is not None:
                return
            self.popen.send_signal(signum)
            try:
                self.popen.wait(2.0)
            except subprocess.TimeoutExpired:
                continue

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def bytes_waiting(self) -> bool:
        try:
            return bool(select.select([self.popen.stdout], [], [], 0)[0])
        except (OSError, ValueError):
            return False


class LocalTransport(Transport):
    """Runs each host's agent as a subprocess of the head (in its own session,
    so a terminal's Ctrl-C reaches only the head, which stops things in order).

    When the head is still single-threaded, the agents are forked from it
    (``prepare``): the agent's code is already loaded here, and an
    interpreter start was most of a loopback job's fixed cost.
    """

    name = "local"
    capabilities = Capabilities(terminate_kills_agent=True)  # the agent is our child: terminate signals it

    def __init__(self):
        self._forked: dict[str, list] = {}  # host label -> agents forked by prepare, not yet handed out

    @classmethod
    def claims(cls, hosts: Sequence[Host], env: Mapping[str, str]) -> bool:
        """Loopback hosts that name no SSH user or port (those ask for SSH, even to this machine)."""
        return all(h.is_loopback and h.user is None and h.port is None for h in hosts)

    def start(self, host: Host) -> AgentConnection:
        if host.user is not None or host.port is not None:
            raise TransportError(
                f"{host.label}: user@ and port= need SSH, and the local transport runs agents as this user; "
                f"use --transport ssh (or auto), or drop them"
            )
        if self._forked.get(host.label):
            return ProcessConnection(host, self._forked[host.label].pop())
        python = host.python or sys.executable
        try:
            popen = subprocess.Popen(
                [python, "-m", "launcher.agent"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=envpolicy.login_environment(os.environ),  # the rest of the head's reaches ranks by the allowlist
                cwd=host.cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise TransportError(
                f"{host.label}: cannot start the agent with {python!r}: {exc.strerror or exc}; check python=/cwd= for this host"
            ) from None
        return ProcessConnection(host, popen)

    def prepare(self, hosts: Sequence[Host]) -> None:
        """Fork the agents of hosts that run this interpreter in this directory, while that is safe."""
        simple = [h for h in hosts if h.python in (None, sys.executable) and h.cwd is None and h.user is None and h.port is None]
        if not simple:
            return
        from .. import forked

        argv, env = [sys.executable, "-m", "launcher.agent"], envpolicy.login_environment(os.environ)
        if not forked.single_threaded() or not forked.supported() or _secrets_dropped(os.environ, env):
            return
        from .. import agent

        for host in simple:
            try:
                self._forked.setdefault(host.label, []).append(forked.spawn(agent.main, argv, env, stdin_pipe=True))
            except OSError:
                return  # start() starts the rest as subprocesses

    def reached_address(self, host: Host) -> str | None:
        literal = netif.address_literal(host.name)
        if literal is not None:
            return literal
        return "127.0.0.1" if host.is_loopback else netif.resolve(host.name)


def _secrets_dropped(head_env, agent_env) -> list[str]:
    """Secret-looking variables of the head that neither the agent's login set nor the default allowlist keeps.

    A forked agent's memory is a copy of the head's, this environment included (not in /proc/PID/environ,
    which is rewritten, but in /proc/PID/mem and a core dump), and so is every rank it forks: with such a
    variable about, the agent is exec'd with the login set only, and nothing the allowlist drops is in
    any process of the job. A value that is the path of an existing file (SSL_CERT_FILE) names a secret at
    most, and is not one: it does not make the agent exec'd."""
    policy = envpolicy.EnvPolicy()
    return [
        k
        for k, v in head_env.items()
        if envpolicy.is_secret(k) and k not in agent_env and policy.allow_rule(k) is None and not _existing_path(v)
    ]


def _existing_path(value: str) -> bool:
    return value.startswith("/") and os.path.exists(value)
