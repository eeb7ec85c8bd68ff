"""The per-host agent: reads its spec on stdin, starts ranks, reports, cleans up.

Run as ``python -m launcher.agent`` by a transport (local subprocess, SSH,
srun). The first stdin line is an ``AgentSpec`` (never argv, so no value shows
in ``ps``); events go to stdout as JSON lines.

The agent holds the job on its host (DESIGN: Lifeline):
- ranks run in their own session/process group with ``PR_SET_PDEATHSIG``, so
  they die with the agent even if it is SIGKILLed;
- the agent is a child subreaper, so grandchildren that detach from their
  rank are re-parented to it and still stopped;
- it stops everything on stdin EOF, on ``Stop``, on SIGTERM/SIGINT/SIGHUP, and
  when the head's heartbeats stop arriving.
"""

from __future__ import annotations

import collections
import ctypes
import os
import platform
import select
import signal
import socket
import sys
import threading
import time

import msgspec
import psutil

from .. import bootstrap, envpolicy, exitcodes, gpus, netif, protocol, rankenv
from ..check import PROBE_CONCURRENCY, path_probes
from ..command import BOOTSTRAP
from ..exitwatch import ExitWatch
from ..probe import foreign_listener, listeners, port_holder, socket_inodes
from ..version import __version__
from ..vllm.flags import vllm_interpreter_hint
from .events import LINE_LIMIT, OUTPUT_BUDGET, EventWriter, read_lines
from .probes import probe_path, probe_peer
from .spawn import PortTaken, RankProcess, close_fds, die_with_parent, spawn_rank
from .teardown import sweep_job, terminate_tree
from .threads import Worker
from .vllm_version import installed_vllm_version, own_vllm_version
from .watch import Next, ReadinessWatch

__all__ = ["LINE_LIMIT", "OUTPUT_BUDGET", "Agent", "main", "probe_peer", "sweep_job", "terminate_tree"]

PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


