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

import _thread
import collections
import ctypes
import os
import platform
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import msgspec
import psutil

from . import bootstrap, envpolicy, forked, gpus, netif, protocol, rankenv, readiness, wire
from .check import PROBE_CONCURRENCY
from .command import BOOTSTRAP, BUILTIN_ENGINE, vllm_interpreter_hint
from .exitwatch import ExitWatch
from .probe import ProbeError, foreign_listener, port_holder, tcp_connect
from .version import __version__

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


class RankProcess(msgspec.Struct):
    spec: protocol.RankLaunch
    process: subprocess.Popen | forked.ForkedProcess
    control_fd: int
    command: object | None = None  # a built-in core's command pipe (the transfer check), a binary file
    ready: protocol.Ready | None = None
    resolved: protocol.Resolved | None = None  # a user command's address, from its bootstrap
    log_matched: bool = False
    reported_exit: bool = False
    readers: list[Worker] = msgspec.field(default_factory=list)


LINE_LIMIT = 64 * 1024  # a rank's output line is cut here: a line without end never costs more
OUTPUT_BUDGET = 4 * 1024 * 1024  # bytes of rank output queued for the head before the ranks wait
_LINE_END = re.compile(rb"\r\n|\r|\n")  # \r too: a progress bar's redraws arrive as they happen


