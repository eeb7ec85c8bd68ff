"""What a person sees: progress on stderr, tables and prefixed output on stdout."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from typing import TextIO

from . import envpolicy, netif
from .check import CheckMatrix, render_matrix
from .command import render_argv, user_command
from .job import RankState
from .plan import Host, LaunchPlan, RankSpec
from .results import LaunchResult
from .supervisor import Reporter


def rank_span(spec: RankSpec) -> tuple[str, str]:
    """("0", "5600") for one DP rank; ("0-1", "5600-5601") for a process serving several."""
    ports = spec.ports
    if len(ports) == 1:
        return str(spec.rank), str(ports[0])
    return f"{spec.rank}-{spec.rank + len(ports) - 1}", f"{ports[0]}-{ports[-1]}"


def format_table(rows: Sequence[Sequence[str]], right: bool = False) -> str:
    """Columns two spaces apart, each as wide as its widest cell; ``right`` aligns numbers."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if right else c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


class ConsoleReporter(Reporter):
    """Progress on stderr, ``[rN host]``-prefixed output (``[r0-7 host]`` per host), and optionally a log file per rank."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, quiet_output: bool = False, log_dir: str | None = None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.quiet_output = quiet_output
        self.log_dir = log_dir
        self._logs: dict[int, TextIO] = {}
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)

    def close(self) -> None:
        for log in self._logs.values():
            log.close()
        self._logs.clear()

    def progress(self, text: str) -> None:
        print(f"launcher: {text}", file=self.err, flush=True)

    def output(self, rank: RankState, stream: str, line: str) -> None:
        if self.log_dir:
            log = self._logs.get(rank.spec.rank)
            if log is None:
                log = self._logs[rank.spec.rank] = open(os.path.join(self.log_dir, f"rank-{rank.spec.rank}.log"), "a", encoding="utf-8")
            print(line, file=log, flush=True)
        if not self.quiet_output:
            target = self.err if stream == "stderr" else self.out
            print(f"[r{rank_span(rank.spec)[0]} {rank.spec.host}] {line}", file=target, flush=True)

    def ready(self, ranks: list[RankState]) -> None:
        rows = [("RANK", "HOST", "ADDRESS", "PORT", "PID", "STATE", "ADDRESS RULE")]
        for r in sorted(ranks, key=lambda r: r.spec.rank):
            rank, ports = rank_span(r.spec)
            rows.append((rank, r.spec.host, r.address or "-", ports, str(r.pid or "-"), r.state, r.rule or "-"))
        print(format_table(rows), file=self.out, flush=True)

    def checked(self, matrix: CheckMatrix) -> None:
        print(render_matrix(matrix, color=self.out.isatty()), file=self.out, flush=True)


def render_hosts(hosts: Iterable[Host]) -> str:
    rows = [("HOST", "USER", "PORT", "SLOTS", "IFNAME", "CIDR", "ENV", "FROM")]
    for h in hosts:
        env = " ".join(f"{k}={envpolicy.masked(k, v)}" for k, v in h.env)
        rows.append((h.name, h.user or "-", str(h.port or "-"), str(h.slots), h.ifname or "-", h.cidr or "-", env or "-", h.origin or "-"))
    return format_table(rows)


def render_plan(plan: LaunchPlan, python: str = "python") -> str:
    """The dry run: per rank, where, which port, which command, which env and why."""
    lines = [
        f"job {plan.job_id}: {plan.world_size} ranks on {len(plan.hosts)} hosts, "
        f"side-channel ports {plan.port_base}..{plan.port_base + plan.world_size - 1}"
    ]
    if not plan.builtin:
        lines.append(
            f"each process runs its command through launcher.bootstrap, which sets VLLM_NIXL_SIDE_CHANNEL_HOST and "
            f"VLLM_HOST_IP to its host's own address (unless set for that host) and fills in {{host_ip}} {{head_ip}}; "
            f"ready when {plan.readiness.describe()}"
        )
    layers = " < ".join(name for name, _ in envpolicy.LAYERS)
    lines.append(f"each rank's environment, in layers (later wins; a host option is never overwritten): {layers}")
    lines += [f"warning: {w}" for w in plan.warnings]
    for hp in plan.hosts:
        host = hp.host
        lines.append("")
        lines.append(f"host {host.name} ({host.origin or 'given'}): {host.slots} ranks; bind address: {netif.describe(hp.bind_request())}")
        for r in hp.ranks:
            report = r.env_report
            rank, ports = rank_span(r)
            lines.append(f"  rank {rank} (local {r.local_rank}) port {ports} engine {r.engine_id}")
            lines.append(f"    command: {render_argv(user_command(r.argv), host.python or python)}")
            for name in sorted(report.copied):
                lines.append(f"    copied  {name}={envpolicy.masked(name, r.env[name])}  ({report.copied[name]})")
            for name in sorted(report.dropped):
                lines.append(f"    dropped {name}  ({report.dropped[name]})")
            for name in sorted(report.set):
                lines.append(f"    set     {name}={envpolicy.masked(name, r.env[name])}  ({report.set[name]})")
    return "\n".join(lines)


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
