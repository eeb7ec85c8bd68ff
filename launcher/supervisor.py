"""Head side: start agents, gather events, fail fast, tear down.

One ``Supervisor`` runs one ``LaunchPlan`` through one ``Transport``. Reader
threads turn each agent's stdout into events on a queue; the caller's thread
pumps that queue, so state changes in one place. Any rank exiting, any agent
lost, or a deadline passing ends the job; ``stop`` then takes every rank on
every host down and returns a ``LaunchResult``.
"""

from __future__ import annotations

import collections
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from . import protocol
from .version import __version__
from . import check as checking
from .check import CheckMatrix, CheckOptions
from .plan import HostPlan, LaunchPlan, RankSpec
from .probe import ProbeError, tcp_connect
from .results import EXIT_CHECK_FAILED, EXIT_HOST_LOST, EXIT_NOT_READY, Failure, LaunchResult, RankResult
from .transports import AgentConnection, Transport, TransportError

@dataclass
class RankState:
    spec: RankSpec
    state: str = "pending"  # pending -> started -> ready -> exited
    pid: int | None = None
    address: str | None = None
    port: int | None = None
    rule: str | None = None
    vllm_version: str = ""
    exit_code: int | None = None
    error: str | None = None
    started_at: float | None = None
    ready_at: float | None = None
    ended_at: float | None = None
    output: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))


class Reporter:
    """What the supervisor tells a person; the default tells nobody."""

    def progress(self, text: str) -> None: ...

    def output(self, rank: RankState, stream: str, line: str) -> None: ...

    def ready(self, ranks: list[RankState]) -> None: ...

    def checked(self, matrix: CheckMatrix) -> None: ...


_CLOSE = object()  # outbox sentinel: close the agent's stdin after what is queued


@dataclass
class _HostLink:
    plan: HostPlan
    conn: AgentConnection | None = None
    hello: protocol.Hello | None = None
    gone: bool = False  # its agent ended, or it was declared lost
    abandoned: bool = False  # the job ended before its spec was sent
    last_seen: float = field(default_factory=time.monotonic)
    # Writes go through a thread of their own: a write to a partitioned host
    # blocks (the SSH window never reopens), and must not stall the pump.
    outbox: queue.Queue = field(default_factory=queue.Queue)


def _start_fix(host, said: list[str]) -> str:
    """What to do about an agent that died before saying hello, from what it printed."""
    text = " ".join(said[-3:])
    if host.cwd and ("cd:" in text or "chdir" in text):
        return "fix cwd= for this host in the hostfile (the directory must exist there)"
    if "No module named" in text:
        return "install launcher there (same version) or set python= for this host in the hostfile"
    return "check that python= for this host (default: the head's own interpreter path) runs there with launcher installed"


