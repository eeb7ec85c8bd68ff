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

import msgspec
from msgspec.structs import replace

from .protocol import CheckResult, Peer
from .vllm import wire

WIRE_CHOICES = ("auto", *wire.BY_NAME, wire.TCP)
PROBE_CONCURRENCY = 16  # probes an agent runs at once
FULL_MATRIX_RANKS = 32  # above this many ranks the matrix is shown host by host
UNPROVEN = "its listener failed where it was probed"  # a cell a path's probe stood for (CheckMatrix.settle)


class CheckOptions(msgspec.Struct, frozen=True):
    wire: str = "auto"  # "auto", a generation name (v0, v1, v2), or "tcp"
    timeout: float = 5.0  # per handshake, as vLLM's client
    sample: int | None = None  # None: every pair; N: every pair of hosts (their first ranks) plus N other rank pairs


class Target(msgspec.Struct, frozen=True):
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


def path_probes(peers: Sequence[Peer], sources: Sequence[str]) -> dict[tuple[str, str], tuple[list[int], list[int]]]:
    """For each of this host's ``sources`` (its ranks' addresses) and each destination address: (the ranks there
    to probe, the ranks that path's probe then stands for).

    A network path (source address -> destination address) needs one probe, and every listener one probe
    from somewhere; probing every rank from every address repeats both (32 hosts x 8 ranks: 65,536 cells,
    8,192 handshakes, where 1,024 prove the same). The job's sources are the peers' own addresses in rank
    order; the i-th probes the destination's ranks j with j = i (mod sources), and at least its i-th (mod
    ranks there): every rank is probed from one address at least, every path at least once. A source whose
    probes of a destination do not all answer probes the rest of it too (the agent: ``probes.probe_path``),
    so a broken path or listener is reported cell by cell, as the full check would."""
    everyone = {address: i for i, address in enumerate(dict.fromkeys(p.address for p in peers))}
    at: dict[str, list[int]] = collections.defaultdict(list)
    for peer in sorted(peers, key=lambda p: p.rank):
        at[peer.address].append(peer.rank)
    chosen: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for source in sources:
        index = everyone.get(source)
        for destination, ranks in at.items():
            if index is None:  # an address no peer has (cannot happen for a ready rank): probe everything
                chosen[(source, destination)] = (list(ranks), [])
                continue
            mine = {ranks[j] for j in range(len(ranks)) if j % len(everyone) == index % len(everyone)}
            mine.add(ranks[index % len(ranks)])
            chosen[(source, destination)] = ([r for r in ranks if r in mine], [r for r in ranks if r not in mine])
    return chosen


def transfer_deadline(targets: Sequence[Target], pairs: list[tuple[int, int]] | None, timeout: float) -> float:
    """Seconds the transfer check may take: a rank reads its peers one after another (a handshake, then a
    read, each up to ``timeout``), all ranks at once; the busiest rank decides."""
    reads = collections.Counter(a for a, _ in pairs) if pairs is not None else {t.rank: len(targets) for t in targets}
    return 2 * timeout * max(reads.values(), default=0) + 10.0


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


