"""The head's decisions about one job, as a pure state machine.

``Job.apply(host, event, now)`` takes one typed event from a host's link (a
message from its agent, or what the link itself saw: it opened, it failed to
start, it closed, the agent printed noise) and returns the actions the
supervisor performs: tell the user, forward a rank's output, sweep a host,
release the specs that wait for ``{head_ip}``. ``tick(now)`` judges silence.
The first failure wins in one place, ``fail``; what ends a job, with which
exit code and which first line, is decided here and tested without
processes. No threads, no sockets, no clock: time comes in as ``now``
(seconds since the launch began).
"""

from __future__ import annotations

import collections
import signal
from typing import Union

import msgspec

from .. import protocol, restart
from ..check import CheckMatrix
from ..plan import Host, HostPlan, LaunchPlan, RankSpec
from ..results import Failure, FailureKind, LaunchResult, Phase, RankResult, exit_code_for
from ..version import __version__

# --- what links report besides the agent's own messages -------------------------------


class LinkOpened(msgspec.Struct, frozen=True):
    """The agent was started; its connection is up."""


class LinkFailed(msgspec.Struct, frozen=True):
    """The agent could not be started, or the head failed talking to it; ``message`` names the host."""

    message: str


class LinkClosed(msgspec.Struct, frozen=True):
    """Nothing more will come from this host's agent."""

    last_words: tuple[str, ...] = ()  # its last stderr lines
    stopped_by: str | None = None  # the backend's account of an ordered stop (scancel), if any


class LinkAbandoned(msgspec.Struct, frozen=True):
    """The job ended before this host's spec was sent; its agent was told to go."""


class Noise(msgspec.Struct, frozen=True):
    """A line from the agent that is not a launcher message."""

    text: str


# --- what the supervisor is asked to do --------------------------------------------------


class Progress(msgspec.Struct, frozen=True):
    text: str


class ShowOutput(msgspec.Struct, frozen=True):
    rank: RankState
    stream: str
    line: str


class Sweep(msgspec.Struct, frozen=True):
    """Clean up after a host's agent that died with ranks running: a fresh connection kills this job's processes."""

    host: int


class RestartHosts(msgspec.Struct, frozen=True):
    """Tell these hosts' agents to stop every rank and start them again after ``delay`` seconds."""

    hosts: tuple[int, ...]
    attempt: int
    delay: float
    why: str


class UnitReady(msgspec.Struct, frozen=True):
    """A restarted failure group is ready again: route to its hosts again."""

    hosts: tuple[int, ...]


class NewAttempt(msgspec.Struct, frozen=True):
    """A restarted rank's new process started: what it prints from now on is attempt ``attempt``'s."""

    rank: RankState
    attempt: int


class HeadAddress(msgspec.Struct, frozen=True):
    """A leader's address is known (or will never be: None): release the specs that wait for it ({head_ip})."""

    leader: int
    address: str | None


ROUTER = "the router"  # run --router's process, in restart records and health


class StartRouter(msgspec.Struct, frozen=True):
    """Start the router again (restart ``attempt``): its backoff is over."""

    attempt: int


Action = Union[Progress, ShowOutput, Sweep, HeadAddress, RestartHosts, NewAttempt, UnitReady, StartRouter]


# --- state -----------------------------------------------------------------------------------


class RankState(msgspec.Struct):
    spec: RankSpec
    phase: Phase = Phase.PENDING
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
    exit_due: bool = False  # a restart stopped it: its exit is expected, not a failure
    output: collections.deque = msgspec.field(default_factory=lambda: collections.deque(maxlen=20))

    @property
    def state(self) -> Phase:  # the name the rank table and RankResult use
        return self.phase


class HostState(msgspec.Struct):
    plan: HostPlan
    opened: bool = False  # its agent was started
    hello: protocol.Hello | None = None
    gone: bool = False  # its agent ended, or it was declared lost
    last_seen: float = 0.0

    @property
    def host(self) -> Host:
        return self.plan.host


