"""Restart by failure group, as data: the policy's arithmetic and the head's decisions (``Job``), without processes.

The end-to-end restarts (real processes killed with real signals, on loopback
and on namespace hosts) are in tests/test_e2e_restart.py.
"""

import pytest

from launcher import plan as planning
from launcher import protocol, restart
from launcher.head import job as jobs
from launcher.head.job import Job, LinkOpened
from launcher.plan import Host, LaunchOptions
from launcher.restart import RestartPolicy
from launcher.results import FailureKind, Phase
from launcher.version import __version__
from launcher.vllm import disagg

ON = RestartPolicy(mode="on-failure", max_restarts=2, window=600.0, backoff_min=1.0, backoff_max=8.0)


def test_backoff_doubles_from_the_minimum_never_under_it_and_never_over_the_maximum():
    lows = [restart.backoff(n, ON, 0.0) for n in range(1, 7)]
    assert lows == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    for n in range(1, 40):
        for draw in (0.0, 0.5, 0.999):
            assert ON.backoff_min <= restart.backoff(n, ON, draw) <= ON.backoff_max
    assert restart.backoff(1, ON, 0.5) == 1.5  # jitter: up to as much again


def test_units_are_the_whole_dp_job_or_each_pd_instance():
    assert restart.units_of((), 3) == (restart.Unit("the job", (0, 1, 2)),)
    hosts = [
        Host("p1", role="prefill", group="p0"),
        Host("d1", role="decode"),
        Host("p2", role="prefill", group="p0"),
        Host("d2", role="decode"),
    ]
    units = restart.units_of(disagg.instances(hosts), len(hosts))
    assert [(u.name, u.hosts, u.role) for u in units] == [
        ("prefill instance p0", (0, 2), "prefill"),  # one DP group over two hosts: they fail and come back together
        ("decode instance d1", (1,), "decode"),
        ("decode instance d2", (3,), "decode"),
    ]


def test_restarts_count_in_a_sliding_window():
    records = [restart.RestartRecord("u", i + 1, "x", at, 1.0) for i, at in enumerate((0.0, 100.0, 500.0))]
    assert restart.within_window(records, "u", 550.0, 600.0) == 3
    assert restart.within_window(records, "u", 650.0, 600.0) == 2  # the first fell out of the window
    assert restart.within_window(records, "other", 550.0, 600.0) == 0


@pytest.mark.parametrize(
    "text, expected",
    [("1,60", (1.0, 60.0)), ("0.5,2", (0.5, 2.0)), ("5", (5.0, 60.0)), ("90", (90.0, 90.0))],
)
def test_backoff_option_reads_min_and_max(text, expected):
    assert restart.parse_backoff(text) == expected


@pytest.mark.parametrize("text", ["a,b", "5,1", "-1,3", "1,1e9", ""])
def test_a_bad_backoff_option_names_the_fix(text):
    with pytest.raises(ValueError, match="give .*MIN.*MAX"):
        restart.parse_backoff(text)


# --- the head's decisions ------------------------------------------------------------------------


def make(policy=ON, hosts=(Host("a", slots=1), Host("b", slots=1)), command=()):
    return Job(planning.build(list(hosts), LaunchOptions(restart=policy, command=command), {}, "j"))


def all_ready(job, now=1.0):
    actions = []
    for i, h in enumerate(job.hosts):
        job.apply(i, LinkOpened(), 0.0)
        job.apply(i, protocol.Hello(hostname="x", pid=1, python="p", version=__version__, address=f"10.0.0.{i + 1}"), 0.1)
        for r in h.plan.ranks:
            job.apply(i, protocol.Started(rank=r.rank, pid=100 + r.rank), 0.2)
            actions += job.apply(i, protocol.Ready(rank=r.rank, address=f"10.0.0.{i + 1}", port=5600, pid=1, rule="r", engine_id="e"), now)
    return actions


def restart_orders(actions):
    return [a for a in actions if isinstance(a, jobs.RestartHosts)]