class CheckMatrix(msgspec.Struct):
    """Results keyed by (from rank, to rank); ``wires`` says what each column was probed with."""

    ranks: tuple[int, ...]
    wires: Mapping[int, str] = msgspec.field(default_factory=dict)
    hosts: Mapping[int, str] = msgspec.field(default_factory=dict)
    results: dict[tuple[int, int], CheckResult] = msgspec.field(default_factory=dict)
    pairs: frozenset[tuple[int, int]] | None = None  # the pairs probed; None: every pair
    transfer_bytes: int | None = None  # a matrix of NIXL reads of this many bytes (check --transfer), not of probes
    # The shape, computed once: the head asks after every one of N^2 results whether the matrix is complete.
    _expected: list[tuple[int, int]] | None = None
    _expected_set: frozenset[tuple[int, int]] = frozenset()
    _covered: set[tuple[int, int]] = msgspec.field(default_factory=set)  # cells a path probe stands for, until settle

    def expected(self) -> list[tuple[int, int]]:
        """The pairs that get a result, in order."""
        if self._expected is None:
            every = sorted(self.pairs) if self.pairs is not None else [(a, b) for a in self.ranks for b in self.ranks]
            self._expected = [(a, b) for a, b in every if a != b] if self.transfer_bytes else every  # a rank does not read itself
            self._expected_set = frozenset(self._expected)
        return self._expected

    def add(self, result: CheckResult) -> None:
        """Keep a result for each expected pair it answers (its rank's, and those of the ranks ``also`` on its path;
        with each of them, the ranks it ``covers``, until ``settle``); anything else (a rank of another job, a pair
        not asked) is dropped. The pairs of one path share the object: its ``rank`` is the first's, the key says whose."""
        self.expected()
        for rank in (result.rank, *result.also):
            if (rank, result.peer) in self._expected_set:
                self.results[(rank, result.peer)] = result
                self._covered.discard((rank, result.peer))
            for other in result.covers:
                if (rank, other) in self._expected_set and (rank, other) not in self.results:
                    self.results[(rank, other)] = result
                    self._covered.add((rank, other))

    def settle(self) -> None:
        """Judge the covered cells: the path answered, so the cell is its listener's verdict from elsewhere; a
        listener no probe reached alive fails every cell it was covered in, with the reason it failed where probed."""
        if not self._covered:
            return
        alive, why = set(), {}
        for (a, b), result in self.results.items():
            if (a, b) in self._covered:
                continue
            if result.ok:
                alive.add(b)
            else:
                why.setdefault(b, f"from rank {a}: {result.error}")
        for a, b in self._covered:
            if b not in alive:
                error = why.get(b, "no probe of it answered")
                self.results[(a, b)] = CheckResult(rank=a, peer=b, ok=False, error=f"{UNPROVEN} ({error})")
        self._covered = set()

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
        failed = [r if r.rank == a else replace(r, rank=a, also=[]) for (a, _), r in self.results.items() if not r.ok]
        failed.sort(key=lambda r: r.error.startswith(UNPROVEN))  # what a probe saw first, then what follows from it
        return failed + missing

    @property
    def handshakes(self) -> bool:
        return any(w != wire.TCP for w in self.wires.values())

    @property
    def what(self) -> str:
        """What one cell measured: 'transfer', 'handshake' or 'TCP connect'."""
        return "transfer" if self.transfer_bytes else "handshake" if self.handshakes else "TCP connect"

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


class Cell(msgspec.Struct, frozen=True):
    """One cell of the matrix: a rank pair, or every pair between two hosts in the host-level view."""

    probed: int  # pairs probed in it (0: none, shown ·)
    failed: int  # of them, failed
    value: float | None  # the slowest pair's latency (ms) or bandwidth (MB/s); None until every pair answered

    def text(self) -> str:
        if not self.probed:
            return "·"
        if self.failed:
            return "FAIL" if self.probed == 1 else f"FAIL{self.failed}"
        return "?" if self.value is None else f"{self.value:.0f}" if self.value >= 100 else f"{self.value:.1f}"


class Grid(msgspec.Struct, frozen=True):
    """The matrix as a person reads it: rank by rank up to FULL_MATRIX_RANKS ranks, host by host above."""

    row_labels: list[str]
    column_labels: list[str]
    cells: list[list[Cell]]
    by: str  # "rank" or "host (slowest pair)"
    unit: str  # "ms" or "MB/s"


