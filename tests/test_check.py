"""The all-pairs check's decisions, without processes: what each probe speaks, and the verdict."""

from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from launcher.check import CheckMatrix, CheckOptions, Target, choose_pairs, deadline_for, path_probes, plan_probes, render_matrix
from launcher.protocol import CheckResult, EngineSeen, Peer
from launcher.vllm import wire

TARGETS = [
    Target(0, "h1", "10.0.0.1", (5600,), "j-dp0", "0.32.0+cpu"),
    Target(1, "h2", "10.0.0.2", (5601,), "j-dp1", "0.40.0"),
    Target(2, "h3", "10.0.0.3", (5602,), "j-dp2", ""),
]


def test_auto_speaks_each_peers_generation_and_tcp_where_it_cannot_tell():
    peers, notes = plan_probes(TARGETS, CheckOptions(), builtin=False, job_id="j")
    assert [(p.rank, p.wire, p.expect_hash, p.expect_engine_id) for p in peers] == [
        (0, "v2", None, None),
        (1, "tcp", None, None),
        (2, "tcp", None, None),
    ]
    assert notes == [
        "rank 1 on h2: vLLM 0.40.0 is newer than the releases launcher knows (up to 0.33.0); checked by TCP connect",
        "rank 2 on h3: no vLLM found for its command; checked by TCP connect",
    ]


def test_builtin_cores_are_held_to_the_jobs_hash_and_engine_ids_and_a_forced_wire_wins():
    peers, notes = plan_probes(TARGETS, CheckOptions(), builtin=True, job_id="j")
    assert {p.wire for p in peers} == {wire.CURRENT.name} and not notes
    assert [p.expect_engine_id for p in peers] == ["j-dp0", "j-dp1", "j-dp2"]
    assert {p.expect_hash for p in peers} == {wire.compatibility_hash("j")}
    forced, _ = plan_probes(TARGETS, CheckOptions(wire="v1"), builtin=False, job_id="j")
    assert {p.wire for p in forced} == {"v1"}


def matrix_of(engines):
    """Every rank probed every rank ok; ``engines[peer]`` is what each probe of that peer learned."""
    ranks = tuple(engines)
    m = CheckMatrix(ranks, {r: "v2" for r in ranks}, {0: "h1", 1: "h2", 2: "h3"})
    for a in ranks:
        for b in ranks:
            m.add(
                CheckResult(
                    rank=a,
                    peer=b,
                    ok=True,
                    latency_ms=1.0,
                    engines=[EngineSeen(port=5600 + b, engine_id=engines[b][0], compat_hash=engines[b][1])],
                )
            )
    return m


def test_one_hash_and_distinct_engine_ids_across_the_job_pass():
    assert matrix_of({0: ("e0", "aa"), 1: ("e1", "aa"), 2: ("e2", "")}).ok  # "": an old vLLM without a hash


def test_two_hashes_are_vllms_pd_hash_mismatch_naming_both_processes():
    m = matrix_of({0: ("e0", "aa" * 32), 1: ("e1", "bb" * 32), 2: ("e2", "aa" * 32)})
    assert not m.ok and not m.failures
    assert m.problems == [
        f"compatibility hash mismatch: rank 0 on h1 (port 5600) reports {'aa' * 6}…, rank 1 on h2 (port 5601) reports {'bb' * 6}…; "
        "vLLM's peers refuse each other (NIXL compatibility hash mismatch): run one vLLM version, model, dtype and KV-cache "
        "configuration everywhere"
    ]
    assert "problem: compatibility hash mismatch" in render_matrix(m)


def test_one_engine_id_on_two_engines_is_refused():
    m = matrix_of({0: ("same", "aa"), 1: ("same", "aa")})
    assert m.problems == [
        "engine id 'same' is reported by rank 0 on h1 (port 5600) and rank 1 on h2 (port 5601); peers that expect one fail "
        "with 'engine ID mismatch': give each process its own engine_id in --kv-transfer-config, or none"
    ]


def test_a_missing_result_is_a_failure_with_a_reason():
    m = CheckMatrix((0, 1), {0: "tcp", 1: "tcp"}, {0: "a", 1: "b"})
    m.add(CheckResult(rank=0, peer=1, ok=True, latency_ms=0.5))
    assert not m.complete and len(m.failures) == 3
    assert "3 of 4 TCP connects failed" in render_matrix(m)


def test_a_sampled_check_covers_every_pair_of_hosts_and_draws_the_rest_reproducibly():
    targets = [Target(r, f"h{r // 4}", f"10.0.0.{r // 4}", (5600 + r,), f"e{r}") for r in range(16)]  # 4 hosts x 4
    pairs = choose_pairs(targets, 10, "job1")
    firsts = {0, 4, 8, 12}
    assert {(a, b) for a in firsts for b in firsts} <= set(pairs) and len(pairs) == 16 + 10
    assert pairs == choose_pairs(targets, 10, "job1") != choose_pairs(targets, 10, "job2")
    assert choose_pairs(targets, None, "job1") is None


