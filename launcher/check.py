"""All-pairs handshake check: every rank handshakes every rank, from its own address.

The probes run on the hosts (each agent dials from its ranks' bound
addresses, so a cell is a real host-to-host path); this module turns their
results into a connectivity matrix. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .protocol import CheckResult


@dataclass(frozen=True)
class CheckOptions:
    wire: str = "v2"  # request generation: v1 [msg, tp], v2 [msg, pp, tp], v3 [msg, pp, pcp, tp]
    timeout: float = 5.0  # per handshake, as vLLM's client


@dataclass
class CheckMatrix:
    """Results keyed by (from rank, to rank)."""

    ranks: tuple[int, ...]
    wire: str = "v2"
    results: dict[tuple[int, int], CheckResult] = field(default_factory=dict)

    def add(self, result: CheckResult) -> None:
        self.results[(result.rank, result.peer)] = result

    @property
    def complete(self) -> bool:
        return len(self.results) >= len(self.ranks) ** 2

    @property
    def failures(self) -> list[CheckResult]:
        missing = [
            CheckResult(rank=a, peer=b, ok=False, error="no result (the probing host did not answer in time)")
            for a in self.ranks
            for b in self.ranks
            if (a, b) not in self.results
        ]
        return [r for r in self.results.values() if not r.ok] + missing

    @property
    def ok(self) -> bool:
        return self.complete and not self.failures


def render_matrix(matrix: CheckMatrix, hosts: Mapping[int, str], color: bool = False) -> str:
    """Rows: from rank; columns: to rank. ``ok`` cells show latency in ms."""
    ranks = matrix.ranks
    labels = [f"r{r}" for r in ranks]
    cells: list[list[str]] = []
    for a in ranks:
        row = []
        for b in ranks:
            result = matrix.results.get((a, b))
            if result is None:
                row.append("?")
            elif result.ok:
                row.append(f"{result.latency_ms:.1f}")
            else:
                row.append("FAIL")
        cells.append(row)
    width = max([len(c) for row in cells for c in row] + [len(lbl) for lbl in labels] + [4])
    host_width = max((len(hosts[r]) for r in ranks), default=4)
    header = " " * (host_width + 6) + " ".join(lbl.rjust(width) for lbl in labels)
    probe = "TCP connect" if matrix.wire == "tcp" else "handshake"
    lines = [f"{probe} latency in ms (row: from rank, column: to rank)", header]
    for a, row in zip(ranks, cells):
        rendered = " ".join(_paint(c.rjust(width), c, color) for c in row)
        lines.append(f"{hosts[a].ljust(host_width)} r{str(a).ljust(3)}  {rendered}")
    failures = matrix.failures
    if failures:
        lines.append(f"{len(failures)} of {len(ranks) ** 2} {probe}s failed:")
        lines.extend(f"  r{f.rank} -> r{f.peer}: {f.error}" for f in failures[:20])
    else:
        lines.append(f"all {len(ranks) ** 2} {probe}s ok")
    return "\n".join(lines)


def _paint(text: str, cell: str, color: bool) -> str:
    if not color:
        return text
    code = "31" if cell in ("FAIL", "?") else "32"
    return f"\x1b[{code}m{text}\x1b[0m"
