"""What a person sees: progress on stderr, tables and prefixed output on stdout."""

from __future__ import annotations

import collections
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TextIO

from .. import envpolicy
from ..check import CheckMatrix, render_matrix
from ..command import render_argv
from ..head.job import RankState
from ..head.reporter import Reporter
from ..plan import Host, LaunchPlan, RankSpec
from ..results import EXIT_STDOUT_CLOSED, LaunchResult
from .documents import plan_document
from .table import format_table


def rank_span(spec: RankSpec) -> tuple[str, str]:
    """("0", "5600") for one DP rank; ("0-1", "5600-5601") for a process serving several."""
    ports = spec.ports
    if len(ports) == 1:
        return str(spec.rank), str(ports[0])
    return f"{spec.rank}-{spec.rank + len(ports) - 1}", f"{ports[0]}-{ports[-1]}"


class LogDirError(ValueError):
    """A --log-dir that is not safe to write rank output to; str() names it and the fix."""


def prepare_log_dir(path: str) -> str:
    """Create ``path`` (0700) or check it: ours, not writable by group or others (rank output can hold secrets)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as exc:
        raise LogDirError(f"--log-dir {path}: {exc.strerror or exc}; give a directory you can create") from None
    if not stat.S_ISDIR(st.st_mode):
        raise LogDirError(f"--log-dir {path} is not a directory")
    if st.st_uid != os.getuid():
        raise LogDirError(f"--log-dir {path} belongs to another user (uid {st.st_uid}); use a directory of your own")
    if st.st_mode & 0o022:
        raise LogDirError(f"--log-dir {path} is writable by group or others (mode {st.st_mode & 0o777:o}); chmod 700 it or use another")
    return path


def _open_log(path: str) -> TextIO:
    """Append-only, 0600, never through a symlink someone left in the directory."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "a", encoding="utf-8", errors="replace")


class _Printer:
    """One stream's writer thread behind a bounded queue: the stream may stop reading, the caller never waits."""

    def __init__(self, stream: TextIO, name: str, capacity: int, on_closed):
        self.stream, self.name, self.capacity, self.on_closed = stream, name, capacity, on_closed
        self.closed = False
        self._queue: collections.deque = collections.deque()
        self._droppable = 0
        self._dropped = 0
        self._ready = threading.Condition()
        self._writer: threading.Thread | None = None  # started by the first line: until then the head may fork

    def put(self, text: str, droppable: bool) -> None:
        with self._ready:
            if self.closed:
                return
            if self._writer is None:
                self._writer = threading.Thread(target=self._loop, daemon=True, name=f"print-{self.name}")
                self._writer.start()
            if droppable:
                if self._droppable >= self.capacity:
                    self._dropped += 1
                    return
                self._droppable += 1
            self._queue.append((text, droppable))
            self._ready.notify()

    def drain(self, deadline: float) -> bool:
        with self._ready:
            while self._queue and not self.closed and time.monotonic() < deadline:
                self._ready.wait(0.05)
            return not self._queue

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.notify_all()
                    self._ready.wait()
                text, droppable = self._queue.popleft()
                self._droppable -= droppable
                dropped = 0
                if self._dropped and self._droppable < self.capacity // 2:
                    dropped, self._dropped = self._dropped, 0
            try:
                if dropped:
                    note = f"{dropped} lines of rank output not shown: the terminal was not reading (--log-dir keeps every line)"
                    self.stream.write(f"launcher: {note}\n")
                self.stream.write(text + "\n")
                self.stream.flush()
            except (BrokenPipeError, OSError, ValueError):
                with self._ready:
                    self.closed = True
                    self._queue.clear()
                    self._ready.notify_all()
                self.on_closed(self.name)
                return


