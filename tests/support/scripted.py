"""An in-memory transport whose agents are scripts: the head's side tested without processes or sockets.

Modelled on httpx's ``MockTransport``: the test hands ``ScriptedTransport`` a
function ``script(agent)``; every ``start(host)`` runs it in a thread against
a ``ScriptedAgent``, which reads what the head sent (``receive``) and answers
in protocol lines (``say``), raw bytes (``say_raw``) or silence. The head's
code under test (``HostLink``, ``Supervisor``) is the real one.
"""

from __future__ import annotations

import queue
import socket
import threading
import time

from launcher import protocol
from launcher.host import Host
from launcher.transports import AgentConnection, Capabilities, Transport, TransportError
from launcher.version import __version__

_EOF = object()


class ScriptedAgent(AgentConnection):
    """One started agent: the head's ends (``send``, ``readline``, ...) and the script's (``receive``, ``say``)."""

    def __init__(self, host: Host):
        super().__init__(host)
        self._stderr_done.set()
        self._to_agent: queue.Queue = queue.Queue()
        self._to_head: queue.Queue = queue.Queue()
        self.sent: list = []  # every message the head sent, decoded, in order
        self.stdin_closed = threading.Event()
        self.terminated = threading.Event()
        self.ended = threading.Event()
        self.returncode = 0

    # --- the head's side (AgentConnection) ----------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.stdin_closed.is_set() or self.ended.is_set():
            raise BrokenPipeError(f"{self.host.name}: the agent's input is closed")
        message = protocol.decode(data)
        self.sent.append(message)
        self._to_agent.put(message)

    def readline(self) -> bytes:
        item = self._to_head.get()
        if item is _EOF:
            self._to_head.put(_EOF)  # every later read sees the end too
            return b""
        return item

    def close_stdin(self) -> None:
        self.stdin_closed.set()
        self._to_agent.put(_EOF)

    def terminate(self) -> None:
        self.terminated.set()
        self.end(-15)

    def wait(self, timeout: float) -> int | None:
        return self.returncode if self.ended.wait(timeout) else None

    # --- the script's side ----------------------------------------------------------------------

    def receive(self, timeout: float = 5.0):
        """The next message from the head; None at EOF; raises queue.Empty after ``timeout``."""
        item = self._to_agent.get(timeout=timeout)
        return None if item is _EOF else item

    def receive_until(self, kind: type, timeout: float = 5.0):
        """Skip what is not a ``kind`` (heartbeats, say); None at EOF."""
        while True:
            message = self.receive(timeout)
            if message is None or isinstance(message, kind):
                return message

    def hang(self, seconds: float = 30.0) -> None:
        """Say nothing and read nothing (a partitioned host, a stopped process) until the head terminates it."""
        self.terminated.wait(seconds)

    def say(self, message) -> None:
        self._to_head.put(protocol.encode(message))

    def say_raw(self, data: bytes) -> None:
        self._to_head.put(data)

    def end(self, returncode: int = 0) -> None:
        """The agent exits: its output ends."""
        if not self.ended.is_set():
            self.returncode = returncode
            self.ended.set()
            self._to_head.put(_EOF)


class ScriptedTransport(Transport):
    """Each ``start`` runs ``script(agent)`` in a thread, and the agent exits when its script returns;
    ``refuse`` names hosts whose start fails; ``kills_agent``: whether ``terminate`` kills the agent itself."""

    name = "scripted"

    def __init__(self, script, refuse: frozenset[str] = frozenset(), kills_agent: bool = False):
        self.script, self.refuse = script, refuse
        self.started: list[ScriptedAgent] = []
        self.lock = threading.Lock()
        self.capabilities = Capabilities(terminate_kills_agent=kills_agent)

    def start(self, host: Host) -> ScriptedAgent:
        if host.name in self.refuse:
            raise TransportError(f"{host.name}: connection refused (scripted); check that sshd runs there")
        agent = ScriptedAgent(host)
        with self.lock:
            self.started.append(agent)
        threading.Thread(target=self._run, args=(agent,), daemon=True, name=f"script-{host.name}").start()
        return agent

    def _run(self, agent: ScriptedAgent) -> None:
        try:
            self.script(agent)
        except queue.Empty:
            pass  # the script waited for something that never came: the test's assertions say what
        agent.end(agent.returncode)

    def agents(self, host: str) -> list[ScriptedAgent]:
        """Every agent started on ``host``, in order (a sweep is a second one)."""
        with self.lock:
            return [a for a in self.started if a.host.name == host]


def hello(spec: protocol.AgentSpec, address: str) -> protocol.Hello:
    """The agent's first word, as a real agent of this version says it."""
    return protocol.Hello(hostname=spec.host, pid=100 + spec.host_index, python="python3", version=__version__, address=address)


def serve_ranks(agent: ScriptedAgent) -> protocol.AgentSpec | None:
    """A well-behaved agent: hello, every rank started and ready, heartbeats, exits on Stop (or EOF). Returns its spec.

    Host N answers from 127.0.0.(N+1) and each rank's port is a real listening socket there, so the
    head's reachability probe (a TCP connect) meets a listener on loopback, as it would meet the rank."""
    spec = agent.receive()
    if spec is None:
        return None
    address = f"127.0.0.{spec.host_index + 1}"
    listeners = []
    agent.say(hello(spec, address))
    for i, rank in enumerate(spec.ranks):
        listener = socket.create_server((address, 0))
        listeners.append(listener)
        pid = 1000 * (spec.host_index + 1) + i
        port = listener.getsockname()[1]
        agent.say(protocol.Started(rank=rank.identity.rank, pid=pid))
        agent.say(protocol.Ready(rank=rank.identity.rank, address=address, port=port, pid=pid, rule="scripted", engine_id="e"))
    try:
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            try:
                message = agent.receive(timeout=spec.heartbeat_interval)
            except queue.Empty:
                agent.say(protocol.Heartbeat())  # on its own clock, as a real agent's
                continue
            if message is None:
                break
            if isinstance(message, protocol.Stop):
                for rank in spec.ranks:
                    agent.say(protocol.Exited(rank=rank.identity.rank, returncode=-15))
                break
    finally:
        for listener in listeners:
            listener.close()
    return spec