class Supervisor:
    def __init__(
        self, plan: LaunchPlan, transport: Transport, reporter: Reporter | None = None,
        stop: threading.Event | None = None, hurry: threading.Event | None = None,
    ):
        self.plan, self.transport = plan, transport
        self.stop_requested = stop or threading.Event()  # set from anywhere (a signal handler) to end any phase
        self.hurry = hurry or threading.Event()  # set while stopping: SIGKILL now instead of waiting out the grace
        self.reporter = reporter or Reporter()
        self.ranks = {r.rank: RankState(r) for r in plan.ranks}
        self.links = [_HostLink(h) for h in plan.hosts]
        self.failure: Failure | None = None
        self.matrix: CheckMatrix | None = None
        self._events: queue.Queue = queue.Queue()
        self._t0 = time.monotonic()
        self._stopping = False
        self._readers: list[tuple[_HostLink, threading.Thread]] = []
        self.head_ip: str | None = None
        self._sweepers: list[threading.Thread] = []
        self._head_ip_known = threading.Event()  # {head_ip}: the first host's address, from its agent

    # --- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """Start every host's agent in parallel (returns at once)."""
        self._t0 = time.monotonic()
        processes = "" if len(self.ranks) == self.plan.world_size else f" in {len(self.ranks)} processes"
        self.reporter.progress(f"starting {self.plan.world_size} ranks{processes} on {len(self.links)} hosts ({self.transport.name})")
        for link in self.links:
            t = threading.Thread(target=self._run_link, args=(link,), daemon=True, name=f"agent-{link.plan.host.name}")
            t.start()
            self._readers.append((link, t))

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Pump events until every rank is ready and reachable, or the job failed."""
        timeout = self.plan.options.ready_timeout if timeout is None else timeout
        deadline = self._t0 + timeout
        self._pump(lambda: all(r.state == "ready" for r in self.ranks.values()), deadline)
        if self.stop_requested.is_set():
            return False
        if self.failure is None and not all(r.state == "ready" for r in self.ranks.values()):
            self._fail_not_ready(timeout)
        if self.failure is None:
            self._verify_addresses()
        if self.failure is None:
            self.reporter.ready(list(self.ranks.values()))
        return self.failure is None

    def check(self, options: CheckOptions = CheckOptions()) -> CheckMatrix:
        """All-pairs probe from every rank's address to every rank (handshakes where the wire is known)."""
        ranks = sorted(self.ranks.values(), key=lambda r: r.spec.rank)
        hosts = {r.spec.rank: r.spec.host for r in ranks}
        targets = [
            checking.Target(r.spec.rank, r.spec.host, r.address, r.spec.ports, r.spec.engine_id, r.vllm_version) for r in ranks
        ]
        peers, notes = checking.plan_probes(targets, options, builtin=self.plan.builtin, job_id=self.plan.job_id)
        self.matrix = CheckMatrix(tuple(hosts), {p.rank: p.wire for p in peers}, hosts)
        for note in notes:
            self.reporter.progress(note)
        kinds = sorted({p.wire for p in peers})
        how = ", ".join("TCP connects" if k == "tcp" else f"handshakes, {k} wire" for k in kinds)
        self.reporter.progress(f"checking all {len(ranks) ** 2} pairs ({how})")
        for link in self.links:
            self._send(link, protocol.Check(peers=peers, timeout=options.timeout))
        # Agents probe concurrently; a failing probe costs at most one timeout per port.
        most_ports = max(len(r.spec.ports) for r in ranks)
        deadline = time.monotonic() + options.timeout * (most_ports + 1) + 5
        self._pump(lambda: self.matrix.complete, deadline)
        if self.failure is None and not self.stop_requested.is_set():
            bad = self.matrix.failures
            problems = self.matrix.problems
            if bad:
                first = bad[0]
                self.failure = Failure(
                    "check", f"{len(bad)} of {len(ranks) ** 2} pairs failed the check; first: r{first.rank} ({hosts[first.rank]}) -> "
                    f"r{first.peer} ({hosts[first.peer]}): {first.error}", EXIT_CHECK_FAILED,
                )
            elif problems:
                self.failure = Failure("check", problems[0], EXIT_CHECK_FAILED)
        if not self.stop_requested.is_set():
            self.reporter.checked(self.matrix)
        return self.matrix

    def serve(self) -> None:
        """Pump events until a stop is requested or the job fails."""
        self._pump(lambda: False, None)

    def wait_exited(self) -> None:
        """Pump events until every rank has exited (``to_completion``), one fails, or a stop is requested."""
        self._pump(lambda: all(r.state in ("exited", "lost") for r in self.ranks.values()), None)

    def stop(self, reason: str = "job finished") -> LaunchResult:
        """Stop every rank on every host; wait for their ends; return the result."""
        self._stopping = True
        self.reporter.progress(f"stopping: {reason}")
        for link in self.links:
            self._send(link, protocol.Stop(reason=reason))
        deadline = time.monotonic() + self.plan.options.grace + 5.0
        self._pump(lambda: self._all_ended() or self.hurry.is_set(), deadline)
        if self.hurry.is_set() and not self._all_ended():
            self.reporter.progress("killing every rank now (SIGKILL)")
            for link in self.links:
                self._send(link, protocol.Stop(reason="killed at the user's request", now=True))
            self._pump(self._all_ended, deadline)
        for link in self.links:  # stdin EOF after what is queued: the agent's last word
            link.outbox.put(_CLOSE)
        for link in self.links:
            if link.conn is not None and link.conn.wait(0 if link.gone else 2.0) is None:
                link.conn.terminate()
        for link, t in self._readers:
            # A lost host's reader may sit in a read that no FIN will ever end.
            t.join(timeout=0.5 if link.gone else 5.0)
        self._drain()
        # A sweep of a host that is cut off waits for its connect timeout: give up on it.
        deadline = time.monotonic() + 5.0
        for t in self._sweepers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self.transport.close()
        return self.result()

    def result(self) -> LaunchResult:
        ranks = tuple(
            RankResult(
                rank=s.spec.rank, host=s.spec.host, address=s.address, port=s.spec.port, pid=s.pid, state=s.state,
                exit_code=s.exit_code, error=s.error, started_at=s.started_at, ready_at=s.ready_at, ended_at=s.ended_at,
                last_output=s.output[-1] if s.output else None,
            )
            for s in sorted(self.ranks.values(), key=lambda s: s.spec.rank)
        )
        return LaunchResult(ranks, self.failure, self.matrix, time.monotonic() - self._t0)

    # --- the agent's side of the wire -------------------------------------

    def _run_link(self, link: _HostLink) -> None:
        host = link.plan.host
        try:
            link.conn = self.transport.start(host)
            if self.plan.uses_head_ip and link.plan.index > 0 and not self._await_head_ip():
                link.abandoned = True
                link.conn.close_stdin()
                link.conn.wait(2.0)
                self._events.put((link, EOFError()))
                return
            spec = protocol.AgentSpec(
                job_id=self.plan.job_id,
                host=host.name,
                host_index=link.plan.index,
                host_is_loopback=host.is_loopback,
                reached_address=self.transport.reached_address(host),
                ranks=[
                    protocol.RankLaunch(
                        rank=r.rank, local_rank=r.local_rank, port=r.port, engine_id=r.engine_id,
                        argv=list(r.argv), env=dict(r.env), ports=list(r.ports),
                    )
                    for r in link.plan.ranks
                ],
                readiness=self.plan.readiness,
                head_ip=self.head_ip,
                grace=self.plan.options.grace,
                heartbeat_interval=self.plan.options.heartbeat_interval,
                heartbeat_timeout=self.plan.options.heartbeat_timeout,
            )
            # Written before the writer thread starts: the agent needs its spec as
            # the first line, and a Stop may already be queued by then.
            link.conn.send(protocol.encode(spec))
            threading.Thread(target=self._write_link, args=(link,), daemon=True, name=f"to-{host.name}").start()
        except TransportError as exc:
            self._events.put((link, TransportError(str(exc))))
            return
        except OSError as exc:
            self._events.put((link, TransportError(f"{host.label}: the agent closed its input at start ({exc})")))
            return
        while True:
            try:
                raw = link.conn.readline()
            except OSError:
                raw = b""
            if not raw:
                break
            try:
                self._events.put((link, protocol.decode(raw)))
            except protocol.ProtocolError:
                self._events.put((link, ("noise", raw.decode("utf-8", "replace").rstrip())))
        self._events.put((link, EOFError()))

    def _await_head_ip(self) -> bool:
        """Hold a host's spec until the first host's agent says its address (False: the job ended first)."""
        while not self._head_ip_known.wait(0.1):
            if self.failure is not None or self.stop_requested.is_set() or self._stopping:
                return False
        return self.head_ip is not None

    def _send(self, link: _HostLink, message) -> None:
        if not link.gone:
            link.outbox.put(protocol.encode(message))

    @staticmethod
    def _write_link(link: _HostLink) -> None:
        while True:
            item = link.outbox.get()
            try:
                if item is _CLOSE:
                    link.conn.close_stdin()
                    return
                link.conn.send(item)
            except (OSError, ValueError, EOFError):
                return  # its reader thread reports the loss

    # --- the event pump ------------------------------------------------------

    def _pump(self, done: Callable[[], bool], deadline: float | None) -> None:
        next_beat = time.monotonic()
        while not done():
            if not self._stopping and (self.failure is not None or self.stop_requested.is_set()):
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            if now >= next_beat:
                self._heartbeat(now)
                next_beat = now + self.plan.options.heartbeat_interval
            try:
                link, event = self._events.get(timeout=0.05)
            except queue.Empty:
                continue
            self._handle(link, event)

    def _drain(self) -> None:
        while True:
            try:
                link, event = self._events.get_nowait()
            except queue.Empty:
                return
            self._handle(link, event)

    def _heartbeat(self, now: float) -> None:
        for link in self.links:
            if link.conn is None or link.gone:
                continue
            self._send(link, protocol.Heartbeat())
            silent = now - link.last_seen
            if link.hello is not None and silent > self.plan.options.heartbeat_timeout and not self._stopping:
                # Nothing more will come; its agent stops its ranks on its own timeout.
                self._lose_host(link, f"host {link.plan.host.name} lost: no word from its agent for {silent:.0f}s (heartbeat timeout)", sweep=False)

    def _handle(self, link: _HostLink, event) -> None:
        link.last_seen = time.monotonic()
        now = link.last_seen - self._t0
        rank = getattr(event, "rank", None)
        if rank is not None and not isinstance(event, protocol.CheckResult):
            state = self.ranks.get(rank)
            if state is None or state.spec.host_index != link.plan.index:
                self.reporter.progress(f"agent on {link.plan.host.name} spoke of rank {rank}, which is not its own; ignored")
                return
        if isinstance(event, protocol.Hello):
            self._hello(link, event)
        elif isinstance(event, protocol.Resolved):
            state = self.ranks[event.rank]
            state.address, state.rule = event.address, event.rule
        elif isinstance(event, protocol.Started):
            state = self.ranks[event.rank]
            state.state, state.pid, state.started_at = "started", event.pid, now
        elif isinstance(event, protocol.Ready):
            state = self.ranks[event.rank]
            state.state, state.address, state.port, state.rule, state.ready_at = "ready", event.address, event.port, event.rule, now
            state.vllm_version = event.vllm_version
            ready = sum(1 for r in self.ranks.values() if r.state == "ready")
            what = "ranks" if len(self.ranks) == self.plan.world_size else "processes"
            self.reporter.progress(f"{what} ready {ready}/{len(self.ranks)} (rank {event.rank} on {state.spec.host} at {event.address}:{event.port})")
        elif isinstance(event, protocol.Output):
            state = self.ranks[event.rank]
            state.output.append(event.line)
            self.reporter.output(state, event.stream, event.line)
        elif isinstance(event, protocol.RankError):
            state = self.ranks[event.rank]
            state.error = event.message
            if event.fatal and self.failure is None and not self._stopping:
                self.failure = Failure("not-ready", f"rank {event.rank} on {state.spec.host} cannot become ready: {event.message}",
                                       EXIT_NOT_READY, event.rank, state.spec.host)
        elif isinstance(event, protocol.Exited):
            self._rank_exited(self.ranks[event.rank], event.returncode, now)
        elif isinstance(event, protocol.CheckResult):
            if self.matrix is not None:
                self.matrix.add(event)
        elif isinstance(event, protocol.Stopping):
            self._agent_stopping(link, event)
        elif isinstance(event, protocol.AgentError):
            self.reporter.progress(f"agent on {link.plan.host.name}: {event.message}")
        elif isinstance(event, TransportError):
            link.gone = True
            self._host_failed(link, str(event), kind="transport")
        elif isinstance(event, EOFError) and link.abandoned:
            link.gone = True
            self._mark_lost_ranks(link)
        elif isinstance(event, EOFError):
            tail = link.conn.stderr_tail(wait=0 if self._stopping else 0.5) if link.conn else []
            said = f": {tail[-1]}" if tail else ""
            cancelled = link.conn.stop_reason() if link.conn else None
            if cancelled:
                # scancel ended the step before the agent's own word got through: an order, not a fault.
                self._stopped_by_signal(link, f"host {link.plan.host.name}: {cancelled}", signal.SIGTERM)
                self._lose_host(link, f"host {link.plan.host.name}: {cancelled}", sweep=False)
            elif link.hello is None:
                self._lose_host(link, f"host {link.plan.host.label}: the agent did not start{said}; {_start_fix(link.plan.host, tail)}", kind="transport")
            else:
                self._lose_host(link, f"host {link.plan.host.name} lost: its agent ended{said}")
        elif isinstance(event, tuple) and event and event[0] == "noise":
            self.reporter.progress(f"agent on {link.plan.host.name} printed: {event[1][:200]}")

    def _hello(self, link: _HostLink, hello: protocol.Hello) -> None:
        link.hello = hello
        connected = sum(1 for lk in self.links if lk.hello is not None)
        where = hello.address or "address unknown"
        self.reporter.progress(f"agents connected {connected}/{len(self.links)} ({link.plan.host.name}: {where}, pid {hello.pid})")
        if link.plan.index == 0 and self.plan.uses_head_ip:
            if hello.address:
                self.head_ip = hello.address
            elif self.failure is None:
                self.failure = Failure("transport", f"host {link.plan.host.label} has no address for {{head_ip}}: {hello.address_error}", EXIT_HOST_LOST, host=link.plan.host.name)
            self._head_ip_known.set()
        if connected == len(self.links):
            self._compare_versions()

    def _compare_versions(self) -> None:
        """Hosts that run different software: a warning, or a failure in a preflight."""
        for what, version_of, head_value in (
            ("launcher", lambda h: h.version, __version__),
            ("Python", lambda h: h.python_version, None),
            ("vLLM", lambda h: h.vllm_version or "not installed", None),
        ):
            found = collections.defaultdict(list)
            for lk in self.links:
                found[version_of(lk.hello)].append(lk.plan.host.name)
            if head_value is not None and set(found) != {head_value}:
                found.setdefault(f"{head_value} (head)", [])
            if len(found) > 1:
                listed = "; ".join(f"{v} on {', '.join(hosts) or 'the head'}" for v, hosts in sorted(found.items()))
                message = f"hosts run different {what} versions: {listed}; install one version everywhere"
                if self.plan.options.strict_versions and self.failure is None:
                    self.failure = Failure("versions", message, EXIT_CHECK_FAILED)
                else:
                    self.reporter.progress(f"warning: {message}")

    def _rank_exited(self, state: RankState, code: int, now: float) -> None:
        state.state, state.exit_code, state.ended_at = "exited", code, now
        if self._stopping or self.failure is not None:
            return
        if code == 0 and self.plan.options.to_completion:
            done = sum(1 for r in self.ranks.values() if r.state == "exited")
            self.reporter.progress(f"ranks done {done}/{len(self.ranks)} (rank {state.spec.rank} on {state.spec.host} exited 0)")
            return
        how = f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"
        why = f": {state.error}" if state.error else (f"; last output: {state.output[-1]}" if state.output else "")
        exit_code = code if code > 0 else (128 - code if code < 0 else 1)
        kind = "rank-error" if state.error else "rank-exited"
        self.failure = Failure(kind, f"rank {state.spec.rank} on {state.spec.host} {how}{why}", exit_code, state.spec.rank, state.spec.host)

    def _agent_stopping(self, link: _HostLink, event: protocol.Stopping) -> None:
        if event.signal:
            name = signal.Signals(event.signal).name
            self._stopped_by_signal(link, f"the agent on {link.plan.host.name} received {name} (scancel, or a kill on that host)", event.signal)

    def _stopped_by_signal(self, link: _HostLink, what: str, signum: int) -> None:
        """A signal on a host's side (scancel signals every step at once) ends the job like one to the head."""
        if not self._stopping and self.failure is None and not self.stop_requested.is_set():
            self.failure = Failure("signal", f"{what}; stopping every host", 128 + signum, host=link.plan.host.name)

    def _host_failed(self, link: _HostLink, message: str, kind: str = "host-lost") -> None:
        if self.failure is None:
            self.failure = Failure(kind, message, EXIT_HOST_LOST, host=link.plan.host.name)

    def _lose_host(self, link: _HostLink, message: str, kind: str = "host-lost", sweep: bool = True) -> None:
        """Nothing more comes from this host: a failure unless we are stopping anyway.

        ``sweep``: the host is likely reachable (its agent died, its SSH session
        dropped), so clean up after the agent; a silent host is left to its
        agent's own heartbeat timeout.
        """
        if link.gone:
            return  # already lost (e.g. by heartbeat); its reader's EOF adds nothing
        link.gone = True
        if not self._stopping:
            self._host_failed(link, message, kind)
        if sweep and any(self.ranks[r.rank].pid is not None and self.ranks[r.rank].state != "exited" for r in link.plan.ranks):
            self._sweep(link)  # its agent did not see its ranks out
        self._mark_lost_ranks(link)

    def _sweep(self, link: _HostLink) -> None:
        """In the background: a fresh agent connection kills what this job left on the host."""
        host = link.plan.host

        def run() -> None:
            try:
                conn = self.transport.start(host)
                conn.send(protocol.encode(protocol.Sweep(job_id=self.plan.job_id)))
                conn.close_stdin()
                for raw in iter(conn.readline, b""):
                    message = protocol.decode(raw)
                    if isinstance(message, protocol.Swept):
                        if message.pids:
                            self.reporter.progress(f"swept {len(message.pids)} processes this job left on {host.name} (pids {' '.join(map(str, message.pids))})")
                        break
                conn.wait(2.0)
            except (TransportError, OSError, protocol.ProtocolError) as exc:
                self.reporter.progress(f"could not sweep {host.name} after losing its agent: {exc}")

        t = threading.Thread(target=run, daemon=True, name=f"sweep-{host.name}")
        t.start()
        self._sweepers.append(t)

    def _mark_lost_ranks(self, link: _HostLink) -> None:
        for spec in link.plan.ranks:
            state = self.ranks[spec.rank]
            if state.state != "exited":
                state.state, state.ended_at = "lost", time.monotonic() - self._t0

    def _all_ended(self) -> bool:
        return all(lk.gone for lk in self.links if lk.conn is not None) and all(
            s.state in ("exited", "lost", "pending") for s in self.ranks.values()
        )

    def _fail_not_ready(self, timeout: float) -> None:
        waiting = [s for s in self.ranks.values() if s.state != "ready"]
        first = waiting[0]
        last = f"; its last output: {first.output[-1]}" if first.output else "; it printed nothing"
        names = ", ".join(f"rank {s.spec.rank} on {s.spec.host} ({s.state})" for s in waiting[:8])
        self.failure = Failure(
            "not-ready",
            f"{len(waiting)} ranks not ready after {timeout:g}s: {names}{last}; raise --ready-timeout if they are slow",
            EXIT_NOT_READY, first.spec.rank, first.spec.host,
        )

    def _verify_addresses(self) -> None:
        """Addresses unique across hosts, and each one reachable from the head."""
        owner: dict[str, RankState] = {}
        for state in sorted(self.ranks.values(), key=lambda s: s.spec.rank):
            other = owner.setdefault(state.address, state)
            if other.spec.host_index != state.spec.host_index:
                self.failure = Failure(
                    "duplicate-address",
                    f"hosts {other.spec.host} and {state.spec.host} both report address {state.address}; every host needs "
                    f"its own address (cloned VM, shared VIP, or both on loopback?): set ifname=/cidr= or env:VLLM_NIXL_SIDE_CHANNEL_HOST per host",
                    EXIT_HOST_LOST, state.spec.rank, state.spec.host,
                )
                return

        port_of = lambda state: self.plan.readiness.reachable_port(state.port)  # noqa: E731
        if port_of(next(iter(self.ranks.values()))) is None:
            return  # nothing known to listen on the host's address: no port to reach

        def probe(state: RankState) -> tuple[RankState, str | None]:
            try:
                tcp_connect(state.address, port_of(state), timeout=5.0)
                return state, None
            except ProbeError as exc:
                return state, str(exc)

        with ThreadPoolExecutor(max_workers=16) as pool:
            unreachable = [(state, error) for state, error in pool.map(probe, list(self.ranks.values())) if error]
        if not unreachable:
            return
        state, error = unreachable[0]
        # A rank that just exited refuses connections too: let its exit, if on its way, be the cause.
        self._pump(lambda: state.state == "exited", time.monotonic() + 1.0)
        if self.failure is None:
            self.failure = Failure(
                "unreachable",
                f"rank {state.spec.rank} on {state.spec.host} listens at {state.address}:{port_of(state)} but the head cannot reach it ({error})",
                EXIT_HOST_LOST, state.spec.rank, state.spec.host,
            )