def grid(matrix: CheckMatrix) -> Grid:
    """Rows: from (the reader, in a transfer check), columns: to."""
    ranks, hosts = matrix.ranks, matrix.hosts
    expected = set(matrix.expected())
    if len(ranks) <= FULL_MATRIX_RANKS:
        groups = {f"r{r}": [r] for r in ranks}
        row_labels, by = [f"{hosts[r]} r{r}" for r in ranks], "rank"
    else:
        groups = collections.defaultdict(list)
        for r in ranks:
            groups[hosts[r]].append(r)
        row_labels, by = list(groups), "host (slowest pair)"
    cells = [[_cell(matrix, [(a, b) for a in ra for b in rb], expected) for rb in groups.values()] for ra in groups.values()]
    return Grid(row_labels, list(groups), cells, by, "MB/s" if matrix.transfer_bytes else "ms")


def render_matrix(matrix: CheckMatrix, color: bool = False) -> str:
    """The grid as text (``ok`` cells: latency in ms, or MB/s for transfers), then failures and problems."""
    g, hosts = grid(matrix), matrix.hosts
    expected = matrix.expected()
    rows = [(label, [c.text() for c in row]) for label, row in zip(g.row_labels, g.cells, strict=True)]
    width = max([len(c) for _, row in rows for c in row] + [len(lbl) for lbl in g.column_labels] + [4])
    label_width = max(len(label) for label, _ in rows)
    kinds = sorted(set(matrix.wires.values()))
    probe = matrix.what
    sampled = "" if matrix.pairs is None else f"; {len(expected)} of {len(matrix.ranks) ** 2} pairs sampled, · not probed"
    axes = f"row: reader {g.by}, column: read from" if matrix.transfer_bytes else f"row: from {g.by}, column: to"
    lines = [f"{title(matrix, f'; {axes}{sampled}')}"]
    lines.append(" " * (label_width + 2) + " ".join(lbl.rjust(width) for lbl in g.column_labels))
    for label, row in rows:
        lines.append(f"{label.ljust(label_width)}  " + " ".join(_paint(c.rjust(width), c, color) for c in row))
    if len(kinds) > 1:
        lines.append("columns: " + ", ".join(f"r{r} {matrix.wires[r]}" for r in matrix.ranks))
    failures = matrix.failures
    if failures:
        lines.append(f"{len(failures)} of {len(expected)} {probe}s failed:")
        lines.extend(f"  r{f.rank} ({hosts.get(f.rank, '?')}) -> r{f.peer} ({hosts.get(f.peer, '?')}): {f.error}" for f in failures[:20])
    else:
        lines.append(f"all {len(expected)} {probe}s ok")
    used = collections.Counter(r.used for r in matrix.results.values() if r.ok and getattr(r, "used", ""))
    lines.extend(f"UCX used: {how} ({n} reads)" for how, n in sorted(used.items()))
    lines.extend(f"problem: {p}" for p in matrix.problems)
    return "\n".join(lines)


def title(matrix: CheckMatrix, more: str = "") -> str:
    """What the cells are: 'handshake latency in ms (v2 wire)', 'NIXL READ bandwidth in MB/s (1 MiB per read, ...)';
    ``more`` goes inside the parentheses."""
    if matrix.transfer_bytes:
        return f"NIXL READ bandwidth in MB/s ({_size(matrix.transfer_bytes)} per read, every byte verified{more})"
    how = ", ".join("TCP connect" if k == wire.TCP else f"{k} wire" for k in sorted(set(matrix.wires.values())))
    return f"{matrix.what} latency in ms ({how}{more})"


def _cell(matrix: CheckMatrix, pairs: list[tuple[int, int]], expected: set) -> Cell:
    probed = [p for p in pairs if p in expected]
    results = [matrix.results.get(p) for p in probed]
    failed = sum(1 for r in results if r is not None and not r.ok)
    value = None
    if probed and not failed and all(r is not None for r in results):
        # The slowest pair speaks for the cell.
        value = min(r.mbps for r in results) if matrix.transfer_bytes else max(r.latency_ms for r in results)
    return Cell(len(probed), failed, value)


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} bytes"


def _paint(text: str, cell: str, color: bool) -> str:
    if not color:
        return text
    code = "31" if cell.startswith("FAIL") or cell == "?" else "2" if cell == "·" else "32"
    return f"\x1b[{code}m{text}\x1b[0m"