class ConsoleReporter(Reporter):
    """Progress on stderr, ``[rN host]``-prefixed output (``[r0-7 host]`` per host), and optionally a log file per rank.

    Each stream is written by a printer thread of its own behind a bounded
    queue, so a terminal or pipe that stops reading never stalls the head (its
    heartbeats, its Ctrl-C), nor the other stream: rank output beyond
    ``capacity`` queued lines is dropped and counted, and the count is printed
    once the stream reads again; progress is never dropped. Per-rank log
    files are written at once and keep every line. A closed stream
    (``launcher run | head -2``) calls ``on_closed``.
    """

    def __init__(
        self,
        out: TextIO | None = None,
        err: TextIO | None = None,
        quiet_output: bool = False,
        log_dir: str | None = None,
        capacity: int = 10000,
        on_closed=None,
        on_ready=None,
    ):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.quiet_output = quiet_output
        self.log_dir = log_dir
        self.capacity = capacity
        self._logs: dict[int, TextIO | None] = {}  # None: that rank's log could not be opened
        self._on_ready = on_ready  # called once, after the ready table: every rank is ready (run --detach returns)
        closed = on_closed or (lambda stream: None)
        self._printers = {
            id(self.out): _Printer(self.out, "stdout", capacity, closed),
            id(self.err): _Printer(self.err, "stderr", capacity, closed),
        }

    # --- what the supervisor reports ---------------------------------------------------------

    def progress(self, text: str) -> None:
        self._put(self.err, f"launcher: {text}")

    def output(self, rank: RankState, stream: str, line: str) -> None:
        if self.log_dir:
            self._log(rank.spec.rank, line)
        if not self.quiet_output:
            target = self.err if stream == "stderr" else self.out
            self._put(target, f"[r{rank_span(rank.spec)[0]} {rank.spec.host}] {line}", droppable=True)

    def _log(self, rank: int, line: str) -> None:
        log = self._logs.get(rank)
        if log is None:
            path = os.path.join(self.log_dir, f"rank-{rank}.log")
            try:
                log = _open_log(path)
            except OSError as exc:  # a symlink planted there (ELOOP), a full disk: say so once, keep serving
                self.progress(f"not writing {path}: {exc.strerror or exc}")
                log = None
            self._logs[rank] = log
        if log is not None:
            log.write(line + "\n")
            log.flush()

    def new_attempt(self, rank: RankState, attempt: int) -> None:
        """Keep the earlier attempts' logs: rank-N.log is the current one's, rank-N.K.log attempt K's (0: the
        first start), so the first failure is never hidden by a retry."""
        number = rank.spec.rank
        log = self._logs.pop(number, None)
        if log is not None:
            log.close()
        if self.log_dir:
            current = os.path.join(self.log_dir, f"rank-{number}.log")
            try:
                os.rename(current, os.path.join(self.log_dir, f"rank-{number}.{attempt - 1}.log"))
            except FileNotFoundError:
                pass  # it printed nothing
            except OSError as exc:
                self.progress(f"could not keep {current} of the attempt before restart {attempt}: {exc.strerror or exc}")

    def ready(self, ranks: list[RankState]) -> None:
        rows = [("RANK", "HOST", "ADDRESS", "PORT", "PID", "STATE", "ADDRESS RULE")]
        for r in sorted(ranks, key=lambda r: r.spec.rank):
            rank, ports = rank_span(r.spec)
            rows.append((rank, r.spec.host, r.address or "-", ports, str(r.pid or "-"), r.state, r.rule or "-"))
        self._put(self.out, format_table(rows))
        if self._on_ready is not None:
            self._on_ready()
            self._on_ready = None

    def checked(self, matrix: CheckMatrix) -> None:
        self._put(self.out, render_matrix(matrix, color=self.out.isatty()))

    def final(self, text: str) -> None:
        """The last word (the FAILED line, the summary) on stderr."""
        self._put(self.err, text)

    def close(self, timeout: float = 2.0) -> bool:
        """Write what is queued (up to ``timeout``: a stalled terminal may never read it); True when all went."""
        deadline = time.monotonic() + timeout
        drained = all([printer.drain(deadline) for printer in self._printers.values()])
        for log in self._logs.values():
            if log is not None:
                log.close()
        self._logs.clear()
        return drained

    def _put(self, stream: TextIO, text: str, droppable: bool = False) -> None:
        self._printers[id(stream)].put(text, droppable)


def render_hosts(hosts: Iterable[Host]) -> str:
    rows = [("HOST", "USER", "PORT", "SLOTS", "IFNAME", "CIDR", "ENV", "FROM")]
    for h in hosts:
        env = " ".join(f"{k}={envpolicy.masked(k, v)}" for k, v in h.env)
        rows.append((h.name, h.user or "-", str(h.port or "-"), str(h.slots), h.ifname or "-", h.cidr or "-", env or "-", h.origin or "-"))
    return format_table(rows)