def test_the_deadline_grows_with_the_busiest_agents_work_counting_each_path_once():
    def hosts(n, per_host):
        return [Target(r, f"h{r // per_host}", f"10.0.0.{r // per_host}", (5600 + r,), f"e{r}") for r in range(n * per_host)]

    # 4 ranks share one address per host: their paths to a peer are one probe, not four.
    assert deadline_for(hosts(2, 4), None, 5.0) == 5.0 * 1 + 5.0  # 8 paths per agent: one round of 16
    assert deadline_for(hosts(32, 8), None, 5.0) == 5.0 * 16 + 5.0  # 256 paths per agent
    assert deadline_for(hosts(32, 8), choose_pairs(hosts(32, 8), 100, "j"), 5.0) < deadline_for(hosts(32, 8), None, 5.0)


def test_a_large_matrix_is_shown_host_by_host():
    ranks = tuple(range(40))
    m = CheckMatrix(ranks, {r: "v2" for r in ranks}, {r: f"host{r // 10}" for r in ranks})
    for a in ranks:
        for b in ranks:
            m.add(CheckResult(rank=a, peer=b, ok=not (a < 10 and b >= 30), latency_ms=1.0 + (b == 39), error="refused"))
    lines = render_matrix(m).splitlines()
    assert "row: from host (slowest pair)" in lines[0] and lines[1].split() == ["host0", "host1", "host2", "host3"]
    assert lines[2].split() == ["host0", "1.0", "1.0", "1.0", "FAIL100"]  # 100 of its 10x10 pairs failed
    assert lines[3].split() == ["host1", "1.0", "1.0", "1.0", "2.0"]  # the slowest pair of the cell
    shown = "\n".join(lines)
    assert "FAIL100" in shown and "100 of 1600 handshakes failed:" in shown and len(shown.splitlines()) < 30


def test_one_result_per_network_path_fills_every_rank_pair_on_it_and_a_failure_names_each_rank():
    """An agent probes a path (its address, a peer) once and reports it once, listing the ranks on it: the head's
    messages grow as paths, its matrix still has every rank pair."""
    from launcher.protocol import CheckResult

    matrix = CheckMatrix((0, 1, 2, 3), {r: "v2" for r in range(4)}, {0: "a", 1: "a", 2: "b", 3: "b"})
    for peer in range(4):
        matrix.add(CheckResult(rank=0, peer=peer, ok=True, latency_ms=1.0, also=[1]))
        matrix.add(CheckResult(rank=2, peer=peer, ok=peer != 0, error="" if peer else "refused", also=[3, 9]))  # 9: not this job's
    assert matrix.complete and len(matrix.results) == 16
    assert sorted((f.rank, f.peer, f.error) for f in matrix.failures) == [(2, 0, "refused"), (3, 0, "refused")]


# --- a full check probes each network path and each listener once (check.path_probes) -------------------


def simulate(layout, broken, dead):
    """A full check by path probes over a model network: ``layout`` is ranks per host (host i at 10.0.0.i),
    ``broken`` the (from, to) host paths that drop everything, ``dead`` the ranks whose listener never answers.
    Returns (the matrix as launcher judges it, the cells a probe of every pair from every rank would fail)."""
    host_of = [h for h, count in enumerate(layout) for _ in range(count)]
    address = lambda r: f"10.0.0.{host_of[r]}"
    peers = [Peer(rank=r, address=address(r), ports=[5600 + r], wire="tcp") for r in range(len(host_of))]
    answers = lambda a, b: (host_of[a], host_of[b]) not in broken and b not in dead
    matrix = CheckMatrix(tuple(range(len(host_of))), {}, {r: f"h{host_of[r]}" for r in range(len(host_of))})
    handshakes = 0
    for host in range(len(layout)):
        mine = [r for r in range(len(host_of)) if host_of[r] == host]
        if not mine:
            continue

        def probe(b, a=mine[0]):
            return CheckResult(rank=a, peer=b, ok=answers(a, b), error="" if answers(a, b) else "timed out")

        for first, rest in path_probes(peers, [address(mine[0])]).values():
            results = [probe(b) for b in first]
            if all(r.ok for r in results):
                results[0] = replace(results[0], covers=rest) if rest else results[0]
            else:
                results += [probe(b) for b in rest]
            handshakes += len(results)
            for result in results:
                matrix.add(replace(result, also=mine[1:]))
    matrix.settle()
    full = {(a, b) for a in range(len(host_of)) for b in range(len(host_of)) if not answers(a, b)}
    return matrix, full, handshakes


def test_a_full_check_of_32_hosts_of_8_ranks_probes_each_path_and_listener_once():
    matrix, full, handshakes = simulate([8] * 32, set(), set())
    assert matrix.complete and matrix.ok and not full
    assert handshakes == 32 * 32  # one per network path, each of the 256 listeners probed from 4 addresses; was 8,192


@settings(max_examples=300, deadline=None)
@given(
    layout=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    broken=st.sets(st.tuples(st.integers(0, 5), st.integers(0, 5)), max_size=4),
    dead=st.sets(st.integers(0, 29), max_size=3),
)
def test_path_probes_give_the_full_checks_verdict_and_its_failed_cells(layout, broken, dead):
    matrix, full, _ = simulate(layout, broken, dead)
    failed = {(f.rank, f.peer) for f in matrix.failures}
    assert matrix.complete and matrix.ok == (not full)  # the same verdict, always
    assert full <= failed  # every cell the full check fails fails here, named
    if not broken:
        assert failed == full  # a dead listener: exactly its column, as the full check says
    for f in matrix.failures:  # a cell failed here only for a listener its one probe could not reach
        assert (f.rank, f.peer) in full or "its listener failed where it was probed" in f.error