def test_a_rank_that_fails_after_the_first_start_restarts_its_whole_group_and_its_peers_exit_is_expected():
    job = make()
    all_ready(job)
    actions = job.apply(1, protocol.Exited(rank=1, returncode=-9), 5.0)
    (order,) = restart_orders(actions)
    assert order.hosts == (0, 1) and order.attempt == 1 and 1.0 <= order.delay <= 2.0
    assert job.failure is None and [job.ranks[r].phase for r in (0, 1)] == [Phase.RESTARTING] * 2
    assert job.apply(0, protocol.Exited(rank=0, returncode=-15), 5.1) == []  # stopped by the restart: no failure
    assert job.failure is None
    started = job.apply(0, protocol.Started(rank=0, pid=200), 7.0)
    assert started == [jobs.NewAttempt(job.ranks[0], 1)]
    job.apply(1, protocol.Started(rank=1, pid=201), 7.0)
    job.apply(0, protocol.Ready(rank=0, address="10.0.0.1", port=5600, pid=200, rule="r", engine_id="e"), 8.0)
    back = job.apply(1, protocol.Ready(rank=1, address="10.0.0.2", port=5600, pid=201, rule="r", engine_id="e"), 9.0)
    assert jobs.Progress("the job is ready again after restart 1 (4.0s)") in back and jobs.UnitReady((0, 1)) in back
    (record,) = job.result(10.0).restarts
    assert (record.unit, record.attempt, record.ready_after) == ("the job", 1, 4.0)
    assert record.cause == "rank 1 on b was killed by signal 9"


def test_a_group_that_never_became_ready_is_not_restarted():
    job = make()
    job.apply(0, LinkOpened(), 0.0)
    job.apply(0, protocol.Started(rank=0, pid=100), 0.1)
    assert restart_orders(job.apply(0, protocol.Exited(rank=0, returncode=1), 0.5)) == []
    assert job.failure.kind is FailureKind.RANK_EXITED and job.failure.exit_code == 1
    assert job.failure.message.endswith(
        "not restarted: the job never became ready (a failure group restarts only once its first start succeeded)"
    )


def test_a_crash_loop_gives_up_after_max_restarts_with_the_ranks_own_exit_code():
    job = make()
    all_ready(job)
    now = 10.0
    for attempt in (1, 2):
        assert restart_orders(job.apply(1, protocol.Exited(rank=1, returncode=7), now))
        job.apply(0, protocol.Exited(rank=0, returncode=-15), now)
        for index in (0, 1):
            job.apply(index, protocol.Started(rank=index, pid=300 + attempt), now + 2)
        now += 5  # the new processes crash before they are ready: still a restart of a group that was ready once
    assert restart_orders(job.apply(1, protocol.Exited(rank=1, returncode=7), now)) == []
    assert job.failure.exit_code == 7 and job.failure.message.startswith("gave up restarting the job after 2 restarts in 10m")


def test_without_restart_the_first_failure_ends_the_job_as_before():
    job = make(policy=RestartPolicy())
    all_ready(job)
    assert restart_orders(job.apply(1, protocol.Exited(rank=1, returncode=3), 5.0)) == []
    assert job.failure.message == "rank 1 on b exited with code 3"


def test_pd_instances_restart_alone_and_restart_peers_replaces_the_decoders_once_the_prefill_is_back():
    hosts = (Host("p", slots=1, role="prefill"), Host("d1", slots=1, role="decode"), Host("d2", slots=1, role="decode"))
    job = make(policy=RestartPolicy(mode="on-failure", peers=True), hosts=hosts, command=("vllm", "serve", "m"))
    all_ready(job)
    (order,) = restart_orders(job.apply(0, protocol.Exited(rank=0, returncode=-9), 5.0))
    assert order.hosts == (0,) and "prefill instance p is restarting" in order.why
    assert [job.ranks[r].phase for r in (1, 2)] == [Phase.READY, Phase.READY]  # the decoders serve on meanwhile
    job.apply(0, protocol.Started(rank=0, pid=400), 6.0)
    back = job.apply(0, protocol.Ready(rank=0, address="10.0.0.1", port=5600, pid=400, rule="r", engine_id="e"), 8.0)
    peers = restart_orders(back)
    assert [o.hosts for o in peers] == [(1,), (2,)]
    assert [r.cause for r in job.restarts[1:]] == ["prefill instance p was replaced (--restart-peers)"] * 2