def render_plan(plan: LaunchPlan, python: str = "python") -> str:
    """The dry run: per rank, where, which port, which command, which env and why (the plan document, as text)."""
    doc = plan_document(plan, python)
    last_port = max(p for host in doc["hosts"] for process in host["processes"] for p in process["ports"])
    lines = [
        f"job {doc['job_id']}: {doc['world_size']} ranks on {len(doc['hosts'])} hosts, side-channel ports {doc['port_base']}..{last_port}"
    ]
    if not doc["builtin"]:
        lines.append(
            "each process runs its command through launcher.bootstrap, which sets VLLM_NIXL_SIDE_CHANNEL_HOST and "
            "VLLM_HOST_IP to its host's own address and GLOO_SOCKET_IFNAME to its interface (unless set for that host) "
            "and fills in {host_ip} {head_ip}" + ("" if any(hp.readiness for hp in plan.hosts) else f"; ready when {doc['readiness']}")
        )
    layers = " < ".join(f"{layer['name']} ({layer['applied_by']})" for layer in doc["env_layers"])
    lines.append(f"each rank's environment, in layers (later wins; a host option is never overwritten): {layers}")
    lines += [f"warning: {w}" for w in doc["warnings"]]
    for instance in doc["instances"]:
        hosts = instance["hosts"]
        nodes = instance["hosts_are"] == "nodes"
        spread = f"{len(hosts)} nodes" if nodes else f"DP {instance['dp_size']}"
        over = f"{spread} over {', '.join(hosts)}" if len(hosts) > 1 else f"on {hosts[0]}"
        port = "master port" if nodes else "DP RPC port"
        rpc = f", {port} {instance['rpc_port']}, {{head_ip}} = {hosts[0]}'s address" if instance["rpc_port"] else ""
        lines.append(f"{instance['role']} instance {instance['name']}: {over}; API server on {', '.join(instance['api_hosts'])}{rpc}")
    for hp, host in zip(plan.hosts, doc["hosts"], strict=True):
        role = f", {host['role']} instance {host['instance']}" if host["role"] else ""
        lines += [
            "",
            f"host {host['name']} ({host['origin'] or 'given'}): {host['slots']} ranks{role}; bind address: {host['bind_address']}",
        ]
        if hp.readiness:
            lines.append(f"  ready when {host['readiness']}")
        for process in host["processes"]:
            rank, ports = _span(process["ranks"]), _span(process["ports"])
            lines.append(f"  rank {rank} (local {process['local_rank']}) port {ports} engine {process['engine_id']}")
            lines.append(f"    command: {render_argv(process['argv'], python)}")
            for word in ("copied", "dropped", "set"):
                for name, why in process[word].items():
                    value = "" if word == "dropped" else f"={process['env'][name]}"
                    lines.append(f"    {word:<7} {name}{value}  ({why})")
            if plan.options.gpus_per_rank:
                lines.append(f"    set     CUDA_VISIBLE_DEVICES={_gpu_note(plan.options.gpus_per_rank, process)}")
    return "\n".join(lines)


def _span(values: Sequence[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def _gpu_note(per_rank: int, process: dict) -> str:
    chosen = process["cuda_visible_devices"]
    if chosen is not None:
        return f"{chosen}  (--gpus-per-rank {per_rank}, from gpus= in the hostfile)"
    count = per_rank * len(process["ports"])
    return (
        f"<{count} GPUs, chosen on the host>  (--gpus-per-rank {per_rank}: from its CUDA_VISIBLE_DEVICES, "
        f"else Slurm's SLURM_STEP_GPUS/SLURM_JOB_GPUS, else nvidia-smi -L)"
    )


def render_summary(result: LaunchResult) -> str:
    """Per rank: how and when it ended, its error or last line; the root cause marked."""
    rows = [("RANK", "HOST", "ADDRESS", "PID", "STATE", "EXIT", "READY AT", "ENDED AT", "NOTE")]
    root = result.failure.rank if result.failure else None
    for r in result.ranks:
        exit_text = "-" if r.exit_code is None else (str(r.exit_code) if r.exit_code >= 0 else f"signal {-r.exit_code}")
        note = (r.error or (r.last_output if r.rank == root else "") or "")[:80]
        if r.rank == root:
            note = "ROOT CAUSE" + (f": {note}" if note else "")
        rows.append(
            (
                str(r.rank),
                r.host,
                r.address or "-",
                str(r.pid or "-"),
                r.state,
                exit_text,
                _seconds(r.ready_at),
                _seconds(r.ended_at),
                note or "-",
            )
        )
    return format_table(rows)


def _seconds(t: float | None) -> str:
    return "-" if t is None else f"{t:.2f}s"


def failure_line(result: LaunchResult) -> str:
    """The first line of a job's end that was not ok: a signal is an order ("stopped"), anything else "FAILED"."""
    word = "stopped" if result.failure.kind == "signal" else "FAILED"
    return f"launcher: {word}: {result.failure.message}"


def verdict(result: LaunchResult, plan, reporter: ConsoleReporter, stopped_by: int | None, closed: str | None) -> int:
    """Say how the job ended, last, and return the process's exit code: a failure's (a signal is an order,
    not a fault: "stopped", not "FAILED"), 141 when the reader of ``closed`` stdout went away, 128+N for
    the signal ``stopped_by``, else 0."""
    if result.failure is not None:
        reporter.final(f"{failure_line(result)}\n{render_summary(result)}")
        return result.exit_code
    if closed is not None:
        if closed == "stdout":
            reporter.final(f"launcher: stopped: standard output was closed (its reader went away); all {plan.world_size} ranks stopped")
        return EXIT_STDOUT_CLOSED
    if stopped_by is not None:
        reporter.progress(f"stopped by {signal.Signals(stopped_by).name}; all {plan.world_size} ranks stopped")
        return 128 + stopped_by
    ended = "every rank exited 0" if plan.options.to_completion else "all stopped"
    reporter.progress(f"ok: {plan.world_size} ranks on {len(plan.hosts)} hosts, {ended} ({result.duration:.1f}s)")
    return 0
