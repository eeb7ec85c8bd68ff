"""Agents that someone else starts and that dial in to the head: Kubernetes, PBS, systemd, a person.

``--transport join --join-listen ADDR:PORT``: the head listens; on each host,
whatever starts processes there runs ``python -m launcher.agent --join
ADDR:PORT --host NAME`` with the job's token in ``LAUNCHER_JOIN_TOKEN`` (both
sides read it from their environment: it is never printed and never in
argv). The head sends a nonce, the agent answers with an HMAC of it under
the token (``protocol.join_proof``), and from then on the connection is that
agent's stdin and stdout, as an SSH channel would be. So a backend for a
system that starts processes its own way is this module's ``start``.

What it cannot do (``capabilities``): start a fresh agent for a sweep, since
only the other system can start one. The connection is plain TCP: use it on
a network you trust (a pod network, a private VLAN), since the spec it
carries holds every rank's environment.
"""

from __future__ import annotations

import argparse
import os
import queue
import select
import socket
import threading
from collections.abc import Mapping, Sequence

from .. import protocol
from ..host import Host
from ..netif import host_port, url_host
from .base import AgentConnection, Capabilities, Transport, TransportError

TOKEN_VAR = "LAUNCHER_JOIN_TOKEN"
MIN_TOKEN = 16  # characters: a token a person could guess is no proof
HANDSHAKE_SECONDS = 5.0  # for a peer to answer the challenge: a silent one holds nothing longer
MAX_LINE = 4096  # a Join line is ~120 bytes; a peer that sends more is not an agent
MAX_PENDING = 64  # handshakes at once: a flood of connections holds threads up to this


