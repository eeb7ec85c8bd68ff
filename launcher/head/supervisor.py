"""Head side: start one link per host, pump their events through the job, perform what it decides.

The decisions (phases, the first failure, exit codes, messages) are the
``job`` module's, made without I/O; each host's threads and writes are its
``link``'s. This module is the loop between them, shaped like torch
elastic's agent: ``start``, then a phase (``wait_ready``, ``check``,
``serve``, ``wait_exited``) that pumps events until it is done or the job is
over, then ``stop``, which takes every rank on every host down and returns
the ``LaunchResult``.
"""

from __future__ import annotations

import queue
import resource
import threading
import time
from collections.abc import Callable

import msgspec

from .. import check as checking
from .. import protocol, rankenv
from ..check import CheckMatrix, CheckOptions
from ..plan import LaunchPlan
from ..probe import ProbeError, tcp_connect
from ..results import LaunchResult, Phase
from ..transports import Transport
from . import job as jobs
from .job import Job, RankState
from .link import HostLink
from .reporter import Reporter

EVENT_BACKLOG = 20000  # events waiting for the pump before the links' readers wait (rank output, mostly)


class Supervisor:
    def __init__(
        self,
        plan: LaunchPlan,
        transport: Transport,
        reporter: Reporter | None = None,
        stop: threading.Event | None = None,
        hurry: threading.Event | None = None,
    ):
        self.plan, self.transport = plan, transport
        self.stop_requested = stop or threading.Event()  # set from anywhere (a signal handler) to end any phase
        self.hurry = hurry or threading.Event()  # set while stopping: SIGKILL now instead of waiting out the grace
        self.reporter = reporter or Reporter()
        self.job = Job(plan, sweeps=transport.capabilities.sweeps)
        transport.say = self.reporter.progress
        self._events: queue.Queue = queue.Queue(maxsize=EVENT_BACKLOG)
        self.links = [HostLink(i, hp, transport, self._events) for i, hp in enumerate(plan.hosts)]
        self._t0 = time.monotonic()
        # {head_ip}: a leader's address (the first host's, or a P/D instance's first), from its agent
        self._leader_known = {index: threading.Event() for index in plan.leaders}
        # Who else must know that a failure group went down for a restart and came back (the P/D proxy).
        self.on_hosts_down: Callable[[tuple[int, ...], str], None] = lambda hosts, why: None
        self.on_hosts_up: Callable[[tuple[int, ...]], None] = lambda hosts: None
        # Starts the router again (--router with --restart); called on the pump's thread, the head's main one.
        self.start_router: Callable[[int], None] = lambda attempt: None
        self._heart_stop = threading.Event()

    @property
    def failure(self):
        return self.job.failure

    @property
    def ranks(self) -> dict[int, RankState]:
        return self.job.ranks

    # --- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """Start every host's agent in parallel (returns at once)."""
        self._t0 = time.monotonic()
        _room_for_links(len(self.links))
        self.transport.prepare([link.plan.host for link in self.links])  # first: no thread of ours exists yet
        processes = "" if len(self.job.ranks) == self.plan.world_size else f" in {len(self.job.ranks)} processes"
        self.reporter.progress(
            f"job {self.plan.job_id}: starting {self.plan.world_size} ranks{processes} on {len(self.links)} hosts ({self.transport.name})"
        )
        for link in self.links:
            link.start(lambda link=link: self._spec_for(link))
        threading.Thread(target=self._beat, daemon=True, name="heart").start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Pump events until every rank is ready and reachable, or the job failed."""
        timeout = self.plan.options.ready_timeout if timeout is None else timeout
        self._pump(lambda: self.job.all_in(Phase.READY), self._t0 + timeout)
        if self.job.over:
            return False
        if not self.job.all_in(Phase.READY):
            self.job.not_ready(timeout)
        elif not self.job.duplicate_address():
            self._verify_reachable()
        if self.job.failure is None:
            self.reporter.ready(list(self.job.ranks.values()))
        return self.job.failure is None

    def check(self, options: CheckOptions = CheckOptions()) -> CheckMatrix:
        """All-pairs probe from every rank's address to every rank (handshakes where the wire is known)."""
        targets, pairs = self._targets(options)
        peers, notes = checking.plan_probes(targets, options, builtin=self.plan.builtin, job_id=self.plan.job_id)
        probed = {t.rank for t in targets}
        notes += [
            f"rank {r.spec.rank} on {r.spec.host}: a headless node serves no side channel of its own; not probed"
            for r in sorted(self.job.ranks.values(), key=lambda r: r.spec.rank)
            if r.spec.rank not in probed
        ]
        for note in notes:
            self.reporter.progress(note)
        kinds = sorted({p.wire for p in peers})
        how = ", ".join("TCP connects" if k == "tcp" else f"handshakes, {k} wire" for k in kinds)
        which = f"all {len(targets) ** 2}" if pairs is None else f"{len(pairs)} sampled (every pair of hosts) of {len(targets) ** 2}"
        probes = "" if pairs is not None else "; each network path and each listener probed once"
        self.reporter.progress(f"checking {which} pairs ({how}{probes})")
        matrix = self.job.begin_check(targets, pairs, {p.rank: p.wire for p in peers})
        deadline = checking.deadline_for(targets, pairs, options.timeout)
        return self._probe_all(matrix, protocol.Check(peers=peers, timeout=options.timeout, pairs=pairs), deadline)

    def transfer_check(self, options: CheckOptions) -> CheckMatrix:
        """Every built-in rank READs every peer's NIXL buffer (or the sampled pairs) and verifies it."""
        targets, pairs = self._targets(options)
        peers = [protocol.Peer(rank=t.rank, address=t.address, ports=list(t.ports), wire="", expect_engine_id=t.engine_id) for t in targets]
        nbytes = self.plan.options.transfer_bytes
        count = len(targets) ** 2 if pairs is None else len(pairs)
        self.reporter.progress(f"moving bytes: {count} NIXL reads of {nbytes} bytes (each rank reads its peers in turn)")
        matrix = self.job.begin_transfer_check(targets, pairs, nbytes)
        deadline = checking.transfer_deadline(targets, pairs, options.timeout)
        return self._probe_all(matrix, protocol.TransferCheck(peers=peers, timeout=options.timeout, pairs=pairs), deadline)

    def _targets(self, options: CheckOptions) -> tuple[list[checking.Target], list | None]:
        """Every rank that serves a side channel as a probe target (a headless vLLM node serves none: its
        engine core, and so its listener, runs on the first node), and the pairs to probe (None: all)."""
        ranks = sorted(self.job.ranks.values(), key=lambda r: r.spec.rank)
        ranks = [r for r in ranks if self.plan.readiness_of(r.spec.host_index).opens_side_channel]
        targets = [checking.Target(r.spec.rank, r.spec.host, r.address, r.spec.ports, r.spec.engine_id, r.vllm_version) for r in ranks]
        return targets, checking.choose_pairs(targets, options.sample, self.plan.job_id)

    def _probe_all(self, matrix: CheckMatrix, order, seconds: float) -> CheckMatrix:
        """Send every host ``order``, pump until ``matrix`` is complete or ``seconds`` pass, judge it."""
        for link in self.links:
            self._send(link, order)
        self._pump(lambda: matrix.complete, time.monotonic() + seconds)
        matrix.settle()  # the cells a path's probe stood for: their listeners' verdicts from elsewhere
        if not self.job.interrupted:
            self.job.judge_check(matrix)
            self.reporter.checked(matrix)
        return matrix

    def pump_until(self, done: Callable[[], bool], seconds: float) -> None:
        """Pump events until ``done()`` (asked between events), a stop is requested, the job fails, or ``seconds`` pass."""
        self._pump(done, time.monotonic() + seconds)

    def serve(self) -> None:
        """Pump events until a stop is requested or the job fails."""
        self._pump(lambda: False, None)

    def wait_exited(self) -> None:
        """Pump events until every rank has exited (``to_completion``), one fails, or a stop is requested."""
        self._pump(lambda: self.job.all_in(Phase.EXITED, Phase.LOST), None)

    def stop(self, reason: str = "job finished") -> LaunchResult:
        """Stop every rank on every host; wait for their ends; return the result."""
        self.job.begin_stopping()
        self._release_held_specs()  # specs still held for {head_ip} are never sent now
        self.reporter.progress(f"stopping: {reason}")
        for link in self.links:
            self._send(link, protocol.Stop(reason=reason))
        deadline = time.monotonic() + self.plan.options.grace + 5.0
        self._pump(lambda: self.job.all_ended or self.hurry.is_set(), deadline)
        if self.hurry.is_set() and not self.job.all_ended:
            self.reporter.progress("killing every rank now (SIGKILL)")
            for link in self.links:
                self._send(link, protocol.Stop(reason="killed at the user's request", now=True))
            self._pump(lambda: self.job.all_ended, deadline)
        self._heart_stop.set()
        for link in self.links:
            link.close()
        for link, host in zip(self.links, self.job.hosts, strict=True):
            # An agent killed here had no teardown of its own; it may have started ranks it never reported
            # (stopped before its first word): sweep whether or not the head heard of any.
            if link.finish(gone=host.gone) and link.sweeper is None:
                link.sweep(self.plan.job_id, self.reporter.progress)
        for link, host in zip(self.links, self.job.hosts, strict=True):
            link.join(timeout=0.5 if host.gone else 5.0)  # a lost host's reader may sit in a read no FIN will end
        self._drain()
        for link in self.links:
            link.released.set()  # a reader still holding an event drops it: nobody will read the queue again
        self._drain()
        # A sweep of a host that is cut off waits for its connect timeout: give up on it. Not sooner than 10 s: a
        # fresh agent's start and its scan of the process table took over 5 s on a loaded 2-CPU CI machine.
        deadline = time.monotonic() + 10.0
        for link in self.links:
            if link.sweeper is not None:
                link.sweeper.join(timeout=max(0.0, deadline - time.monotonic()))
        self.transport.close()
        return self.result()

    def result(self) -> LaunchResult:
        return self.job.result(time.monotonic() - self._t0)

    # --- a host's spec, held for {head_ip} when its command needs it ----------------------

    def _release_held_specs(self) -> None:
        for known in self._leader_known.values():
            known.set()

    def _spec_for(self, link: HostLink) -> protocol.AgentSpec | None:
        hp, options = link.plan, self.plan.options
        head_ip = None
        if self.plan.waits_for_leader(link.index):
            while not self._leader_known[hp.leader].wait(0.1):
                pass
            head_ip = self.job.leader_ips.get(hp.leader)
            if head_ip is None or self.job.over or self.job.stopping:
                return None
        identity_names = set(rankenv.RankIdentity.NAMES.values())  # sent as the identity itself
        return protocol.AgentSpec(
            job_id=self.plan.job_id,
            host=hp.host.name,
            host_index=hp.index,
            host_is_loopback=hp.host.is_loopback,
            reached_address=self.transport.reached_address(hp.host),
            ranks=[
                protocol.RankLaunch(
                    identity=r.identity,
                    argv=list(r.argv),
                    env={k: v for k, v in r.env.items() if k not in identity_names},
                    ports=list(r.ports),
                )
                for r in hp.ranks
            ],
            readiness=self.plan.readiness_of(hp.index),
            head_ip=head_ip,
            rpc_port=hp.rpc_port,
            grace=options.grace,
            heartbeat_interval=options.heartbeat_interval,
            heartbeat_timeout=options.heartbeat_timeout,
        )

    def _send(self, link: HostLink, message) -> None:
        if not self.job.hosts[link.index].gone:
            link.send(message)

    # --- the event pump ------------------------------------------------------------------------

    def _beat(self) -> None:
        """Heartbeats on a clock of their own, never behind the pump's work (a flood of output can keep it busy)."""
        interval = self.plan.options.heartbeat_interval
        while not self._heart_stop.wait(interval):
            for link, host in zip(self.links, self.job.hosts, strict=True):
                if link.conn is not None and not host.gone:
                    link.send(protocol.Heartbeat())

    def _pump(self, done: Callable[[], bool], deadline: float | None) -> None:
        next_judgment = time.monotonic()
        while not done():
            if self.stop_requested.is_set():
                self.job.interrupt()
            if not self.job.stopping and self.job.over:
                self._release_held_specs()
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            if now >= next_judgment:
                # Silence is judged on evidence from the links (a line read, bytes waiting), not on how
                # far the pump has got: a pump busy with a flood would otherwise see silence that is not there.
                recent = now - self.plan.options.heartbeat_timeout
                speaking = frozenset(link.index for link in self.links if link.heard_since(recent))
                self._perform(self.job.tick(now - self._t0, speaking))
                next_judgment = now + self.plan.options.heartbeat_interval
            try:
                index, event = self._events.get(timeout=0.05)
            except queue.Empty:
                continue
            self._apply(index, event)

    def _drain(self) -> None:
        while True:
            try:
                index, event = self._events.get_nowait()
            except queue.Empty:
                return
            self._apply(index, event)

    def router_exited_later(self, message: str, code: int | None) -> None:
        """From any thread: the router ended, or did not serve in time (the pump judges it, as a rank's exit)."""
        self._events.put((-1, _RouterExited(message, code)))

    def router_ready_later(self) -> None:
        """From any thread: a restarted router serves again."""
        self._events.put((-1, _RouterReady()))

    def _apply(self, index: int, event) -> None:
        now = time.monotonic() - self._t0
        match event:
            case _RouterExited(message, code):
                self._perform(self.job.router_exited(message, code, now))
            case _RouterReady():
                self._perform(self.job.router_ready(now))
            case _:
                self._perform(self.job.apply(index, event, now))

    def _perform(self, actions: list[jobs.Action]) -> None:
        for action in actions:
            match action:
                case jobs.Progress(text):
                    self.reporter.progress(text)
                case jobs.ShowOutput(rank, stream, line):
                    self.reporter.output(rank, stream, line)
                case jobs.Sweep(index):
                    self.links[index].sweep(self.plan.job_id, self.reporter.progress)
                case jobs.HeadAddress(leader):
                    self._leader_known[leader].set()
                case jobs.RestartHosts(hosts, attempt, delay, why):
                    self.on_hosts_down(hosts, why)
                    for index in hosts:
                        self._send(self.links[index], protocol.Restart(attempt=attempt, delay=delay))
                case jobs.UnitReady(hosts):
                    self.on_hosts_up(hosts)
                case jobs.NewAttempt(rank, attempt):
                    self.reporter.new_attempt(rank, attempt)
                case jobs.StartRouter(attempt):
                    self.start_router(attempt)

    # --- I/O the job cannot do itself ---------------------------------------------------------

    def _verify_reachable(self) -> None:
        """Each ready rank's port, by the readiness rule, reachable from the head."""
        port_of = lambda state: self.plan.readiness_of(state.spec.host_index).reachable_port(state.port)
        states = [s for s in self.job.ranks.values() if port_of(s) is not None]

        def probe(state: RankState) -> tuple[RankState, str | None]:
            try:
                tcp_connect(state.address, port_of(state), timeout=5.0)
                return state, None
            except ProbeError as exc:
                return state, str(exc)

        from concurrent.futures import ThreadPoolExecutor  # here: it loads logging, ~2 ms of every start

        with ThreadPoolExecutor(max_workers=16) as pool:
            unreachable = [(state, error) for state, error in pool.map(probe, states) if error]
        if not unreachable:
            return
        state, error = unreachable[0]
        # A rank that just exited refuses connections too: let its exit, if on its way, be the cause.
        self._pump(lambda: state.phase is Phase.EXITED, time.monotonic() + 1.0)
        self.job.unreachable(state, port_of(state), error)


def _room_for_links(hosts: int) -> None:
    """Raise the soft open-files limit to the hard one when a job's links may need more: a link holds a
    descriptor or two (its SSH socket, a pipe), and the usual soft limit of 1024 ends a job of ~1000 hosts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 4 * hosts + 256 and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _RouterExited(msgspec.Struct, frozen=True):
    """The router's exit (code None: it did not serve in time), found on the head, outside the links."""

    message: str
    code: int | None = None


class _RouterReady(msgspec.Struct, frozen=True):
    """A restarted router serves again."""
