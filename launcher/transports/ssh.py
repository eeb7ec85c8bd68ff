"""Agents over SSH (paramiko): bare-metal clusters without Ray.

Honours ~/.ssh/config (HostName, User, Port, IdentityFile, ProxyJump chains,
ProxyCommand, UserKnownHostsFile, GlobalKnownHostsFile) and ssh-agent keys;
decides host-key trust as OpenSSH does (``knownhosts``): unknown keys are
refused unless told to accept *new* ones, and changed or revoked keys always. The agent's spec goes over the channel's stdin, never into the
remote command line.

Without a pty, closing the channel does not stop the remote command (sshd
only closes its pipes): the agent stops its ranks itself on stdin EOF and on
missed heartbeats. paramiko is imported when an SSH connection is made, not
when the command line is built (it costs ~90 ms, which a loopback job never
needs).
"""

from __future__ import annotations

import argparse
import getpass
import os
import shlex
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .. import argtypes
from ..host import Host
from . import knownhosts
from .base import AgentConnection, Transport, TransportError

if TYPE_CHECKING:
    import paramiko


def _trust_policy(known: knownhosts.KnownHosts, record_in: str, accept_new: bool, hostname: str, port: int, label: str, lock):
    """paramiko asks this about every key a host presents (the client pins none itself): OpenSSH's verdict."""
    import paramiko

    class Trust(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, name, key):
            verdict, where = known.verdict(name, key.get_name(), key.get_base64())
            files = ", ".join(known.files) or record_in
            if verdict == "trusted":
                return
            if verdict == "revoked":
                raise TransportError(f"{label}: the {key.get_name()} key {hostname} presents is REVOKED ({where}); do not connect")
            if verdict == "changed":
                raise TransportError(
                    f"{label}: HOST KEY CHANGED for {hostname}: it presents a {key.get_name()} key, known_hosts pins {where}; "
                    f"if the host was reinstalled, remove the old key ({knownhosts.forget_hint(hostname, port, record_in)}); "
                    f"otherwise do not connect"
                )
            if verdict == "certificate":
                raise TransportError(
                    f"{label}: {hostname} is trusted through an @cert-authority line ({where}), and launcher does not "
                    f"check host certificates; pin its own key ({knownhosts.keyscan_hint(hostname, port, record_in)})"
                )
            if not accept_new:
                raise TransportError(
                    f"{label}: host key of {hostname} is unknown (not in {files}); verify and add it "
                    f"({knownhosts.keyscan_hint(hostname, port, record_in)}) or pass --accept-new-host-keys"
                )
            with lock:
                knownhosts.record(record_in, name, key.get_name(), key.get_base64())
                known.entries.append(knownhosts.Entry((name,), key.get_name(), key.get_base64(), where=record_in))

    return Trust()