class Agent:
    def __init__(self, spec: protocol.AgentSpec, stdin, stdout):
        self.spec = spec
        self.stdin = stdin
        self.events = EventWriter(stdout, self.request_stop)
        self.ranks: list[RankProcess] = []
        self.stop_reason: str | None = None
        self.stop_signal = 0
        self._stop = threading.Event()
        self._kill_now = threading.Event()  # the head asked again: no more grace
        self.watch = ExitWatch()  # what the main thread sleeps on: a rank's exit, a stop, a hurry
        self.last_heard = time.monotonic()
        self.facts = rankenv.HostFacts(
            host_is_loopback=spec.host_is_loopback,
            reached_address=spec.reached_address or netif.ssh_server_address(os.environ),
            head_ip=spec.head_ip,
        )
        self.base_env = envpolicy.host_environment(os.environ)
        self._vllm_versions: dict[tuple[str, str], str] = {}
        self._restart_orders: collections.deque[protocol.Restart] = collections.deque()  # from the reader, for the main thread
        self._next_beat = 0.0

    def hello(self) -> protocol.Hello:
        """Who and where this agent is, including the address its ranks will pick."""
        address = error = ""
        if self.spec.ranks:
            first = self.spec.ranks[0]
            env = envpolicy.process_environment(self.base_env, first.environment(), self.facts)
            try:
                request = netif.bind_request(first.identity, self.facts, env.get(netif.EXPLICIT_VAR))
                address = netif.resolve_bind_address(request).address
            except netif.BindAddressError as exc:
                error = str(exc)
        vllm = own_vllm_version()
        return protocol.Hello(
            hostname=socket.gethostname(),
            pid=os.getpid(),
            python=sys.executable,
            version=__version__,
            python_version=platform.python_version(),
            vllm_version=vllm,
            address=address,
            address_error=error,
        )

    # --- start -----------------------------------------------------------

    def start_ranks(self) -> None:
        """Spawn every rank from the main thread, before any other thread exists (for a restart: while the
        agent's own threads wait in reads and writes, holding nothing a child needs).

        PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so
        the forking thread must live as long as the agent; and a preexec_fn is
        only safe while no other thread can hold a lock it takes (prctl through
        ctypes takes none). A built-in core forked at a restart starts in a
        fifth of the time an exec'd one does (scripts/bench_restart.py).
        """
        parent = os.getpid()
        try:
            devices = self._gpu_slices()
            self._check_rpc_port()
        except (gpus.GpuError, PortTaken) as exc:  # before any rank starts: half a job is no job
            for launch in self.spec.ranks:
                self.events.send(protocol.RankError(rank=launch.rank, message=str(exc), fatal=True))
                self.events.send(protocol.Exited(rank=launch.rank, returncode=exitcodes.USAGE))
            self.request_stop(str(exc))
            return
        for launch in self.spec.ranks:
            if launch.rank in devices:
                launch = msgspec.structs.replace(launch, env={**launch.env, "CUDA_VISIBLE_DEVICES": devices[launch.rank]})
            read_fd, write_fd = os.pipe()
            # A built-in core that moves bytes (--transfer) also reads commands from its agent.
            command_read, command_write = os.pipe() if launch.identity.transfer_bytes is not None else (None, None)
            facts = msgspec.structs.replace(self.facts, control_fd=write_fd, command_fd=command_read)
            env = envpolicy.process_environment(self.base_env, launch.environment(), facts)
            argv = [sys.executable if a == "{python}" else a for a in launch.argv]
            prepared = None
            if tuple(launch.argv[: len(BOOTSTRAP)]) == BOOTSTRAP:
                # The bootstrap's work (this host's address, {host_ip}), done here rather than in an interpreter
                # of its own that then execs: that start was most of what a user command's rank cost.
                try:
                    prepared = bootstrap.prepare(argv[len(BOOTSTRAP) :], env)
                except bootstrap.BootstrapError as exc:
                    close_fds(read_fd, write_fd, command_read, command_write)
                    self._not_started(launch.rank, str(exc), exc.code)
                    continue
                argv, env = prepared.argv, prepared.env
            pass_fds = () if prepared else tuple(fd for fd in (write_fd, command_read) if fd is not None)
            try:
                process = spawn_rank(launch, argv, env, pass_fds, lambda: die_with_parent(parent))
            except OSError as exc:
                close_fds(read_fd, write_fd, command_read, command_write)
                if prepared:
                    error = bootstrap.exec_error(exc, argv[0], self.spec.host)
                    self._not_started(launch.rank, str(error), error.code)
                else:
                    self._not_started(launch.rank, f"cannot start {argv[0]!r}: {exc.strerror or exc}", exitcodes.RANK_NOT_FOUND)
                continue
            os.close(write_fd)
            command = None
            if command_read is not None:
                os.close(command_read)
                command = os.fdopen(command_write, "wb", buffering=0)
            self.ranks.append(RankProcess(launch, process, read_fd, command, ReadinessWatch(self.spec.readiness)))
            self.events.send(protocol.Started(rank=launch.rank, pid=process.pid))
            if prepared:
                self.ranks[-1].prepared = prepared.resolved
                self.events.send(prepared.resolved)

    def _not_started(self, rank: int, message: str, code: int) -> None:
        self.events.send(protocol.RankError(rank=rank, message=message))
        self.events.send(protocol.Exited(rank=rank, returncode=code))
        self.request_stop(f"rank {rank} could not start")

    def _check_rpc_port(self) -> None:
        """Two jobs whose DP front ends share a host collide on the RPC port; vLLM would say so only deep in its start."""
        port = self.spec.rpc_port
        holder = port and port_holder(port)
        if holder:
            free = next((p for p in range(port + 1, min(port + 200, 65536)) if not port_holder(p)), None)
            fix = f": give this one --rpc-port {free}" if free else ": give this one another --rpc-port"
            raise PortTaken(
                f"the data-parallel RPC port {port} ({{rpc_port}}) on {self.spec.host} is held by {holder}; two jobs "
                f"whose DP front ends share a host need different RPC ports{fix}"
            )

    def _gpu_slices(self) -> dict[int, str]:
        """CUDA_VISIBLE_DEVICES per rank under --gpus-per-rank, from this host's devices (gpus.discover)."""
        slices: dict[int, str] = {}
        found: gpus.Devices | None = None
        for launch in self.spec.ranks:
            me = launch.identity
            if me.gpus_per_rank is None:
                continue
            if found is None:
                # The host's own variables, or the hostfile's env: for this host, say which devices it offers.
                found = gpus.discover(me.host_gpus, {**self.base_env, **launch.env}, gpus.nvidia_smi_devices)
            slices[launch.rank] = gpus.slice_for(
                found,
                host=self.spec.host,
                local_rank=me.local_rank,
                served=len(launch.ports),
                per_rank=me.gpus_per_rank,
                slots=me.local_size,
            )
        return slices

    def start_threads(self) -> None:
        self._start_rank_threads()
        Worker(self._read_head)

    def _start_rank_threads(self) -> None:
        for rp in self.ranks:
            rp.readers = [
                Worker(self._forward_output, rp, rp.process.stdout, "stdout"),
                Worker(self._forward_output, rp, rp.process.stderr, "stderr"),
                Worker(self._forward_control, rp),
            ]
            if rp.prepared is not None:  # a user command, prepared here: its readiness starts now
                self._on_resolved(rp, rp.prepared)

    # --- threads ---------------------------------------------------------

    def _forward_output(self, rp: RankProcess, stream, name: str) -> None:
        read_lines(stream, lambda raw: self._emit(rp, name, raw))

    def _emit(self, rp: RankProcess, name: str, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace")
        self.events.output(rp.spec.rank, name, line)
        if rp.watch.line(line):
            self._declare_ready(rp)

    def _forward_control(self, rp: RankProcess) -> None:
        with os.fdopen(rp.control_fd, "rb") as pipe:
            for raw in pipe:
                try:
                    message = protocol.decode(raw)
                except protocol.ProtocolError:
                    continue
                wanted = (protocol.Ready, protocol.RankError, protocol.Resolved, protocol.TransferResult)
                if not isinstance(message, wanted) or message.rank != rp.spec.rank:
                    continue
                self.events.send(message)
                if isinstance(message, protocol.Ready):
                    rp.watch.declared(message)  # a built-in core's own word
                elif isinstance(message, protocol.Resolved):
                    self._on_resolved(rp, message)

    def _on_resolved(self, rp: RankProcess, resolved: protocol.Resolved) -> None:
        """A user command's address is known: declare it, watch its rule, or wait for its log line."""
        step = rp.watch.resolve(resolved)
        if step is Next.POLL:
            Worker(self._await_ready, rp)
        elif step is Next.READY:
            self._declare_ready(rp)

    # --- readiness of user commands ---------------------------------------

    def _await_ready(self, rp: RankProcess) -> None:
        """Poll the rank's readiness rule until it holds, the rank ends, or we stop."""
        while not self._stop.is_set() and rp.process.poll() is None:
            rule = self.spec.readiness
            if rule.probe(rp.watch.resolved.address, ports=rp.spec.ports, port=rp.spec.port, rank=rp.spec.rank):
                held = self._ports_held_elsewhere(rp) if rule.owns_ports else None
                if held:
                    self._fail_rank(rp, held)
                elif rp.watch.probe_held():
                    self._declare_ready(rp)
                return
            self._stop.wait(0.2)

    def _ports_held_elsewhere(self, rp: RankProcess) -> str | None:
        """Why a side-channel port that accepts connections is not the rank's own, if it is not.

        vLLM 0.32 waits forever for a listener that failed to bind (another
        program holds its port), so a connect alone would call a hung vLLM
        ready. The rank's tree must hold the listening socket itself; a port
        whose holder cannot be proven (another user's) is not the rank's.
        """
        tree = _tree(rp.process.pid)
        if not tree:
            return None  # the rank is gone: its exit tells
        problem = foreign_listener(rp.watch.resolved.address, rp.spec.ports, tree)
        if problem is None:
            return None
        return (
            f"side-channel {problem}, not by this rank, so its vLLM cannot bind it, and vLLM then waits for its "
            f"listener forever; stop what holds the port or move this job's ports with --port-base"
        )

    def _fail_rank(self, rp: RankProcess, message: str) -> None:
        """A rank that can never become ready: the head ends the job with this reason."""
        self.events.send(protocol.RankError(rank=rp.spec.rank, message=message, fatal=True))

    def _declare_ready(self, rp: RankProcess) -> None:
        """Say a user command's rank is ready (its watch said so, once)."""
        resolved = rp.watch.resolved
        ready = protocol.Ready(
            rank=rp.spec.rank,
            address=resolved.address,
            port=rp.spec.port,
            pid=rp.process.pid,
            rule=resolved.rule,
            engine_id=rp.spec.engine_id,
            vllm_version=self._vllm_version(rp),
        )
        rp.watch.declared(ready)
        self.events.send(ready)

    def _vllm_version(self, rp: RankProcess) -> str:
        """The version of the vLLM a rank's command runs (the check picks its wire by it), cached per command."""
        hint = vllm_interpreter_hint(rp.spec.argv)
        if hint is None:
            return ""
        if hint not in self._vllm_versions:
            self._vllm_versions[hint] = installed_vllm_version(hint, {**self.base_env, **rp.spec.environment()})
        return self._vllm_versions[hint]

    def _read_head(self) -> None:
        for raw in iter(self.stdin.readline, b""):
            self.last_heard = time.monotonic()
            try:
                message = protocol.decode(raw)
            except protocol.ProtocolError as exc:
                self.events.send(protocol.AgentError(message=str(exc)))
                continue
            if isinstance(message, protocol.Stop):
                self.request_stop(message.reason or "stopped by the head")
                if message.now:
                    self._kill_now.set()
                    self.watch.wake()
            elif isinstance(message, protocol.Restart):
                self._restart_orders.append(message)  # the main thread spawns, as at the start
                self.watch.wake()
            elif isinstance(message, protocol.Check):
                Worker(self._run_check, message)
            elif isinstance(message, protocol.TransferCheck):
                self._pass_on(message)
        self.request_stop("the head closed the connection (stdin EOF)")

    def _run_check(self, check: protocol.Check) -> None:
        """Probe the peers from my ranks' addresses: each network path once (ranks that share an address
        share their paths), the result reported for every rank on it. A full check probes each destination's
        listeners from one address at least, not from every address (``check.path_probes``); a sampled one,
        the pairs it names."""
        from concurrent.futures import ThreadPoolExecutor  # here: it loads logging, ~2 ms of every agent's start

        sources: dict[str, list[protocol.Ready]] = collections.defaultdict(list)
        for rp in self.ranks:
            if rp.watch.ready:
                sources[rp.watch.ready.address].append(rp.watch.ready)
        peers = {p.rank: p for p in check.peers}
        if check.pairs is None:
            plan = path_probes(check.peers, list(sources))
            tasks = [(sources[s], [peers[r] for r in first], [peers[r] for r in rest]) for (s, _), (first, rest) in plan.items()]
        else:
            wanted = set(check.pairs)
            tasks = []
            for ready_on in sources.values():
                for peer in check.peers:
                    mine = [m for m in ready_on if (m.rank, peer.rank) in wanted]
                    if mine:
                        tasks.append((mine, [peer], []))
        with ThreadPoolExecutor(max_workers=PROBE_CONCURRENCY) as pool:
            done = pool.map(lambda task: probe_path(task[0][0], task[1], task[2], check.timeout), tasks)
            for (mine, _, _), results in zip(tasks, done, strict=True):
                for result in results:
                    self.events.send(msgspec.structs.replace(result, rank=mine[0].rank, also=[m.rank for m in mine[1:]]))

    def _pass_on(self, command: protocol.TransferCheck) -> None:
        """To every ready built-in core of this host: it reads its peers itself (its NIXL agent does)."""
        line = protocol.encode(command)
        for rp in self.ranks:
            if rp.watch.ready is None:
                continue
            if rp.command is None:
                why = "it runs no NIXL agent (a user command, or the job was planned without --transfer)"
                for peer in command.peers:
                    self.events.send(protocol.TransferResult(rank=rp.spec.rank, peer=peer.rank, ok=False, error=why))
                continue
            try:
                rp.command.write(line)
            except OSError:
                pass  # the rank is gone: its exit tells

    # --- supervise -------------------------------------------------------

    def request_stop(self, reason: str, signum: int = 0) -> None:
        if self.stop_reason is None:
            self.stop_reason, self.stop_signal = reason, signum
        self._stop.set()
        self.watch.wake()

    def supervise(self) -> None:
        """Report exits, exchange heartbeats, until asked to stop; a rank's exit or a stop wakes it at once."""
        for rp in self.ranks:
            self.watch.watch(rp.process.pid)
        while not self._stop.is_set():
            self._report_exits()
            if self._restart_orders:
                self._restart(self._restart_orders.popleft())
                continue
            self._idle(self.spec.heartbeat_interval)
        # Before any exit it causes: the head then knows those exits are not the cause.
        self.events.send(protocol.Stopping(reason=self.stop_reason or "stopping", signal=self.stop_signal))
        self.shutdown()

    def _idle(self, seconds: float) -> None:
        """Heartbeat when due, judge the head's silence, then sleep up to ``seconds`` (a rank's exit, a stop,
        a restart order wakes it)."""
        now = time.monotonic()
        if now >= self._next_beat:
            self.events.send(protocol.Heartbeat())
            self._next_beat = now + self.spec.heartbeat_interval
        silent = now - self.last_heard
        if silent > self.spec.heartbeat_timeout and not _readable(self.stdin):  # bytes waiting: the head spoke
            self.request_stop(f"no word from the head for {silent:.0f}s (heartbeat timeout)")
        clock = self.spec.heartbeat_interval if self.watch.precise else 0.05  # without pidfds, exits are polled
        self.watch.wait(min(seconds, clock, max(0.0, self._next_beat - now)))

    # --- restart (--restart on-failure): the same ranks, new processes, this agent and its connection kept ---

    def _restart(self, order: protocol.Restart) -> None:
        """Stop every rank, wait out the backoff and the ports they held, start them again."""
        held = self._listening_ports()  # before they go: what the new processes must find free
        terminate_tree([rp.process for rp in self.ranks], self.spec.grace, hurry=self._kill_now, pause=self._idle)
        self._report_exits()
        deadline = time.monotonic() + order.delay
        while not self._stop.is_set() and time.monotonic() < deadline:
            self._idle(deadline - time.monotonic())
        problem = self._await_ports(held, seconds=max(10.0, self.spec.grace))
        if self._stop.is_set():
            return  # a stop overtook the restart: nothing starts
        if problem:
            for launch in self.spec.ranks:
                self.events.send(protocol.RankError(rank=launch.rank, message=problem, fatal=True))
            self.request_stop(problem)
            return
        self.ranks = []
        self.start_ranks()
        self._start_rank_threads()
        for rp in self.ranks:
            self.watch.watch(rp.process.pid)

    def _listening_ports(self) -> set[tuple[str, int]]:
        """The addresses and ports the ranks' process trees listen on (from /proc: no process table scan)."""
        mine = socket_inodes(set().union(*(_tree(rp.process.pid) for rp in self.ranks)))
        return {(item.address, item.port) for item in listeners() if item.inode in mine}

    def _await_ports(self, ports: set[tuple[str, int]], seconds: float) -> str | None:
        """None once nobody listens on ``ports`` (the old processes' addresses and ports); else who still holds one.
        By address: on a host with several addresses, another job's rank may hold the same port on another."""
        deadline = time.monotonic() + seconds
        while True:
            listening = listeners()  # one read of /proc/net/tcp a look, for every port
            held = [(address, port) for address, port in sorted(ports) if _held(address, port, listening)]
            if not held or self._stop.is_set():
                return None
            if time.monotonic() >= deadline:
                address, port = held[0]
                holder = port_holder(port, address) or "a process this agent cannot name"
                return (
                    f"cannot restart on {self.spec.host}: port {port}, which the stopped rank held, is still held by {holder} "
                    f"after {seconds:g}s; stop it, or move the job's ports"
                )
            self._idle(0.05)

    def _report_exits(self) -> None:
        for rp in self.ranks:
            if not rp.reported_exit and rp.process.poll() is not None:
                # Its last output and error first; but a grandchild that kept the
                # rank's stdout open would hold the pipes forever: half a second in all.
                deadline = time.monotonic() + 0.5
                for reader in rp.readers:
                    reader.join(timeout=max(0.0, deadline - time.monotonic()))
                rp.reported_exit = True
                self.events.send(protocol.Exited(rank=rp.spec.rank, returncode=rp.process.returncode), after_output=True)

    def shutdown(self) -> None:
        """SIGTERM every rank's group and descendant, SIGKILL after the grace period."""
        terminate_tree([rp.process for rp in self.ranks], self.spec.grace, hurry=self._kill_now, pause=self.watch.wait)
        self._report_exits()


def _tree(pid: int) -> set[int]:
    """A rank and every descendant of it; empty once it is gone."""
    try:
        return {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
    except psutil.Error:
        return set()


def _held(address: str, port: int, listening) -> bool:
    """Whether one of ``listening`` is on ``port`` where a listener at ``address`` would collide with it."""
    wildcards = ("0.0.0.0", "::")
    return any(item.port == port and (item.address in (address, *wildcards) or address in wildcards) for item in listening)


def _readable(stream) -> bool:
    try:
        return bool(select.select([stream], [], [], 0)[0])
    except (OSError, ValueError):
        return False


def main() -> int:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but protocol lines may reach the head on stdout
    line = stdin.readline()
    if not line:
        return 0
    try:
        spec = protocol.decode(line)
    except protocol.ProtocolError as exc:
        print(f"launcher agent: {exc}", file=sys.stderr)
        return 2
    if isinstance(spec, protocol.Sweep):
        writer = EventWriter(stdout, lambda _reason: None)
        writer.send(protocol.Swept(pids=sweep_job(spec.job_id)))
        writer.start()
        writer.close()
        stdout.flush()
        os._exit(0)  # at once: the head waits for this exit
    if isinstance(spec, protocol.AgentError):  # the head refused this agent (a join with the wrong token, say)
        print(f"launcher agent: {spec.message}", file=sys.stderr)
        return 2
    if not isinstance(spec, protocol.AgentSpec):
        print(f"launcher agent: expected an agent spec first, got {type(spec).__name__}", file=sys.stderr)
        return 2
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
    agent = Agent(spec, stdin, stdout)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda s, _f: agent.request_stop(f"agent received {signal.Signals(s).name}", s))
    agent.events.send(agent.hello())
    agent.start_ranks()
    agent.events.start()  # the first thread: every rank is forked by now
    agent.start_threads()
    agent.supervise()
    agent.events.close()
    # Leave without interpreter finalisation: the stdin reader thread may still
    # be blocked in readline (a silent head), and CPython aborts (SIGABRT) when
    # it finalises a buffered stream a daemon thread holds.
    try:
        stdout.flush()
    except OSError:
        pass
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
