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
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from . import wire
from .protocol import CheckResult, Peer

WIRE_CHOICES = ("auto", *wire.BY_NAME, wire.TCP)
PROBE_CONCURRENCY = 16  # probes an agent runs at once
FULL_MATRIX_RANKS = 32  # above this many ranks the matrix is shown host by host


@dataclass(frozen=True)
class CheckOptions:
    wire: str = "auto"  # "auto", a generation name (v0, v1, v2), or "tcp"
    timeout: float = 5.0  # per handshake, as vLLM's client
    sample: int | None = None  # None: every pair; N: every pair of hosts (their first ranks) plus N other rank pairs


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


def choose_pairs(targets: Sequence[Target], sample: int | None, seed: str) -> list[tuple[int, int]] | None:
    """The (from, to) rank pairs to probe: all (None), or for a sampled check every pair of hosts through
    their first ranks plus ``sample`` other pairs drawn with ``seed`` (the job id: a rerun draws the same)."""
    if sample is None:
        return None
    first: dict[str, int] = {}
    for t in targets:
        first.setdefault(t.host, t.rank)
    chosen = {(a, b) for a in first.values() for b in first.values()}
    others = [(a.rank, b.rank) for a in targets for b in targets if (a.rank, b.rank) not in chosen]
    chosen.update(random.Random(seed).sample(others, min(sample, len(others))))
    return sorted(chosen)


def deadline_for(targets: Sequence[Target], pairs: list[tuple[int, int]] | None, timeout: float) -> float:
    """Seconds the check may take: every probe of the busiest agent failing at its timeout, PROBE_CONCURRENCY
    at once (an agent probes a peer once per address its ranks share: one network path), plus slack."""
    ports = {t.rank: len(t.ports) for t in targets}
    where = {t.rank: (t.host, t.address) for t in targets}
    paths: dict[str, set] = collections.defaultdict(set)
    for a, b in pairs if pairs is not None else ((a.rank, b.rank) for a in targets for b in targets):
        paths[where[a][0]].add((where[a][1], b))
    busiest = max((sum(ports[b] for _, b in mine) for mine in paths.values()), default=0)
    return timeout * math.ceil(busiest / PROBE_CONCURRENCY) + 5.0


@dataclass
class CheckMatrix:
    """Results keyed by (from rank, to rank); ``wires`` says what each column was probed with."""

    ranks: tuple[int, ...]
    wires: Mapping[int, str] = field(default_factory=dict)
    hosts: Mapping[int, str] = field(default_factory=dict)
    results: dict[tuple[int, int], CheckResult] = field(default_factory=dict)
    pairs: frozenset[tuple[int, int]] | None = None  # the pairs probed; None: every pair

    def expected(self) -> list[tuple[int, int]]:
        return sorted(self.pairs) if self.pairs is not None else [(a, b) for a in self.ranks for b in self.ranks]

    def add(self, result: CheckResult) -> None:
        key = (result.rank, result.peer)
        if result.rank in self.ranks and result.peer in self.ranks and (self.pairs is None or key in self.pairs):
            self.results[key] = result

    @property
    def complete(self) -> bool:
        return len(self.results) >= len(self.expected())

    @property
    def failures(self) -> list[CheckResult]:
        missing = [
            CheckResult(rank=a, peer=b, ok=False, error="no result (the probing host did not answer in time)")
            for a, b in self.expected()
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
    """Rows: from, columns: to; ``ok`` cells show latency in ms. Rank by rank up to FULL_MATRIX_RANKS
    ranks, host by host above (a cell: the slowest pair, or how many failed). Then failures and problems."""
    ranks, hosts = matrix.ranks, matrix.hosts
    expected = set(matrix.expected())
    if len(ranks) <= FULL_MATRIX_RANKS:
        rows = [(f"{hosts[a]} r{a}", [_cell(matrix, [(a, b)], expected) for b in ranks]) for a in ranks]
        labels, what = [f"r{r}" for r in ranks], "rank"
    else:
        by_host: dict[str, list[int]] = collections.defaultdict(list)
        for r in ranks:
            by_host[hosts[r]].append(r)
        pairs = lambda ha, hb: [(a, b) for a in by_host[ha] for b in by_host[hb]]
        rows = [(ha, [_cell(matrix, pairs(ha, hb), expected) for hb in by_host]) for ha in by_host]
        labels, what = list(by_host), "host (slowest pair)"
    width = max([len(c) for _, row in rows for c in row] + [len(lbl) for lbl in labels] + [4])
    label_width = max(len(label) for label, _ in rows)
    kinds = sorted(set(matrix.wires.values()))
    probe = "handshake" if matrix.handshakes else "TCP connect"
    how = ", ".join("TCP connect" if k == wire.TCP else f"{k} wire" for k in kinds)
    sampled = "" if matrix.pairs is None else f"; {len(expected)} of {len(ranks) ** 2} pairs sampled, · not probed"
    lines = [f"{probe} latency in ms ({how}; row: from {what}, column: to{sampled})"]
    lines.append(" " * (label_width + 2) + " ".join(lbl.rjust(width) for lbl in labels))
    for label, row in rows:
        lines.append(f"{label.ljust(label_width)}  " + " ".join(_paint(c.rjust(width), c, color) for c in row))
    if len(kinds) > 1:
        lines.append("columns: " + ", ".join(f"r{r} {matrix.wires[r]}" for r in ranks))
    failures = matrix.failures
    if failures:
        lines.append(f"{len(failures)} of {len(expected)} {probe}s failed:")
        lines.extend(f"  r{f.rank} ({hosts.get(f.rank, '?')}) -> r{f.peer} ({hosts.get(f.peer, '?')}): {f.error}" for f in failures[:20])
    else:
        lines.append(f"all {len(expected)} {probe}s ok")
    lines.extend(f"problem: {p}" for p in matrix.problems)
    return "\n".join(lines)


def _cell(matrix: CheckMatrix, pairs: list[tuple[int, int]], expected: set) -> str:
    probed = [p for p in pairs if p in expected]
    if not probed:
        return "·"
    results = [matrix.results.get(p) for p in probed]
    failed = sum(1 for r in results if r is not None and not r.ok)
    if failed:
        return "FAIL" if len(probed) == 1 else f"FAIL{failed}"
    if any(r is None for r in results):
        return "?"
    return f"{max(r.latency_ms for r in results):.1f}"


def _paint(text: str, cell: str, color: bool) -> str:
    if not color:
        return text
    code = "31" if cell.startswith("FAIL") or cell == "?" else "2" if cell == "·" else "32"
    return f"\x1b[{code}m{text}\x1b[0m"