def start_fix(host: Host, said: list[str] | tuple[str, ...]) -> str:
    """What to do about an agent that died before saying hello, from what it printed."""
    text = " ".join(said[-3:])
    if host.cwd and ("cd:" in text or "chdir" in text):
        return "fix cwd= for this host in the hostfile (the directory must exist there)"
    if "No module named" in text:
        return "install launcher there (same version) or set python= for this host in the hostfile"
    return "check that python= for this host (default: the head's own interpreter path) runs there with launcher installed"


class Job:
    """One launch plan's ranks and hosts, what happened to them, and the verdict."""

    def __init__(self, plan: LaunchPlan, sweeps: bool = True):
        self.plan = plan
        self.sweeps = sweeps  # the backend can start a fresh agent to clean up after a lost one (Capabilities.sweeps)
        self.ranks = {r.rank: RankState(r) for r in plan.ranks}
        self.hosts = [HostState(h) for h in plan.hosts]
        self.failure: Failure | None = None
        self.stopping = False  # the job is being stopped: exits from now on are consequences
        self.interrupted = False  # the user asked to stop (Ctrl-C, SIGTERM at the head)
        self.leader_ips: dict[int, str] = {}  # {head_ip} of the hosts that wait for a leader, by the leader's index
        self._leaders = plan.leaders  # read at every hello: computed once, not per agent
        self.matrix: CheckMatrix | None = None
        self.transfers: CheckMatrix | None = None  # check --transfer: NIXL reads, after the probes
        # --restart: failure groups, whether each was ever ready (no restart before that), the open restart of each
        self.policy = plan.options.restart
        self.units = restart.units_of(plan.instances, len(plan.hosts))
        self.unit_of = {host: i for i, unit in enumerate(self.units) for host in unit.hosts}
        self.ever_ready = [False] * len(self.units)
        self.restarting: list[int | None] = [None] * len(self.units)  # index into restarts, while one is under way
        self.restarts: list[restart.RestartRecord] = []
        # --router: the router is a failure group of its own, of no host; its open restart and when it starts again
        self.router_restarting: int | None = None
        self.router_due: float | None = None
        self.first_ready_at: float | None = None  # every rank ready for the first time, seconds since the launch
        self._draws = None  # the backoff's jitter (random.Random seeded by the job id: a job's decisions replay), once needed

    # --- the one first-failure rule --------------------------------------------------

    def fail(
        self,
        kind: FailureKind,
        message: str,
        *,
        rank: int | None = None,
        host: str | None = None,
        rank_code: int | None = None,
        signum: int | None = None,
    ) -> bool:
        """Record what ended the job, unless something already did or the job is being stopped anyway."""
        if self.failure is not None or self.stopping or self.interrupted:
            return False
        self.failure = Failure(kind, message, exit_code_for(kind, rank_code, signum), rank, host)
        return True

    @property
    def over(self) -> bool:
        """Nothing more to wait for but the teardown."""
        return self.failure is not None or self.interrupted

    def health(self) -> str | None:
        """None while every rank is ready, no failure group restarts and the job is not ending; else why not."""
        ranks = list(self.ranks.values())
        ready = sum(r.phase is Phase.READY for r in ranks)
        restarting = [self.units[i].name for i, open_restart in enumerate(list(self.restarting)) if open_restart is not None]
        restarting += [ROUTER] if self.router_restarting is not None else []
        if self.failure is not None:
            return f"the job is ending: {self.failure.message}"
        if self.stopping or self.interrupted:
            return "the job is stopping"
        if restarting:
            return f"restarting: {', '.join(restarting)}"
        if ready < len(ranks):
            return f"ranks ready {ready}/{len(ranks)}"
        return None

    # --- transitions the supervisor asks for -------------------------------------------------

    def interrupt(self) -> None:
        """The user asked to stop (Ctrl-C, SIGTERM at the head): not a failure; ignored once stopping."""
        if not self.stopping:
            self.interrupted = True

    def begin_stopping(self) -> None:
        """Every host is being told to stop: exits from now on are consequences, never the cause."""
        self.stopping = True

    def begin_check(self, targets, pairs, wires: dict[int, str]) -> CheckMatrix:
        """The all-pairs check starts: the matrix its results fill (``pairs`` None: every pair)."""
        self.matrix = self._matrix(targets, pairs, wires)
        return self.matrix

    def begin_transfer_check(self, targets, pairs, nbytes: int) -> CheckMatrix:
        """The NIXL transfer check starts: the matrix its reads fill."""
        self.transfers = self._matrix(targets, pairs, {}, nbytes)
        return self.transfers

    @staticmethod
    def _matrix(targets, pairs, wires: dict[int, str], nbytes: int | None = None) -> CheckMatrix:
        hosts = {t.rank: t.host for t in targets}
        return CheckMatrix(tuple(hosts), wires, hosts, pairs=None if pairs is None else frozenset(pairs), transfer_bytes=nbytes)

    # --- events ---------------------------------------------------------------------------

    def apply(self, index: int, event, now: float) -> list[Action]:
        """One event from host ``index``'s link; the actions it calls for."""
        host = self.hosts[index]
        host.last_seen = now
        rank = getattr(event, "rank", None)
        if rank is not None and not isinstance(event, protocol.CheckResult):
            state = self.ranks.get(rank)
            if state is None or state.spec.host_index != index:
                return [Progress(f"agent on {host.host.name} spoke of rank {rank}, which is not its own; ignored")]
        match event:
            case LinkOpened():
                host.opened = True
            case protocol.Hello():
                return self._hello(index, event)
            case protocol.Resolved():
                state = self.ranks[event.rank]
                state.address, state.rule = event.address, event.rule
            case protocol.Started():
                state = self.ranks[event.rank]
                again = state.phase is Phase.RESTARTING
                state.phase, state.pid, state.started_at, state.exit_code = Phase.STARTED, event.pid, now, None
                if again:
                    open_restart = self.restarting[self.unit_of[index]]
                    return [] if open_restart is None else [NewAttempt(state, self.restarts[open_restart].attempt)]
            case protocol.Ready():
                return self._ready(event, now)
            case protocol.Output():
                state = self.ranks[event.rank]
                state.output.append(event.line)
                return [ShowOutput(state, event.stream, event.line)]
            case protocol.RankError():
                state = self.ranks[event.rank]
                state.error = event.message
                if event.fatal:
                    self.fail(
                        FailureKind.NOT_READY,
                        f"rank {event.rank} on {state.spec.host} cannot become ready: {event.message}",
                        rank=event.rank,
                        host=state.spec.host,
                    )
            case protocol.Exited():
                return self._exited(self.ranks[event.rank], event.returncode, now)
            case protocol.TransferResult():  # before CheckResult: a subclass of it
                if self.transfers is not None:
                    self.transfers.add(event)
            case protocol.CheckResult():
                if self.matrix is not None:
                    self.matrix.add(event)
            case protocol.Stopping():
                if event.signal:
                    name = signal.Signals(event.signal).name
                    self._stopped_by_signal(
                        index, f"the agent on {host.host.name} received {name} (scancel, or a kill on that host)", event.signal
                    )
                else:  # on its own (it heard nothing from the head): its ranks' exits that follow are consequences
                    self.fail(
                        FailureKind.HOST_LOST, f"the agent on {host.host.name} stopped its ranks: {event.reason}", host=host.host.name
                    )
            case protocol.AgentError():
                return [Progress(f"agent on {host.host.name}: {event.message}")]
            case Noise():
                return [Progress(f"agent on {host.host.name} printed: {event.text[:200]}")]
            case LinkFailed():
                # Before its agent started nothing runs there; after, the link closed the connection
                # (its agent stops its ranks on EOF) and a sweep cleans up what might be left.
                return self._lose(index, event.message, now, kind=FailureKind.TRANSPORT, sweep=host.opened)
            case LinkAbandoned():
                host.gone = True
                self._mark_lost(index, now)
            case LinkClosed():
                return self._closed(index, event, now)
        return []

    def tick(self, now: float, speaking: frozenset[int] = frozenset()) -> list[Action]:
        """Judge silence: a host whose agent said hello and then nothing for the heartbeat timeout is lost.

        Loss is judged on evidence: ``speaking`` are the hosts whose connection
        has bytes waiting to be read (a starved head reads late; those bytes
        are the agent's word), and they are not silent, however late.
        """
        actions: list[Action] = self._restarts_overdue(now)
        if self.router_due is not None and now >= self.router_due and not (self.over or self.stopping):
            self.router_due = None
            actions.append(StartRouter(self.restarts[self.router_restarting].attempt))
        timeout = self.plan.options.heartbeat_timeout
        for index, host in enumerate(self.hosts):
            silent = now - host.last_seen
            if index in speaking:
                continue
            if host.hello is not None and not host.gone and not self.stopping and silent > timeout:
                # Nothing more will come; its agent stops its ranks on its own timeout.
                actions += self._lose(
                    index, f"host {host.host.name} lost: no word from its agent for {silent:.0f}s (heartbeat timeout)", now, sweep=False
                )
        return actions

    def _hello(self, index: int, hello: protocol.Hello) -> list[Action]:
        host = self.hosts[index]
        host.hello = hello
        connected = sum(1 for h in self.hosts if h.hello is not None)
        actions: list[Action] = [
            Progress(
                f"agents connected {connected}/{len(self.hosts)} ({host.host.name}: {hello.address or 'address unknown'}, pid {hello.pid})"
            )
        ]
        if index in self._leaders:
            if hello.address:
                self.leader_ips[index] = hello.address
            else:
                self.fail(
                    FailureKind.TRANSPORT,
                    f"host {host.host.label} has no address for {{head_ip}}: {hello.address_error}",
                    host=host.host.name,
                )
            actions.append(HeadAddress(index, self.leader_ips.get(index)))
        if connected == len(self.hosts):
            actions += self._compare_versions()
        return actions

    def _compare_versions(self) -> list[Action]:
        """Hosts that run different software: a warning, or a failure in a preflight."""
        actions: list[Action] = []
        for what, version_of, head_value in (
            ("launcher", lambda h: h.version, __version__),
            ("Python", lambda h: h.python_version, None),
            ("vLLM", lambda h: h.vllm_version or "not installed", None),
        ):
            found = collections.defaultdict(list)
            for host in self.hosts:
                found[version_of(host.hello)].append(host.host.name)
            if head_value is not None and set(found) != {head_value}:
                found.setdefault(f"{head_value} (head)", [])
            if len(found) > 1:
                listed = "; ".join(f"{v} on {', '.join(names) or 'the head'}" for v, names in sorted(found.items()))
                message = f"hosts run different {what} versions: {listed}; install one version everywhere"
                if not (self.plan.options.strict_versions and self.fail(FailureKind.VERSIONS, message)):
                    actions.append(Progress(f"warning: {message}"))
        return actions

    def _ready(self, event: protocol.Ready, now: float) -> list[Action]:
        state = self.ranks[event.rank]
        state.phase, state.address, state.port, state.rule, state.ready_at = Phase.READY, event.address, event.port, event.rule, now
        state.vllm_version = event.vllm_version
        ready = sum(1 for r in self.ranks.values() if r.phase is Phase.READY)
        what = "ranks" if len(self.ranks) == self.plan.world_size else "processes"
        actions: list[Action] = [
            Progress(f"{what} ready {ready}/{len(self.ranks)} (rank {event.rank} on {state.spec.host} at {event.address}:{event.port})")
        ]
        if self.first_ready_at is None and ready == len(self.ranks):
            self.first_ready_at = now
        unit = self.unit_of[state.spec.host_index]
        if all(m.phase is Phase.READY for m in self._members(unit)):
            actions += self._unit_ready(unit, now)
        return actions

    # --- restart by failure group (--restart on-failure) --------------------------------------

    def _members(self, unit: int) -> list[RankState]:
        """Every rank of a failure group."""
        return [self.ranks[spec.rank] for host in self.units[unit].hosts for spec in self.plan.hosts[host].ranks]

    def _unit_ready(self, unit: int, now: float) -> list[Action]:
        self.ever_ready[unit] = True
        open_restart = self.restarting[unit]
        if open_restart is None:
            return []
        self.restarting[unit] = None
        record = self.restarts[open_restart]
        self.restarts[open_restart] = msgspec.structs.replace(record, ready_after=now - record.at)
        name = self.units[unit].name
        actions: list[Action] = [
            Progress(f"{name} is ready again after restart {record.attempt} ({now - record.at:.1f}s)"),
            UnitReady(self.units[unit].hosts),
        ]
        if self.policy.peers and self.units[unit].role == "prefill":
            # Decoders connected to the replaced prefill hold its old NIXL metadata: they serve against a dead
            # engine or crash in loadRemoteMD (vllm#49238). Restart them now that the prefill is back.
            for other, peer in enumerate(self.units):
                if peer.role == "decode" and self.restarting[other] is None:
                    actions += self._restart(other, f"{name} was replaced (--restart-peers)", now)
        return actions

    def _restarts_overdue(self, now: float) -> list[Action]:
        """A restarted group not ready --ready-timeout after its backoff: that attempt failed (the next restart, or
        giving up, follows the same rules; a slow start is never cut short before its ready timeout)."""
        actions: list[Action] = []
        if self.over or self.stopping:
            return actions
        for unit, open_restart in enumerate(self.restarting):
            if open_restart is None:
                continue
            record = self.restarts[open_restart]
            if now - record.at - record.backoff <= self.plan.options.ready_timeout:
                continue
            members = self._members(unit)
            state = next((m for m in members if m.phase is not Phase.READY), members[0])
            cause = f"restart {record.attempt} of {self.units[unit].name} not ready after {self.plan.options.ready_timeout:g}s"
            actions += self._restart_or_fail(state, FailureKind.NOT_READY, cause, exit_code_for(FailureKind.NOT_READY), now)
        return actions

    def _restart_or_fail(self, state: RankState, kind: FailureKind, cause: str, code: int, now: float) -> list[Action]:
        """A rank failed: restart its unit if the policy allows it, else end the job with ``cause``."""
        unit = self.unit_of[state.spec.host_index]
        name = self.units[unit].name
        fail = lambda message: self.fail(kind, message, rank=state.spec.rank, host=state.spec.host, rank_code=code)
        if not self.policy.on:
            fail(cause)
            return []
        if not self.ever_ready[unit]:
            fail(f"{cause}; not restarted: {name} never became ready (a failure group restarts only once its first start succeeded)")
            return []
        refused = self._restart_refused(name, cause, now)
        if refused is not None:
            fail(refused)
            return []
        return self._restart(unit, cause, now)

    def _restart_refused(self, name: str, cause: str, now: float) -> str | None:
        """Why failure group ``name`` may not restart now (no --restart, or --max-restarts reached); None if it may."""
        if not self.policy.on:
            return cause
        recent = restart.within_window(self.restarts, name, now, self.policy.window)
        if recent >= self.policy.max_restarts:
            window = restart.describe_seconds(self.policy.window)
            return f"gave up restarting {name} after {recent} restarts in {window} (--max-restarts); last: {cause}"
        return None

    def _open_restart(self, name: str, cause: str, now: float) -> restart.RestartRecord:
        """Record the next restart of failure group ``name``, its backoff drawn."""
        attempt = 1 + sum(1 for r in self.restarts if r.unit == name)
        if self._draws is None:
            import random  # here: a job that never restarts does not load it

            self._draws = random.Random(self.plan.job_id)
        delay = restart.backoff(attempt, self.policy, self._draws.random())
        self.restarts.append(restart.RestartRecord(name, attempt, cause, now, round(delay, 3)))
        return self.restarts[-1]

    def _restart(self, unit: int, cause: str, now: float) -> list[Action]:
        target = self.units[unit]
        self.restarting[unit] = len(self.restarts)
        record = self._open_restart(target.name, cause, now)
        for state in self._members(unit):
            state.exit_due = state.phase in (Phase.STARTED, Phase.READY)  # a live process: stopping it is ours
            state.phase = Phase.RESTARTING
        return [
            Progress(f"restarting {target.name} in {record.backoff:.1f}s (restart {record.attempt}): {cause}"),
            RestartHosts(target.hosts, record.attempt, record.backoff, f"{target.name} is restarting ({cause})"),
        ]

    # --- the router (run --router): a failure group of its own ----------------------------------

    def router_exited(self, cause: str, code: int | None, now: float) -> list[Action]:
        """The router ended, or a restarted one did not serve in time: start it again after its backoff if
        --restart allows (its restarts count against --max-restarts as a group's do), else the job fails with
        its code. Stateless, it restarts alone: the instances keep serving."""
        if self.over or self.stopping:
            return []
        refused = self._restart_refused(ROUTER, cause, now)
        if refused is not None:
            self.fail(FailureKind.ROUTER if code is not None else FailureKind.NOT_READY, refused, rank_code=code)
            return []
        self.router_restarting = len(self.restarts)
        record = self._open_restart(ROUTER, cause, now)
        self.router_due = now + record.backoff
        return [Progress(f"restarting {ROUTER} in {record.backoff:.1f}s (restart {record.attempt}): {cause}")]

    def router_ready(self, now: float) -> list[Action]:
        """A restarted router serves again."""
        if self.router_restarting is None:
            return []
        record = self.restarts[self.router_restarting]
        self.restarts[self.router_restarting] = msgspec.structs.replace(record, ready_after=now - record.at)
        self.router_restarting = None
        return [Progress(f"{ROUTER} is ready again after restart {record.attempt} ({now - record.at:.1f}s)")]

    def _exited(self, state: RankState, code: int, now: float) -> list[Action]:
        if state.exit_due and not self.stopping:  # stopped by its unit's restart: it starts again
            state.exit_due, state.exit_code, state.ended_at = False, code, now
            return []
        state.phase, state.exit_code, state.ended_at = Phase.EXITED, code, now
        if self.over or self.stopping:
            return []
        if code == 0 and self.plan.options.to_completion:
            done = sum(1 for r in self.ranks.values() if r.phase is Phase.EXITED)
            return [Progress(f"ranks done {done}/{len(self.ranks)} (rank {state.spec.rank} on {state.spec.host} exited 0)")]
        how = f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"
        why = f": {state.error}" if state.error else (f"; last output: {state.output[-1]}" if state.output else "")
        kind = FailureKind.RANK_ERROR if state.error else FailureKind.RANK_EXITED
        return self._restart_or_fail(state, kind, f"rank {state.spec.rank} on {state.spec.host} {how}{why}", code, now)

    def _closed(self, index: int, event: LinkClosed, now: float) -> list[Action]:
        host = self.hosts[index]
        said = f": {event.last_words[-1]}" if event.last_words else ""
        if event.stopped_by:
            # The scheduler ended the agent before its own word got through: an order, not a fault.
            self._stopped_by_signal(index, f"host {host.host.name}: {event.stopped_by}", signal.SIGTERM)
            return self._lose(index, f"host {host.host.name}: {event.stopped_by}", now, sweep=False)
        if host.hello is None:
            return self._lose(
                index,
                f"host {host.host.label}: the agent did not start{said}; {start_fix(host.host, event.last_words)}",
                now,
                kind=FailureKind.TRANSPORT,
            )
        return self._lose(index, f"host {host.host.name} lost: its agent ended{said}", now)

    def _stopped_by_signal(self, index: int, what: str, signum: int) -> None:
        """A signal on a host's side (scancel signals every step at once) ends the job like one to the head."""
        self.fail(FailureKind.SIGNAL, f"{what}; stopping every host", host=self.hosts[index].host.name, signum=signum)

    def _lose(self, index: int, message: str, now: float, kind: FailureKind = FailureKind.HOST_LOST, sweep: bool = True) -> list[Action]:
        """Nothing more comes from this host: a failure unless the job is ending anyway.

        ``sweep``: the host is likely reachable (its agent died, its SSH session
        dropped), so clean up after the agent; a silent host is left to its
        agent's own heartbeat timeout.
        """
        host = self.hosts[index]
        if host.gone:
            return []  # already lost (by heartbeat, say): its EOF adds nothing
        host.gone = True
        self.fail(kind, message, host=host.host.name)
        # Any rank not seen to exit may be running, or may have started unreported (an agent killed before
        # its first word had forked its ranks already): what they left is found by the job id, not by pid.
        unfinished = any(self.ranks[r.rank].phase is not Phase.EXITED for r in host.plan.ranks)
        self._mark_lost(index, now)
        if not (sweep and unfinished):
            return []
        if self.sweeps:
            return [Sweep(index)]
        return [
            Progress(
                f"cannot sweep {host.host.name}: its backend starts no agents; its ranks die with their agent, but look there "
                f"for processes with LAUNCHER_JOB_ID={self.plan.job_id} in their environment that left their session"
            )
        ]

    def _mark_lost(self, index: int, now: float) -> None:
        for spec in self.hosts[index].plan.ranks:
            state = self.ranks[spec.rank]
            if state.phase is not Phase.EXITED:
                state.phase, state.ended_at = Phase.LOST, now

    # --- where the job is ------------------------------------------------------------------

    def all_in(self, *phases: Phase) -> bool:
        return all(r.phase in phases for r in self.ranks.values())

    @property
    def all_ended(self) -> bool:
        """Every started agent gone and every rank ended (or never started, or stopped for a restart that a stop
        overtook: its agent starts nothing once told to stop)."""
        between = all(r.phase is not Phase.RESTARTING or not r.exit_due for r in self.ranks.values())
        ended = self.all_in(Phase.EXITED, Phase.LOST, Phase.PENDING, Phase.RESTARTING)
        return all(h.gone for h in self.hosts if h.opened) and between and ended

    # --- judgments at the end of a phase -------------------------------------------------------

    def not_ready(self, timeout: float) -> None:
        waiting = [s for s in self.ranks.values() if s.phase is not Phase.READY]
        first = waiting[0]
        last = f"; its last output: {first.output[-1]}" if first.output else "; it printed nothing"
        names = ", ".join(f"rank {s.spec.rank} on {s.spec.host} ({s.phase})" for s in waiting[:8])
        self.fail(
            FailureKind.NOT_READY,
            f"{len(waiting)} ranks not ready after {timeout:g}s: {names}{last}; raise --ready-timeout if they are slow",
            rank=first.spec.rank,
            host=first.spec.host,
        )

    def duplicate_address(self) -> bool:
        """Two hosts reporting one address: every host needs its own (a failure)."""
        owner: dict[str | None, RankState] = {}
        for state in sorted(self.ranks.values(), key=lambda s: s.spec.rank):
            other = owner.setdefault(state.address, state)
            if other.spec.host_index != state.spec.host_index:
                return self.fail(
                    FailureKind.DUPLICATE_ADDRESS,
                    f"hosts {other.spec.host} and {state.spec.host} both report address {state.address}; every host needs "
                    f"its own address (cloned VM, shared VIP, or both on loopback?): "
                    f"set ifname=/cidr= or env:VLLM_NIXL_SIDE_CHANNEL_HOST per host",
                    rank=state.spec.rank,
                    host=state.spec.host,
                )
        return False

    def unreachable(self, state: RankState, port: int, error: str) -> None:
        self.fail(
            FailureKind.UNREACHABLE,
            f"rank {state.spec.rank} on {state.spec.host} listens at {state.address}:{port} but the head cannot reach it ({error})",
            rank=state.spec.rank,
            host=state.spec.host,
        )

    def judge_check(self, matrix: CheckMatrix | None = None) -> None:
        """After the all-pairs check (or the transfer check): a failing pair, or what vLLM's peers would refuse, ends the job."""
        matrix = matrix or self.matrix
        bad = matrix.failures
        if bad:
            first, hosts, pairs = bad[0], matrix.hosts, len(matrix.expected())
            what = "the NIXL transfer check" if matrix.transfer_bytes else "the check"
            self.fail(
                FailureKind.CHECK,
                f"{len(bad)} of {pairs} pairs failed {what}; first: r{first.rank} ({hosts[first.rank]}) -> "
                f"r{first.peer} ({hosts[first.peer]}): {first.error}",
            )
        elif matrix.problems:
            self.fail(FailureKind.CHECK, matrix.problems[0])

    def result(self, duration: float) -> LaunchResult:
        ranks = tuple(
            RankResult(
                rank=s.spec.rank,
                host=s.spec.host,
                address=s.address,
                port=s.spec.port,
                pid=s.pid,
                state=s.phase,
                exit_code=s.exit_code,
                error=s.error,
                started_at=s.started_at,
                ready_at=s.ready_at,
                ended_at=s.ended_at,
                last_output=s.output[-1] if s.output else None,
                rule=s.rule,
            )
            for s in sorted(self.ranks.values(), key=lambda s: s.spec.rank)
        )
        return LaunchResult(
            ranks, self.failure, self.matrix, duration, self.transfers, job_id=self.plan.job_id, restarts=tuple(self.restarts)
        )