def parse_jump(spec: str, label: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` or ``[user@][v6]:port`` from a ProxyJump list."""
    user, _, rest = spec.rpartition("@")
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    elif rest.count(":") > 1:  # a bare IPv6 address, no port
        host, port_text = rest, ""
    else:
        host, _, port_text = rest.partition(":")
    try:
        port = int(port_text) if port_text else None
    except ValueError:
        raise TransportError(f"{label}: ProxyJump {spec!r}: {port_text!r} is not a port") from None
    if not host:
        raise TransportError(f"{label}: ProxyJump {spec!r} names no host")
    return user or None, host, port


class SSHConnection(AgentConnection):
    def __init__(self, host: Host, clients: list[paramiko.SSHClient], channel: paramiko.Channel):
        super().__init__(host)
        self.clients, self.channel = clients, channel
        # Writes go straight to the channel (sendall), not through a stdin file
        # object: its finaliser sends EOF when dropped, and flushes a buffer
        # left by a failed write into a closed channel at garbage collection.
        self.stdout = channel.makefile("rb")
        self.stderr = channel.makefile_stderr("rb")
        threading.Thread(target=self._collect_stderr, args=(self.stderr,), daemon=True).start()

    def send(self, data: bytes) -> None:
        import paramiko

        if self.channel.closed or self.channel.exit_status_ready():
            raise OSError("the SSH channel is closed")
        try:
            self.channel.sendall(data)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise OSError(f"the SSH channel is closed ({exc})") from None

    def readline(self) -> bytes:
        return self.stdout.readline()

    def bytes_waiting(self) -> bool:
        return self.channel.recv_ready()

    def close_stdin(self) -> None:
        import paramiko

        try:
            self.channel.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def terminate(self) -> None:
        for client in reversed(self.clients):
            client.close()

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while not self.channel.exit_status_ready():
            if self.channel.closed or time.monotonic() >= deadline:
                return None
            time.sleep(0.02)
        return self.channel.recv_exit_status()


class SSHTransport(Transport):
    name = "ssh"

    @classmethod
    def claims(cls, hosts: Sequence[Host], env: Mapping[str, str]) -> bool:
        return True  # any host sshd runs on

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("ssh")
        group.add_argument("--ssh-config", help="ssh client config (default: ~/.ssh/config if present)")
        group.add_argument("--known-hosts", help="known_hosts file to verify host keys (default: ~/.ssh/known_hosts)")
        group.add_argument(
            "--accept-new-host-keys",
            action="store_true",
            help="trust and record keys of hosts not in known_hosts (changed keys are always refused)",
        )
        group.add_argument("--identity", "-i", action="append", default=[], metavar="KEYFILE", help="private key to try (repeatable)")
        group.add_argument("--connect-timeout", type=argtypes.seconds, default=10.0, help="seconds to connect to each host (default 10)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str]) -> SSHTransport:
        return cls(
            config_path=args.ssh_config,
            known_hosts=args.known_hosts,
            accept_new_host_keys=args.accept_new_host_keys,
            identities=tuple(args.identity),
            connect_timeout=args.connect_timeout,
        )

    def __init__(
        self,
        config_path: str | None = None,
        known_hosts: str | None = None,
        accept_new_host_keys: bool = False,
        identities: tuple[str, ...] = (),
        connect_timeout: float = 10.0,
    ):
        import paramiko

        self.config = paramiko.SSHConfig()
        path = config_path or os.path.expanduser("~/.ssh/config")
        if config_path and not os.path.exists(config_path):
            raise TransportError(f"ssh config {config_path} does not exist; fix --ssh-config")
        if os.path.exists(path):
            self.config = paramiko.SSHConfig.from_path(path)
        self.known_hosts = known_hosts or os.path.expanduser("~/.ssh/known_hosts")
        if known_hosts and not os.path.exists(known_hosts):
            raise TransportError(f"known_hosts file {known_hosts} does not exist; fix --known-hosts")
        self.accept_new = accept_new_host_keys
        self.identities = tuple(identities)
        self.timeout = connect_timeout
        self._lock = threading.Lock()
        self._clients: list[paramiko.SSHClient] = []

    def start(self, host: Host) -> AgentConnection:
        import paramiko

        clients = self._connect_chain(host.name, host.user, host.port, label=host.label)
        command = shlex.join([host.python or sys.executable, "-m", "launcher.agent"])  # the head's path suits shared filesystems
        if host.cwd:
            command = f"cd -- {shlex.quote(host.cwd)} && exec {command}"
        try:
            channel = clients[-1].get_transport().open_session(timeout=self.timeout)
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            for c in clients:
                c.close()
            raise TransportError(f"{host.label}: cannot start the agent over SSH: {exc}") from None
        return SSHConnection(host, clients, channel)

    def _connect_chain(self, alias: str, user: str | None, port: int | None, label: str, depth: int = 0) -> list[paramiko.SSHClient]:
        """Connect to ``alias``: directly, through its ProxyJump hosts in order (``a,b``: a, then b), or its ProxyCommand."""
        import paramiko

        if depth > 5:
            raise TransportError(f"{label}: ProxyJump chain is longer than 5 hops (a loop?)")
        cfg = self.config.lookup(alias)
        hostname, port, user = self._endpoint(alias, user, port, cfg)
        chain: list[paramiko.SSHClient] = []
        sock = None
        jumps = [j.strip() for j in (cfg.get("proxyjump") or "").split(",") if j.strip() and j.strip().lower() != "none"]
        for i, jump in enumerate(jumps):
            jump_user, jump_host, jump_port = parse_jump(jump, label)
            if i == 0:
                chain = self._connect_chain(jump_host, jump_user, jump_port, label, depth + 1)
            else:
                jump_cfg = self.config.lookup(jump_host)
                j_hostname, j_port, j_user = self._endpoint(jump_host, jump_user, jump_port, jump_cfg)
                channel = self._open_channel(chain[-1], j_hostname, j_port, label)
                chain.append(self._client(j_hostname, j_port, j_user, jump_cfg, channel, label))
        if chain:
            sock = self._open_channel(chain[-1], hostname, port, label)
        elif (cfg.get("proxycommand") or "none").lower() != "none":
            sock = paramiko.ProxyCommand(cfg["proxycommand"])  # the user's own command from their ssh config, as ssh runs it
        return [*chain, self._client(hostname, port, user, cfg, sock, label)]

    @staticmethod
    def _endpoint(alias: str, user: str | None, port: int | None, cfg) -> tuple[str, int, str]:
        return cfg.get("hostname", alias), port or int(cfg.get("port", 22)), user or cfg.get("user") or getpass.getuser()

    def _open_channel(self, via: paramiko.SSHClient, hostname: str, port: int, label: str):
        import paramiko

        try:
            return via.get_transport().open_channel("direct-tcpip", (hostname, port), ("", 0), timeout=self.timeout)
        except (paramiko.SSHException, OSError) as exc:
            through = via.get_transport().getpeername()[0] if via.get_transport() else "?"
            raise TransportError(f"{label}: jump host {through} cannot reach {hostname}:{port}: {exc}") from None

    def _known_hosts(self, cfg) -> tuple[knownhosts.KnownHosts, str]:
        """The files that pin host keys for this host, and the one new keys are recorded in."""
        user_files = [self.known_hosts, *(os.path.expanduser(k) for k in cfg.get("userknownhostsfile", "").split())]
        global_files = [os.path.expanduser(k) for k in cfg.get("globalknownhostsfile", "").split()] or list(knownhosts.GLOBAL_FILES)
        return knownhosts.KnownHosts.load([*user_files, *global_files]), self.known_hosts

    def _client(self, hostname: str, port: int, user: str, cfg, sock, label: str) -> paramiko.SSHClient:
        import paramiko

        client = paramiko.SSHClient()  # with no keys of its own: every key goes through the trust policy below
        known, record_in = self._known_hosts(cfg)
        client.set_missing_host_key_policy(_trust_policy(known, record_in, self.accept_new, hostname, port, label, self._lock))
        keys = [*self.identities, *(os.path.expanduser(k) for k in cfg.get("identityfile", []))]
        where = f"{user}@{hostname}:{port}"
        try:
            client.connect(
                hostname,
                port=port,
                username=user,
                key_filename=[k for k in keys if os.path.exists(k)] or None,
                timeout=self.timeout,
                banner_timeout=self.timeout,
                auth_timeout=self.timeout,
                sock=sock,
                allow_agent=True,
                look_for_keys=not keys,
            )
        except TransportError:
            client.close()
            raise
        except paramiko.AuthenticationException:
            tried = ", ".join(keys) if keys else "ssh-agent and default keys"
            raise TransportError(
                f"{label}: authentication failed for {where} (tried {tried}); check --identity/IdentityFile and the host's authorized_keys"
            ) from None
        except paramiko.SSHException as exc:
            raise TransportError(f"{label}: SSH to {where} failed: {exc}") from None
        except TimeoutError:
            raise TransportError(
                f"{label}: connecting to {where} timed out after {self.timeout:g}s; is the host up and reachable?"
            ) from None
        except paramiko.ssh_exception.NoValidConnectionsError:
            raise TransportError(f"{label}: connection to {where} refused; is sshd running there?") from None
        except OSError as exc:
            raise TransportError(f"{label}: cannot reach {where}: {exc.strerror or exc}") from None
        with self._lock:
            self._clients.append(client)
        return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients:
                client.close()
            self._clients.clear()
