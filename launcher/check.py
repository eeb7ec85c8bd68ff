"""All-pairs check: every rank probes every rank, from its own address.

The probes run on the hosts (each agent dials from its ranks' bound
addresses, so a cell is a real host-to-host path); this module decides what
each probe speaks and turns the results into a connectivity matrix and a
verdict. Pure: no I/O.

What a probe speaks (``--wire``): ``auto`` picks, per peer, the handshake
generation of the vLLM that peer runs (``wire.generation_for_vllm``; the
built-in engine core speaks the current one), and a TCP connect where it
cannot tell; a generation name forces it; ``tcp`` connects only. A wrong
generation kills a real vLLM listener, which is why ``auto`` never guesses.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from . import wire
from .protocol import CheckResult, Peer

WIRE_CHOICES = ("auto", *wire.BY_NAME, wire.TCP)


@dataclass(frozen=True)
class CheckOptions:
    wire: str = "auto"  # "auto", a generation name (v0, v1, v2), or "tcp"
    timeout: float = 5.0  # per handshake, as vLLM's client


@dataclass(frozen=True)
class Target:
    """One rank as the check sees it, once it is ready."""

    rank: int
    host: str
    address: str
    ports: tuple[int, ...]
    engine_id: str
    vllm_version: str = ""  # of the vLLM its command runs; "" for the built-in engine core or no vLLM


def plan_probes(targets: Sequence[Target], options: CheckOptions, *, builtin: bool, job_id: str) -> tuple[list[Peer], list[str]]:
    """What every rank sends to each target, and notes for the user (why a target gets TCP only)."""
    peers, notes = [], []
    for t in targets:
        if options.wire != "auto":
            name = options.wire
        elif builtin:
            name = wire.CURRENT.name
        else:
            gen, why = wire.generation_for_vllm(t.vllm_version)
            name = gen.name if gen else wire.TCP
            if gen is None:
                notes.append(f"rank {t.rank} on {t.host}: {why}; checked by TCP connect")
        peers.append(
            Peer(
                rank=t.rank,
                address=t.address,
                ports=list(t.ports),
                wire=name,
                # Built-in cores of one job share a hash and know each other's engine id;
                # a user command's are vLLM's own, so they are compared across the job instead.
                expect_hash=wire.compatibility_hash(job_id) if builtin and name != wire.TCP else None,
                expect_engine_id=t.engine_id if builtin and name != wire.TCP else None,
            )
        )
    return peers, notes


@dataclass
class CheckMatrix:
    """Results keyed by (from rank, to rank); ``wires`` says what each column was probed with."""

    ranks: tuple[int, ...]
    wires: Mapping[int, str] = field(default_factory=dict)
    hosts: Mapping[int, str] = field(default_factory=dict)
    results: dict[tuple[int, int], CheckResult] = field(default_factory=dict)

    def add(self, result: CheckResult) -> None:
        if result.rank in self.ranks and result.peer in self.ranks:
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
    def handshakes(self) -> bool:
        return any(w != wire.TCP for w in self.wires.values())

    @property
    def problems(self) -> list[str]:
        return consistency_problems(self)

    @property
    def ok(self) -> bool:
        return self.complete and not self.failures and not self.problems


def consistency_problems(matrix: CheckMatrix) -> list[str]:
    """What vLLM's own peers would refuse although every probe answered.

    Every engine core must report the same compatibility hash (vLLM's client
    refuses a peer whose hash differs from its own: the P/D "NIXL
    compatibility hash mismatch") and its own engine id (a peer that expects
    one engine and meets another fails with "engine ID mismatch").
    """
    seen: dict[tuple[int, int], tuple[str, str]] = {}  # (rank, port) -> (engine id, hash)
    for result in matrix.results.values():
        for engine in result.engines:
            seen.setdefault((result.peer, engine.port), (engine.engine_id, engine.compat_hash))
    problems = []
    where = lambda key: f"rank {key[0]} on {matrix.hosts.get(key[0], '?')} (port {key[1]})"
    by_hash = collections.defaultdict(list)
    for key, (_, compat_hash) in sorted(seen.items()):
        if compat_hash:
            by_hash[compat_hash].append(key)
    if len(by_hash) > 1:
        (h1, k1), (h2, k2) = [(h, keys[0]) for h, keys in list(by_hash.items())[:2]]
        problems.append(
            f"compatibility hash mismatch: {where(k1)} reports {h1[:12]}…, {where(k2)} reports {h2[:12]}…; "
            f"vLLM's peers refuse each other (NIXL compatibility hash mismatch): run one vLLM version, model, dtype "
            f"and KV-cache configuration everywhere"
        )
    by_engine = collections.defaultdict(list)
    for key, (engine_id, _) in sorted(seen.items()):
        by_engine[engine_id].append(key)
    for engine_id, keys in by_engine.items():
        if len(keys) > 1:
            problems.append(
                f"engine id {engine_id!r} is reported by {where(keys[0])} and {where(keys[1])}; peers that expect one "
                f"fail with 'engine ID mismatch': give each process its own engine_id in --kv-transfer-config, or none"
            )
    return problems


def render_matrix(matrix: CheckMatrix, color: bool = False) -> str:
    """Rows: from rank; columns: to rank. ``ok`` cells show latency in ms; then failures and problems."""
    ranks, hosts = matrix.ranks, matrix.hosts
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
    kinds = sorted(set(matrix.wires.values()))
    probe = "handshake" if matrix.handshakes else "TCP connect"
    how = ", ".join("TCP connect" if k == wire.TCP else f"{k} wire" for k in kinds)
    lines = [f"{probe} latency in ms ({how}; row: from rank, column: to rank)", header]
    for a, row in zip(ranks, cells, strict=True):
        rendered = " ".join(_paint(c.rjust(width), c, color) for c in row)
        lines.append(f"{hosts[a].ljust(host_width)} r{str(a).ljust(3)}  {rendered}")
    if len(kinds) > 1:
        lines.append("columns: " + ", ".join(f"r{r} {matrix.wires[r]}" for r in ranks))
    failures = matrix.failures
    if failures:
        lines.append(f"{len(failures)} of {len(ranks) ** 2} {probe}s failed:")
        lines.extend(f"  r{f.rank} ({hosts.get(f.rank, '?')}) -> r{f.peer} ({hosts.get(f.peer, '?')}): {f.error}" for f in failures[:20])
    else:
        lines.append(f"all {len(ranks) ** 2} {probe}s ok")
    lines.extend(f"problem: {p}" for p in matrix.problems)
    return "\n".join(lines)


def _paint(text: str, cell: str, color: bool) -> str:
    if not color:
        return text
    code = "31" if cell in ("FAIL", "?") else "32"
    return f"\x1b[{code}m{text}\x1b[0m"