def test_a_stop_overtaking_a_restart_counts_its_ranks_as_ended():
    job = make()
    all_ready(job)
    job.apply(1, protocol.Exited(rank=1, returncode=1), 5.0)
    job.begin_stopping()
    job.apply(0, protocol.Exited(rank=0, returncode=-15), 5.1)  # the restart's stop, arriving while the job stops
    for i in (0, 1):
        job.hosts[i].gone = True
    assert job.all_ended


def test_a_restart_that_never_gets_ready_is_a_failed_attempt_after_the_ready_timeout_not_before():
    job = Job(planning.build([Host("a"), Host("b")], LaunchOptions(restart=ON, ready_timeout=30.0), {}, "j"))
    all_ready(job)
    (order,) = restart_orders(job.apply(1, protocol.Exited(rank=1, returncode=1), 10.0))
    job.apply(0, protocol.Exited(rank=0, returncode=-15), 10.1)
    for index in (0, 1):
        job.apply(index, protocol.Started(rank=index, pid=500 + index), 12.0)
    assert job.tick(10.0 + order.delay + 29.0, frozenset({0, 1})) == []  # slow, not failed: no restart storm
    (again,) = restart_orders(job.tick(10.0 + order.delay + 31.0, frozenset({0, 1})))
    assert again.attempt == 2 and job.restarts[-1].cause == "restart 1 of the job not ready after 30s"
    assert [job.ranks[r].exit_due for r in (0, 1)] == [True, True]  # both were started: their exits are ours


def test_a_router_that_dies_restarts_alone_after_its_backoff_and_counts_against_max_restarts():
    job = make()
    all_ready(job)
    said = job.router_exited("the router (vllm-router) was killed by signal 9", -9, 10.0)
    (record,) = job.restarts
    assert said == [
        jobs.Progress(f"restarting the router in {record.backoff:.1f}s (restart 1): the router (vllm-router) was killed by signal 9")
    ]
    assert job.failure is None and job.health() == "restarting: the router"
    assert all(r.phase is Phase.READY for r in job.ranks.values())  # the instances keep serving
    assert not [a for a in job.tick(10.0 + record.backoff - 0.1) if isinstance(a, jobs.StartRouter)]  # not before its backoff
    assert jobs.StartRouter(1) in job.tick(10.0 + record.backoff)
    assert jobs.StartRouter(1) not in job.tick(10.0 + record.backoff + 1)  # once
    assert job.router_ready(13.5) == [jobs.Progress("the router is ready again after restart 1 (3.5s)")]
    assert job.health() is None and job.result(14.0).restarts[0].ready_after == 3.5
    job.router_exited("the router (vllm-router) exited with code 3", 3, 20.0)
    assert job.failure is None
    job.router_exited("the router (vllm-router) exited with code 3", 3, 30.0)  # a third within the window: ON allows 2
    assert job.failure.kind is FailureKind.ROUTER and job.failure.exit_code == 3
    assert (
        job.failure.message
        == "gave up restarting the router after 2 restarts in 10m (--max-restarts); last: the router (vllm-router) exited with code 3"
    )


def test_without_restart_the_routers_exit_ends_the_job_with_its_code_and_one_that_never_serves_is_not_ready():
    job = make(policy=RestartPolicy())
    all_ready(job)
    assert job.router_exited("the router (r) was killed by signal 9", -9, 5.0) == []
    assert (job.failure.kind, job.failure.exit_code, job.failure.message) == (
        FailureKind.ROUTER,
        137,
        "the router (r) was killed by signal 9",
    )
    late = make(policy=RestartPolicy())
    all_ready(late)
    late.router_exited("the router (r) did not listen on 127.0.0.1:8000 within 60s (--ready-timeout)", None, 5.0)
    assert late.failure.kind is FailureKind.NOT_READY
    stopping = make()
    all_ready(stopping)
    stopping.begin_stopping()
    assert stopping.router_exited("the router (r) was killed by signal 15", -15, 5.0) == [] and stopping.restarts == []