class JoinConnection(AgentConnection):
    """An agent behind the TCP connection it opened to the head."""

    def __init__(self, host: Host, sock: socket.socket):
        super().__init__(host)
        self._stderr_done.set()  # its stderr stays on its host
        self.sock = sock
        self.peer = sock.getpeername()[0]
        self._file = sock.makefile("rb")
        self._send_lock = threading.Lock()
        self._ended = threading.Event()

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def readline(self) -> bytes:
        try:
            line = self._file.readline()
        except (OSError, ValueError):
            line = b""
        if not line:
            self._ended.set()
        return line

    def close_stdin(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)  # the agent reads EOF: it stops its ranks and leaves
        except OSError:
            pass

    def terminate(self) -> None:
        """Cut the connection: the agent reads EOF and tears down; nothing here can signal it."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._ended.set()

    def wait(self, timeout: float) -> int | None:
        return 0 if self._ended.wait(timeout) else None

    def bytes_waiting(self) -> bool:
        try:
            return bool(select.select([self.sock], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        self._file.close()
        self.sock.close()


class JoinTransport(Transport):
    name = "join"
    capabilities = Capabilities(sweeps=False)

    def __init__(self, listen: str, token: str | None = None, timeout: float = 120.0):
        token = os.environ.get(TOKEN_VAR) if token is None else token
        if not token or len(token) < MIN_TOKEN:
            raise TransportError(
                f"--transport join needs {TOKEN_VAR} (at least {MIN_TOKEN} characters) here and on every host, the proof an agent "
                f"gives when it joins: export {TOKEN_VAR}=$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
            )
        where = host_port(listen)
        if where is None:
            raise TransportError(
                f"--join-listen {listen!r}: give ADDRESS:PORT, an address of this machine the hosts reach, such as 10.0.0.1:29500"
            )
        self.address, self.port = where
        self._token, self.timeout = token, timeout
        try:
            self._listener = socket.create_server((self.address, self.port), family=_family(self.address), backlog=256)
        except OSError as exc:
            raise TransportError(
                f"--join-listen {listen}: cannot listen there ({exc.strerror or exc}); give an address of this machine and a free port"
            ) from None
        self.port = self._listener.getsockname()[1]
        self.where = f"{url_host(self.address)}:{self.port}"
        self._announced = False
        self._waiting: dict[str, queue.Queue] = {}
        self._joined: dict[str, JoinConnection] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_PENDING)
        self._closed = threading.Event()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("join (agents started by another system dial in)")
        group.add_argument("--join-listen", metavar="ADDR:PORT", help="where the head listens for agents to join (--transport join)")
        group.add_argument(
            "--join-timeout", type=float, default=120.0, metavar="SECONDS", help="how long the head waits for each host's agent to join"
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str]) -> JoinTransport:
        if not args.join_listen:
            raise TransportError("--transport join needs --join-listen ADDR:PORT: an address of this machine that every host reaches")
        return cls(args.join_listen, env.get(TOKEN_VAR, ""), timeout=args.join_timeout)

    # --- the head's side -------------------------------------------------------------------------

    def prepare(self, hosts: Sequence[Host]) -> None:
        for host in hosts:
            self._waiting.setdefault(host.name, queue.Queue(maxsize=1))
        threading.Thread(target=self._accept, daemon=True, name="join-accept").start()

    def start(self, host: Host) -> JoinConnection:
        waiting = self._waiting.get(host.name)
        if waiting is None:
            raise TransportError(f"{host.label}: not among the hosts the join backend was prepared for; call prepare(hosts) first")
        with self._lock:
            first, self._announced = not self._announced, True
        if first:
            self.say(
                f"join: listening on {self.where} for {len(self._waiting)} agents; on each host run, with this job's {TOKEN_VAR}: "
                f"python -m launcher.agent --join {self.where} --host NAME"
            )
        try:
            conn = waiting.get(timeout=self.timeout)
        except queue.Empty:
            raise TransportError(
                f"{host.label}: no agent joined within {self.timeout:g}s; on that host run "
                f"'python -m launcher.agent --join {self.where} --host {host.name}' with this job's {TOKEN_VAR}"
            ) from None
        return conn

    def reached_address(self, host: Host) -> str | None:
        conn = self._joined.get(host.name)
        return conn.peer if conn is not None else None

    def close(self) -> None:
        self._closed.set()
        try:
            self._listener.close()
        except OSError:
            pass
        for conn in list(self._joined.values()):
            if conn is not None:
                conn.close()

    # --- one connection's handshake -----------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                sock, peer = self._listener.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                sock.close()  # a flood: the agents retry their connect
                continue
            threading.Thread(target=self._handshake, args=(sock, peer), daemon=True, name="join-handshake").start()

    def _handshake(self, sock: socket.socket, peer) -> None:
        who = f"{peer[0]}:{peer[1]}"
        try:
            sock.settimeout(HANDSHAKE_SECONDS)
            nonce = os.urandom(16).hex()
            sock.sendall(protocol.encode(protocol.Challenge(nonce=nonce)))
            line = _read_line(sock)
            try:
                join = protocol.decode(line)
            except protocol.ProtocolError:
                join = None
            problem = self._refusal(join, nonce)
            if problem is not None:
                self.say(f"join: refused {who}: {problem}")
                sock.sendall(protocol.encode(protocol.AgentError(message=f"the head refused this join: {problem}")))
                sock.close()
                return
            sock.settimeout(None)
            conn = JoinConnection(Host(join.host), sock)
            with self._lock:
                self._joined[join.host] = conn
            self._waiting[join.host].put_nowait(conn)
        except OSError:
            sock.close()  # a peer that went or said nothing in time: nothing was promised to it
        finally:
            self._slots.release()

    def _refusal(self, join, nonce: str) -> str | None:
        """Why this join is refused, or None."""
        if not isinstance(join, protocol.Join):
            return "it is not a launcher agent (no join message)"
        if join.host not in self._waiting:
            return f"host {join.host[:64]!r} is not in this job ({', '.join(sorted(self._waiting)[:8])})"
        expected = protocol.join_proof(self._token, nonce, join.host)
        import hmac  # here: a job that joins nothing never loads it

        if not hmac.compare_digest(join.proof.encode(), expected.encode()):
            return f"a wrong token for {join.host} (give the agent this job's {TOKEN_VAR})"
        with self._lock:
            if join.host in self._joined:
                return f"{join.host} has joined already, from {self._joined[join.host].peer}"
            self._joined[join.host] = None  # claimed: a second join racing this one is refused
        return None


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(MAX_LINE - len(data))
        if not chunk or len(data) + len(chunk) >= MAX_LINE:
            raise OSError("no line")
        data += chunk
    return data


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET
