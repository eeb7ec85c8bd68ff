"""One host's link to its agent: start it, write to it, turn what comes back into typed events.

A ``HostLink`` owns its threads: one that starts the agent and then reads its
stdout, one that writes (a write to a partitioned host blocks, since the SSH
window never reopens, and must not stall anyone else), and the sweep after a
lost agent. Everything it learns goes on the supervisor's queue as
``(host index, event)``: the agent's protocol messages, or a ``job`` link
event. Any exception in its threads becomes that host's ``LinkFailed``:
nothing a host does can kill the head's view of it silently.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from .. import protocol
from ..plan import HostPlan
from ..transports import AgentConnection, Transport, TransportError
from . import job

_CLOSE = object()  # outbox sentinel: close the agent's stdin after what is queued


class HostLink:
    def __init__(self, index: int, plan: HostPlan, transport: Transport, events: queue.Queue):
        self.index, self.plan, self.transport, self.events = index, plan, transport, events
        self.conn: AgentConnection | None = None
        self.outbox: queue.Queue = queue.Queue()
        self.threads: list[threading.Thread] = []
        self.sweeper: threading.Thread | None = None
        self.last_heard = time.monotonic()  # when the reader last got a line from the agent (any line: evidence of life)
        self.released = threading.Event()  # the supervisor reads no more: events are dropped, threads end

    @property
    def name(self) -> str:
        return self.plan.host.name

    def heard_since(self, moment: float) -> bool:
        """Whether the agent spoke after ``moment``: a line read, or bytes waiting to be read."""
        return self.last_heard > moment or (self.conn is not None and self.conn.bytes_waiting())

    def _put(self, event) -> None:
        """Onto the supervisor's bounded queue: a full queue holds this reader back (and, through the
        connection, the agent's output), rather than letting a flood grow the head."""
        while not self.released.is_set():
            try:
                self.events.put((self.index, event), timeout=0.5)
                return
            except queue.Full:
                continue

    # --- start and read --------------------------------------------------------------------

    def start(self, spec_for: Callable[[], protocol.AgentSpec | None]) -> None:
        """Start the agent in the background; ``spec_for`` gives its spec when it may be sent (None: never)."""
        self._spawn(self._run, spec_for, name=f"agent-{self.name}")

    def _run(self, spec_for) -> None:
        host = self.plan.host
        try:
            self.conn = self.transport.start(host)
            self._put(job.LinkOpened())
            spec = spec_for()
            if spec is None:  # the job ended before this host's spec could go
                self.conn.close_stdin()
                self.conn.wait(2.0)
                self._put(job.LinkAbandoned())
                return
            # Written before the writer thread starts: the agent needs its spec as
            # the first line, and a Stop may already be queued by then.
            self.conn.send(protocol.encode(spec))
            self._spawn(self._write, name=f"to-{self.name}")
            self._read()
        except TransportError as exc:
            self._put(job.LinkFailed(str(exc)))
        except OSError as exc:
            self._put(job.LinkFailed(f"{host.label}: the agent closed its input at start ({exc})"))
        except Exception as exc:
            self._put(job.LinkFailed(f"{host.label}: the head failed talking to its agent ({type(exc).__name__}: {exc})"))
            self.terminate()

    def _read(self) -> None:
        while True:
            try:
                raw = self.conn.readline()
            except OSError:
                raw = b""
            if not raw:
                break
            self.last_heard = time.monotonic()
            try:
                self._put(protocol.decode(raw))
            except protocol.ProtocolError:
                self._put(job.Noise(raw.decode("utf-8", "replace").rstrip()))
        self._put(job.LinkClosed(tuple(self.conn.stderr_tail(wait=0.5)), self.conn.stop_reason()))

    # --- write -------------------------------------------------------------------------------

    def send(self, message) -> None:
        self.outbox.put(protocol.encode(message))

    def close(self) -> None:
        """EOF on the agent's stdin after what is queued: its last word."""
        self.outbox.put(_CLOSE)

    def _write(self) -> None:
        while True:
            item = self.outbox.get()
            try:
                if item is _CLOSE:
                    self.conn.close_stdin()
                    return
                self.conn.send(item)
            except (OSError, ValueError, EOFError):
                return  # the reader reports the loss

    # --- end -------------------------------------------------------------------------------------

    def finish(self, gone: bool) -> bool:
        """After ``close``: wait for the agent's exit (not for a host already given up on), else terminate it.

        True when that killed the agent (a stalled one, say) without its own teardown: what its ranks
        started in sessions of their own is still running, and the host wants a sweep."""
        if self.conn is not None and self.conn.wait(0 if gone else 2.0) is None:
            self.terminate()
            return self.transport.capabilities.terminate_kills_agent
        return False

    def terminate(self) -> None:
        if self.conn is not None:
            try:
                self.conn.terminate()
            except Exception:
                pass

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)

    def sweep(self, job_id: str, report: Callable[[str], None]) -> None:
        """In the background: a fresh agent connection kills what this job left on the host. Once per host: the
        job's loss of the agent and the stop's kill of it both ask, and a second sweep, finding nothing left, could
        end before the first had said what it killed (the head waits for ``sweeper`` alone)."""
        if self.sweeper is not None:
            return

        def run() -> None:
            try:
                conn = self.transport.start(self.plan.host)
                conn.send(protocol.encode(protocol.Sweep(job_id=job_id)))
                conn.close_stdin()
                for raw in iter(conn.readline, b""):
                    message = protocol.decode(raw)
                    if isinstance(message, protocol.Swept):
                        if message.pids:
                            pids = " ".join(map(str, message.pids))
                            report(f"swept {len(message.pids)} processes this job left on {self.name} (pids {pids})")
                        break
                conn.wait(2.0)
            except (TransportError, OSError, protocol.ProtocolError) as exc:
                report(f"could not sweep {self.name} after losing its agent: {exc}")

        self.sweeper = self._spawn(run, name=f"sweep-{self.name}")

    def _spawn(self, target, *args, name: str) -> threading.Thread:
        t = threading.Thread(target=target, args=args, daemon=True, name=name)
        t.start()
        if not name.startswith("sweep-"):
            self.threads.append(t)
        return t