class EventWriter:
    """The agent's one writer to the head: control messages ahead of rank output.

    Control messages (hello, ready, exits, heartbeats, check results) are few
    and go first, in order. Rank output is bounded (``OUTPUT_BUDGET``): when
    the link to the head cannot keep up, the reader of that rank's output
    waits, so the rank waits on its stdout as it would under ssh, and no line
    is lost on the way to the head's --log-dir (the head's terminal may drop
    lines; its log never does). A heartbeat waits behind at most the one line
    being written, whatever a rank prints. Messages queue until ``start``:
    ranks are forked from a process with no other thread.
    """

    def __init__(self, stream, on_broken):
        self._stream, self._on_broken = stream, on_broken
        self._control: collections.deque = collections.deque()
        self._output: collections.deque = collections.deque()
        self._output_bytes = 0
        self._ready = threading.Condition()
        self._broken = False

    def send(self, message, after_output: bool = False) -> None:
        """Queue a control message: ahead of rank output, or (``after_output``) behind what is queued of it,
        as a rank's exit must follow its last lines (the head quotes them when the exit is a failure)."""
        data = protocol.encode(message)
        with self._ready:
            if after_output and self._output:
                self._output.append(data)
                self._output_bytes += len(data)
            else:
                self._control.append(data)
            self._ready.notify()

    def output(self, rank: int, stream: str, line: str) -> None:
        """Queue a line of a rank's output; waits while the budget is spent (the rank then waits on its stdout)."""
        data = protocol.encode(protocol.Output(rank=rank, stream=stream, line=line))
        with self._ready:
            while self._output_bytes and self._output_bytes + len(data) > OUTPUT_BUDGET and not self._broken:
                self._ready.wait(0.5)
            if self._broken:
                return
            self._output.append(data)
            self._output_bytes += len(data)
            self._ready.notify()

    def start(self) -> None:
        Worker(self._write)

    def close(self, timeout: float = 2.0) -> None:
        """Until what is queued is written (control first), or ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while (self._control or self._output) and not self._broken and time.monotonic() < deadline:
                self._ready.wait(0.05)

    def _next(self) -> bytes:
        with self._ready:
            while True:
                if self._control:
                    return self._control.popleft()
                if self._output:
                    data = self._output.popleft()
                    self._output_bytes -= len(data)
                    self._ready.notify_all()  # a rank's reader may be waiting for room
                    return data
                self._ready.notify_all()  # close() may be waiting for an empty queue
                self._ready.wait()

    def _write(self) -> None:
        while True:
            data = self._next()
            try:
                self._stream.write(data)
                self._stream.flush()
            except (BrokenPipeError, OSError, ValueError):
                with self._ready:
                    self._broken = True
                    self._ready.notify_all()
                self._on_broken("the head's connection is closed")
                return


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
        self._ready_lock = threading.Lock()
        self._vllm_versions: dict[tuple[str, str], str] = {}

    def hello(self) -> protocol.Hello:
        """Who and where this agent is, including the address its ranks will pick."""
        address = error = ""
        if self.spec.ranks:
            env = envpolicy.process_environment(self.base_env, self.spec.ranks[0].env, self.facts)
            try:
                request = netif.bind_request(rankenv.RankIdentity.from_env(env), self.facts, env.get(netif.EXPLICIT_VAR))
                address = netif.resolve_bind_address(request).address
            except (netif.BindAddressError, rankenv.RankEnvError) as exc:
                error = str(exc)
        vllm = _own_vllm_version()
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
        """Spawn every rank from the main thread, before any other thread exists.

        PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so
        the forking thread must live as long as the agent; and a preexec_fn is
        only safe while no other thread can hold a lock.
        """
        parent = os.getpid()
        try:
            devices = self._gpu_slices()
            self._check_rpc_port()
        except (gpus.GpuError, PortTaken) as exc:  # before any rank starts: half a job is no job
            for launch in self.spec.ranks:
                self.events.send(protocol.RankError(rank=launch.rank, message=str(exc), fatal=True))
                self.events.send(protocol.Exited(rank=launch.rank, returncode=2))
            self.request_stop(str(exc))
            return
        for launch in self.spec.ranks:
            if launch.rank in devices:
                launch = msgspec.structs.replace(launch, env={**launch.env, "CUDA_VISIBLE_DEVICES": devices[launch.rank]})
            read_fd, write_fd = os.pipe()
            # A built-in core that moves bytes (--transfer) also reads commands from its agent.
            command_read, command_write = os.pipe() if rankenv.RankIdentity.NAMES["transfer_bytes"] in launch.env else (None, None)
            facts = msgspec.structs.replace(self.facts, control_fd=write_fd, command_fd=command_read)
            env = envpolicy.process_environment(self.base_env, launch.env, facts)
            argv = [sys.executable if a == "{python}" else a for a in launch.argv]
            prepared = None
            if tuple(launch.argv[: len(BOOTSTRAP)]) == BOOTSTRAP:
                # The bootstrap's work (this host's address, {host_ip}), done here rather than in an interpreter
                # of its own that then execs: that start was most of what a user command's rank cost.
                try:
                    prepared = bootstrap.prepare(argv[len(BOOTSTRAP) :], env)
                except bootstrap.BootstrapError as exc:
                    _close(read_fd, write_fd, command_read, command_write)
                    self._not_started(launch.rank, str(exc), exc.code)
                    continue
                argv, env = prepared.argv, prepared.env
            pass_fds = () if prepared else tuple(fd for fd in (write_fd, command_read) if fd is not None)
            try:
                process = self._spawn(launch, argv, env, pass_fds, lambda: _die_with_parent(parent))
            except OSError as exc:
                _close(read_fd, write_fd, command_read, command_write)
                if prepared:
                    error = bootstrap.exec_error(exc, argv[0], self.spec.host)
                    self._not_started(launch.rank, str(error), error.code)
                else:
                    self._not_started(launch.rank, f"cannot start {argv[0]!r}: {exc.strerror or exc}", 127)
                continue
            os.close(write_fd)
            command = None
            if command_read is not None:
                os.close(command_read)
                command = os.fdopen(command_write, "wb", buffering=0)
            self.ranks.append(RankProcess(launch, process, read_fd, command))
            self.events.send(protocol.Started(rank=launch.rank, pid=process.pid))
            if prepared:
                self.ranks[-1].resolved = prepared.resolved
                self.events.send(prepared.resolved)

    @staticmethod
    def _spawn(launch: protocol.RankLaunch, argv: list[str], env: dict[str, str], pass_fds, in_child):
        """A built-in core is forked from this process (its code is loaded once, here); anything else is exec'd."""
        if tuple(launch.argv) == BUILTIN_ENGINE and forked.same_code(os.environ, env) and forked.supported():
            from . import engine_core

            return forked.spawn(engine_core.main, argv, env, pass_fds, in_child)
        return subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
            start_new_session=True,
            preexec_fn=in_child,
        )

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
            if rankenv.RankIdentity.NAMES["gpus_per_rank"] not in launch.env:
                continue
            try:
                me = rankenv.RankIdentity.from_env(launch.env)
            except rankenv.RankEnvError as exc:
                raise gpus.GpuError(f"--gpus-per-rank on {self.spec.host}: {exc}") from None
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
        for rp in self.ranks:
            rp.readers = [
                Worker(self._forward_output, rp, rp.process.stdout, "stdout"),
                Worker(self._forward_output, rp, rp.process.stderr, "stderr"),
                Worker(self._forward_control, rp),
            ]
            if rp.resolved is not None:  # a user command, prepared here: its readiness starts now
                self._on_resolved(rp)
        Worker(self._read_head)

    # --- threads ---------------------------------------------------------

    def _forward_output(self, rp: RankProcess, stream, name: str) -> None:
        """Read a rank's stream in chunks: lines end at \\n, \\r\\n or \\r, and are cut at LINE_LIMIT."""
        fd, pending = stream.fileno(), b""
        while True:
            try:
                chunk = os.read(fd, LINE_LIMIT)
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk
            start = 0
            for end in _LINE_END.finditer(pending):
                self._emit(rp, name, pending[start : end.start()])
                start = end.end()
            pending = pending[start:]
            while len(pending) >= LINE_LIMIT:
                self._emit(rp, name, pending[:LINE_LIMIT])
                pending = pending[LINE_LIMIT:]
        if pending:
            self._emit(rp, name, pending)
        stream.close()

    def _emit(self, rp: RankProcess, name: str, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace")
        self.events.output(rp.spec.rank, name, line)
        if isinstance(self.spec.readiness, readiness.Log) and not rp.log_matched and self.spec.readiness.matches(line):
            rp.log_matched = True
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
                    rp.ready = message
                elif isinstance(message, protocol.Resolved):
                    rp.resolved = message
                    self._on_resolved(rp)

    def _on_resolved(self, rp: RankProcess) -> None:
        """A user command's address is known: watch its readiness rule."""
        if self.spec.readiness.polled:
            Worker(self._await_ready, rp)
        else:
            self._declare_ready(rp)  # log: once the line is seen too

    # --- readiness of user commands ---------------------------------------

    def _await_ready(self, rp: RankProcess) -> None:
        """Poll the rank's readiness rule until it holds, the rank ends, or we stop."""
        while not self._stop.is_set() and rp.process.poll() is None:
            rule = self.spec.readiness
            if rule.probe(rp.resolved.address, ports=rp.spec.ports, port=rp.spec.port, rank=rp.spec.rank):
                held = self._ports_held_elsewhere(rp) if rule.owns_ports else None
                if held:
                    self._fail_rank(rp, held)
                else:
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
        try:
            tree = {rp.process.pid, *(c.pid for c in psutil.Process(rp.process.pid).children(recursive=True))}
        except psutil.Error:
            return None  # the rank is gone: its exit tells
        problem = foreign_listener(rp.resolved.address, rp.spec.ports, tree)
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
        """Ready once its address is known and its rule holds (log: both may come in either order)."""
        with self._ready_lock:
            if rp.ready is not None or rp.resolved is None or (isinstance(self.spec.readiness, readiness.Log) and not rp.log_matched):
                return
            rp.ready = protocol.Ready(
                rank=rp.spec.rank,
                address=rp.resolved.address,
                port=rp.spec.port,
                pid=rp.process.pid,
                rule=rp.resolved.rule,
                engine_id=rp.spec.engine_id,
                vllm_version=self._vllm_version(rp),
            )
        self.events.send(rp.ready)

    def _vllm_version(self, rp: RankProcess) -> str:
        """The version of the vLLM a rank's command runs (the check picks its wire by it), cached per command."""
        hint = vllm_interpreter_hint(rp.spec.argv)
        if hint is None:
            return ""
        if hint not in self._vllm_versions:
            self._vllm_versions[hint] = installed_vllm_version(hint, {**self.base_env, **rp.spec.env})
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
            elif isinstance(message, protocol.Check):
                Worker(self._run_check, message)
            elif isinstance(message, protocol.TransferCheck):
                self._pass_on(message)
        self.request_stop("the head closed the connection (stdin EOF)")

    def _run_check(self, check: protocol.Check) -> None:
        """Probe the peers from my ranks' addresses: each network path once (ranks that share an address
        share their paths), the result reported for every rank on it."""
        wanted = set(check.pairs) if check.pairs is not None else None
        paths: dict[tuple[str, int], list[protocol.Ready]] = collections.defaultdict(list)
        for rp in self.ranks:
            for peer in check.peers:
                if rp.ready and (wanted is None or (rp.spec.rank, peer.rank) in wanted):
                    paths[(rp.ready.address, peer.rank)].append(rp.ready)
        peers = {p.rank: p for p in check.peers}
        from concurrent.futures import ThreadPoolExecutor  # here: it loads logging, ~2 ms of every agent's start

        with ThreadPoolExecutor(max_workers=PROBE_CONCURRENCY) as pool:
            probed = pool.map(lambda path: probe_peer(paths[path][0], peers[path[1]], check.timeout), list(paths))
            for path, result in zip(list(paths), probed, strict=True):
                for mine in paths[path]:
                    self.events.send(msgspec.structs.replace(result, rank=mine.rank))

    def _pass_on(self, command: protocol.TransferCheck) -> None:
        """To every ready built-in core of this host: it reads its peers itself (its NIXL agent does)."""
        line = protocol.encode(command)
        for rp in self.ranks:
            if rp.ready is None:
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
        clock = self.spec.heartbeat_interval if self.watch.precise else 0.05  # without pidfds, exits are polled
        next_beat = 0.0
        while not self._stop.is_set():
            self._report_exits()
            now = time.monotonic()
            if now >= next_beat:
                self.events.send(protocol.Heartbeat())
                next_beat = now + self.spec.heartbeat_interval
            silent = now - self.last_heard
            if silent > self.spec.heartbeat_timeout and not _readable(self.stdin):  # bytes waiting: the head spoke
                self.request_stop(f"no word from the head for {silent:.0f}s (heartbeat timeout)")
            self.watch.wait(min(clock, max(0.0, next_beat - now)))
        # Before any exit it causes: the head then knows those exits are not the cause.
        self.events.send(protocol.Stopping(reason=self.stop_reason or "stopping", signal=self.stop_signal))
        self.shutdown()

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


def probe_peer(mine: protocol.Ready, peer: protocol.Peer, timeout: float) -> protocol.CheckResult:
    """Probe every side-channel port of ``peer`` from ``mine``'s address: a handshake of the peer's wire, or a TCP connect."""
    from .sidechannel import HandshakeError, handshake  # ZMQ: for a check only, not on every agent's start

    latencies, engines = [], []
    try:
        for port in peer.ports:
            if peer.wire == wire.TCP:  # safe against any listener, a real vLLM's included
                latencies.append(tcp_connect(peer.address, port, timeout, source=mine.address))
                continue
            done = handshake(peer.address, port, wire.generation(peer.wire), timeout=timeout, source=mine.address)
            meta, got_hash = done.reply.metadata, done.reply.compat_hash or ""
            where = f"{peer.address}:{port}"
            if peer.expect_hash is not None and got_hash and got_hash != peer.expect_hash:  # "": no hash on this wire
                raise HandshakeError(f"{where}: compatibility hash mismatch (another job's engine is listening there)")
            if peer.expect_engine_id is not None and meta.engine_id != peer.expect_engine_id:
                raise HandshakeError(f"{where}: engine ID mismatch: expected {peer.expect_engine_id}, got {meta.engine_id}")
            latencies.append(done.latency_ms)
            engines.append(protocol.EngineSeen(port=port, engine_id=meta.engine_id, compat_hash=got_hash))
    except (HandshakeError, ProbeError, wire.WireError) as exc:
        return protocol.CheckResult(rank=mine.rank, peer=peer.rank, ok=False, error=str(exc))
    return protocol.CheckResult(rank=mine.rank, peer=peer.rank, ok=True, latency_ms=round(max(latencies), 3), engines=engines)


def _own_vllm_version() -> str:
    """This interpreter's vLLM, if it has one (importlib.metadata only then: it costs more to import than to ask)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return ""
    import importlib.metadata

    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return ""


def installed_vllm_version(hint: tuple[str, str], env: dict[str, str]) -> str:
    """Ask the interpreter behind a vLLM command which vLLM it has, without importing vLLM (tens of ms)."""
    kind, name = hint
    path = shutil.which(name, path=env.get("PATH"))
    if path is None:
        return ""
    if kind == "script":  # vLLM's console script: its interpreter is on the #! line
        try:
            with open(path, "rb") as f:
                first = f.readline(512).decode("utf-8", "replace")
        except OSError:
            return ""
        words = first[2:].split() if first.startswith("#!") else []
        if not words:
            return ""
        path = shutil.which(words[1], path=env.get("PATH")) if os.path.basename(words[0]) == "env" and len(words) > 1 else words[0]
        if path is None:
            return ""
    try:
        done = subprocess.run(
            [path, "-c", "import importlib.metadata as m; print(m.version('vllm'))"],
            capture_output=True,
            text=True,
            timeout=20,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


class PortTaken(Exception):
    """A port the job needs is held by another process; the message names it and the fix."""


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def terminate_tree(processes: list, grace: float, hurry: threading.Event | None = None, pause=None) -> None:
    """Stop these processes, their groups and every descendant of this process.

    SIGTERM, then SIGKILL after ``grace`` seconds, or as soon as ``hurry`` is set.
    ``pause(seconds)`` sleeps between looks (an ``ExitWatch`` ends it at an exit).
    """
    if _all_gone(processes):
        return  # the usual end of a finished job: nothing to signal, and no process table to scan (~3 ms)
    me = psutil.Process()
    hurry = hurry or threading.Event()
    pause = pause or hurry.wait
    _signal_all(processes, me, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not hurry.is_set():
        _reap_exited(processes)
        if _all_gone(processes):
            return
        pause(0.05)
    _signal_all(processes, me, signal.SIGKILL)
    for p in processes:
        p.wait()
    psutil.wait_procs(me.children(recursive=True), timeout=2.0)
    _reap_exited(processes)


def _all_gone(processes) -> bool:
    """Whether every one of ``processes`` has exited and this process has no child left, running or
    unreaped. A descendant whose parent has died is re-parented to us (the subreaper), so no child means
    no descendant: one waitid, where psutil's children(recursive=True) reads every process's stat."""
    if any(p.poll() is None for p in processes):
        return False
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return False


def _signal_all(processes, me: psutil.Process, signum: int) -> None:
    """Each rank's group, then every descendant outside those groups (one that left its group).

    Once each: a second SIGTERM can land after a rank's handler has run and
    its interpreter, shutting down, has restored the default action.
    """
    groups = set()
    for p in processes:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signum)  # the rank is its group's leader
                groups.add(p.pid)
            except ProcessLookupError:
                pass
    for child in me.children(recursive=True):
        try:
            if os.getpgid(child.pid) not in groups:
                child.send_signal(signum)
        except (psutil.Error, ProcessLookupError):
            pass


def _reap_exited(processes) -> None:
    """Collect every exited child: a rank through its Popen (which keeps its exit code), anything else
    (a descendant re-parented to us, the subreaper) directly. waitid names an exited child without
    reaping it, so this costs no scan of /proc: the agent wakes at each rank's exit, and a scan a
    wake-up was most of a teardown's CPU on a host with hundreds of processes."""
    ranks = {p.pid: p for p in processes}
    asked: set[int] = set()
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None:
            return
        if info.si_pid in ranks:
            if info.si_pid in asked or ranks[info.si_pid].poll() is None:
                return  # another thread holds its Popen, and reaps it
            asked.add(info.si_pid)
        else:
            try:
                os.waitpid(info.si_pid, os.WNOHANG)
            except ChildProcessError:
                pass


def sweep_job(job_id: str) -> list[int]:
    """SIGKILL every process of this user on this host that carries ``LAUNCHER_JOB_ID=job_id``.

    The head's second line of defence after it lost an agent (SIGKILLed, or its
    host cut off): the agent's ranks died with it (PR_SET_PDEATHSIG), but what
    they started in sessions of their own did not. They are found by the job
    id in their environment (inherited from the rank; 64 random bits), never by
    name, and only among this user's processes in this host's network namespace:
    an id is no credential, and another user's process that carries it (run as
    root, the sweep could reach it) is not this job's; a process in another
    network namespace is another host's (a container's, or a test host's).
    """
    found, me, here = [], os.getuid(), _netns(os.getpid())
    for proc in psutil.process_iter(["pid", "uids"]):
        if proc.pid == os.getpid() or proc.info["uids"] is None or proc.info["uids"].real != me or _netns(proc.pid) != here:
            continue
        try:
            if proc.environ().get(rankenv.JOB_ID_VAR) == job_id:
                proc.kill()
                found.append(proc)
        except psutil.Error:
            continue
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and not all(_dead(p) for p in found):
        time.sleep(0.02)
    return [p.pid for p in found]


def _netns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _dead(proc: psutil.Process) -> bool:
    """Gone, or a zombie: dead, waiting for its parent to reap it (which is not ours to wait for)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _die_with_parent(parent: int) -> None:
    """In the child, first: SIGKILL me when the agent dies."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the agent died before prctl took effect
        os._exit(1)


def _readable(stream) -> bool:
    try:
        return bool(select.select([stream], [], [], 0)[0])
    except (OSError, ValueError):
        return False


class Worker:
    """A daemon thread whose start does not wait for it to run.

    ``threading.Thread.start`` waits for the new thread's first time slice:
    about 4 ms each on a host whose CPUs are busy starting its ranks, and
    the agent starts three threads a rank (20 ms at two ranks, before it
    watched its first exit). The agent ends with ``os._exit``, so nothing
    needs threading's registry of threads.
    """

    def __init__(self, target, *args):
        self._done = threading.Event()
        _thread.start_new_thread(self._run, (target, args))

    def _run(self, target, args) -> None:
        try:
            target(*args)
        finally:
            self._done.set()

    def join(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)


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
