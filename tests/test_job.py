"""The head's decisions, without processes: which failure wins, which exit code, what the first line says."""

import pytest

from launcher import plan as planning
from launcher import protocol
from launcher.head import job as jobs
from launcher.head.job import Job, LinkClosed, LinkFailed, LinkOpened, Noise
from launcher.plan import Host, LaunchOptions
from launcher.results import FailureKind, Phase
from launcher.version import __version__

HOSTS = [Host("a", slots=1), Host("b", slots=2)]


def make(options=LaunchOptions(), hosts=HOSTS):
    return Job(planning.build(hosts, options, {}, "j"))


def hello(address="10.0.0.1", **kw):
    return protocol.Hello(hostname="x", pid=1, python="py", version=__version__, python_version="3.11.7", address=address, **kw)


def started(job):
    """Every agent connected and every rank started."""
    for i, h in enumerate(job.hosts):
        job.apply(i, LinkOpened(), 0.0)
        job.apply(i, hello(f"10.0.0.{i + 1}"), 0.1)
        for r in h.plan.ranks:
            job.apply(i, protocol.Started(rank=r.rank, pid=100 + r.rank), 0.2)
    return job


# (events after start, kind, exit code, first line)
CASES = {
    "a rank exits with its own code": (
        [(1, protocol.Output(rank=2, stream="stderr", line="CUDA out of memory")), (1, protocol.Exited(rank=2, returncode=3))],
        FailureKind.RANK_EXITED,
        3,
        "rank 2 on b exited with code 3; last output: CUDA out of memory",
    ),
    "a rank killed by a signal": (
        [(0, protocol.Exited(rank=0, returncode=-9))],
        FailureKind.RANK_EXITED,
        137,
        "rank 0 on a was killed by signal 9",
    ),
    "a serving rank exiting 0 is still a failure": (
        [(0, protocol.Exited(rank=0, returncode=0))],
        FailureKind.RANK_EXITED,
        1,
        "rank 0 on a exited with code 0",
    ),
    "a rank that said why, then exited": (
        [(1, protocol.RankError(rank=1, message="cannot bind 10.9.9.9:5601")), (1, protocol.Exited(rank=1, returncode=3))],
        FailureKind.RANK_ERROR,
        3,
        "rank 1 on b exited with code 3: cannot bind 10.9.9.9:5601",
    ),
    "a rank that can never become ready": (
        [(1, protocol.RankError(rank=1, message="port 5601 is held by pid 7", fatal=True))],
        FailureKind.NOT_READY,
        4,
        "rank 1 on b cannot become ready: port 5601 is held by pid 7",
    ),
    "scancel: the agent received SIGTERM": (
        [(1, protocol.Stopping(reason="x", signal=15)), (1, protocol.Exited(rank=1, returncode=-15))],
        FailureKind.SIGNAL,
        143,
        "the agent on b received SIGTERM (scancel, or a kill on that host); stopping every host",
    ),
    "scancel seen only by the backend": (
        [(1, LinkClosed(("slurmstepd: CANCELLED",), "Slurm cancelled its step (STEP 5.2)"))],
        FailureKind.SIGNAL,
        143,
        "host b: Slurm cancelled its step (STEP 5.2); stopping every host",
    ),
    "an agent that stops on its own": (
        [(1, protocol.Stopping(reason="no word from the head for 16s (heartbeat timeout)")), (1, protocol.Exited(rank=1, returncode=-15))],
        FailureKind.HOST_LOST,
        3,
        "the agent on b stopped its ranks: no word from the head for 16s (heartbeat timeout)",
    ),
    "an agent that ends": ([(1, LinkClosed(("Killed",)))], FailureKind.HOST_LOST, 3, "host b lost: its agent ended: Killed"),
    "the head failed talking to an agent": (
        [(0, LinkFailed("a (hostfile:1): the head failed talking to its agent (UnicodeError: x)"))],
        FailureKind.TRANSPORT,
        3,
        "a (hostfile:1): the head failed talking to its agent (UnicodeError: x)",
    ),
    "the first failure wins": (
        [(1, LinkClosed(("Killed",))), (0, protocol.Exited(rank=0, returncode=5))],
        FailureKind.HOST_LOST,
        3,
        "host b lost: its agent ended: Killed",
    ),
}


@pytest.mark.parametrize("events, kind, code, first", CASES.values(), ids=list(CASES))
def test_what_ends_a_job_and_with_which_exit_code(events, kind, code, first):
    job = started(make())
    for index, event in events:
        job.apply(index, event, 1.0)
    assert (job.failure.kind, job.failure.exit_code, job.failure.message) == (kind, code, first)
    assert job.result(2.0).exit_code == code


def test_an_agent_that_never_said_hello_gets_the_fix_its_last_words_point_at():
    job = make(hosts=[Host("a", cwd="/nope")])
    job.apply(0, LinkOpened(), 0.0)
    job.apply(0, LinkClosed(("sh: 1: cd: can't cd to /nope",)), 0.5)
    assert job.failure.kind is FailureKind.TRANSPORT and job.failure.exit_code == 3
    assert (
        job.failure.message == "host a: the agent did not start: sh: 1: cd: can't cd to /nope; "
        "fix cwd= for this host in the hostfile (the directory must exist there)"
    )


def test_an_agent_that_died_before_its_first_word_has_its_host_swept():
    """It may have forked ranks it never reported (scripts/chaos.py found one, SIGKILLed 20 ms in)."""
    job = make(hosts=[Host("a")])
    job.apply(0, LinkOpened(), 0.0)
    assert job.apply(0, LinkClosed(), 0.02) == [jobs.Sweep(0)]


def test_a_backend_that_cannot_sweep_gets_told_what_to_look_for_instead():
    job = Job(planning.build(HOSTS, LaunchOptions(), {}, "j"), sweeps=False)
    started(job)
    (told,) = job.apply(1, LinkClosed(), 1.0)
    assert told == jobs.Progress(
        "cannot sweep b: its backend starts no agents; its ranks die with their agent, but look there "
        "for processes with LAUNCHER_JOB_ID=j in their environment that left their session"
    )


def test_exits_while_stopping_or_after_ctrl_c_are_consequences_not_causes():
    for transition in (Job.begin_stopping, Job.interrupt):
        job = started(make())
        transition(job)
        job.apply(0, protocol.Exited(rank=0, returncode=-15), 1.0)
        job.apply(1, protocol.Stopping(reason="x", signal=15), 1.0)
        assert job.failure is None and job.ranks[0].phase is Phase.EXITED


def test_to_completion_counts_clean_exits_and_fails_on_the_first_other():
    job = started(make(LaunchOptions(command=("python", "t.py"), to_completion=True)))
    assert job.apply(0, protocol.Exited(rank=0, returncode=0), 1.0) == [jobs.Progress("ranks done 1/3 (rank 0 on a exited 0)")]
    assert job.failure is None
    job.apply(1, protocol.Exited(rank=2, returncode=7), 1.0)
    assert job.failure.exit_code == 7


def test_a_host_whose_bytes_wait_unread_is_not_silent():
    job = started(make())
    late = 100.0 + job.plan.options.heartbeat_timeout + 1
    job.hosts[0].last_seen = job.hosts[1].last_seen = 100.0
    assert job.tick(late, speaking=frozenset({0, 1})) == [] and job.failure is None  # a starved head reads late
    job.tick(late, speaking=frozenset({1}))
    assert job.failure.message.startswith("host a lost: no word from its agent")


def test_a_lost_agent_with_running_ranks_is_swept_a_silent_one_is_not():
    job = started(make())
    assert job.apply(1, LinkClosed(), 1.0) == [jobs.Sweep(1)]
    assert [job.ranks[r].phase for r in (1, 2)] == [Phase.LOST, Phase.LOST]
    quiet = started(make())
    now = 100.0 + quiet.plan.options.heartbeat_timeout + 1
    quiet.hosts[0].last_seen, quiet.hosts[1].last_seen = now, 100.0
    assert quiet.tick(now) == []  # no sweep: a silent host may be cut off; its agent times out on its own
    assert quiet.failure.message == "host b lost: no word from its agent for 16s (heartbeat timeout)"
    assert quiet.apply(1, LinkClosed(), 200.0) == []  # its later EOF adds nothing


def test_versions_differ_a_warning_or_in_a_preflight_a_failure():
    for strict in (False, True):
        job = make(LaunchOptions(strict_versions=strict))
        job.apply(0, hello(), 0.0)
        actions = job.apply(1, hello(vllm_version="0.32.0"), 0.0)
        message = "hosts run different vLLM versions: 0.32.0 on b; not installed on a; install one version everywhere"
        if strict:
            assert job.failure.kind is FailureKind.VERSIONS and job.failure.exit_code == 5 and job.failure.message == message
        else:
            assert job.failure is None and jobs.Progress(f"warning: {message}") in actions


def test_head_ip_comes_from_the_first_hosts_agent_or_the_job_fails():
    job = make(LaunchOptions(command=("x", "{head_ip}")))
    assert jobs.HeadAddress(0, "10.0.0.1") in job.apply(0, hello("10.0.0.1"), 0.0) and job.leader_ips == {0: "10.0.0.1"}
    bad = make(LaunchOptions(command=("x", "{head_ip}")))
    assert jobs.HeadAddress(0, None) in bad.apply(0, hello("", address_error="no interface matches ifname=ib"), 0.0)
    assert bad.failure.message == "host a has no address for {head_ip}: no interface matches ifname=ib"


def test_a_host_speaking_of_another_hosts_rank_is_ignored():
    job = started(make())
    assert job.apply(0, protocol.Exited(rank=2, returncode=1), 1.0) == [
        jobs.Progress("agent on a spoke of rank 2, which is not its own; ignored")
    ]
    assert job.failure is None and job.apply(0, Noise("Warning: x"), 1.0) == [jobs.Progress("agent on a printed: Warning: x")]


def test_not_ready_duplicate_addresses_and_unreachable_say_where_and_what_to_do():
    job = started(make())
    job.apply(0, protocol.Ready(rank=0, address="10.0.0.1", port=5600, pid=100, rule="r", engine_id="e"), 1.0)
    job.ranks[1].output.append("loading weights")
    job.not_ready(60)
    assert job.failure.exit_code == 4 and job.failure.message == (
        "2 ranks not ready after 60s: rank 1 on b (started), rank 2 on b (started); its last output: loading weights; "
        "raise --ready-timeout if they are slow"
    )
    dup = started(make())
    for r, address in ((0, "10.0.0.9"), (1, "10.0.0.9"), (2, "10.0.0.9")):
        dup.apply(0 if r == 0 else 1, protocol.Ready(rank=r, address=address, port=5600 + r, pid=1, rule="r", engine_id="e"), 1.0)
    assert dup.duplicate_address() and dup.failure.kind is FailureKind.DUPLICATE_ADDRESS and dup.failure.exit_code == 3
    assert dup.failure.message.startswith("hosts a and b both report address 10.0.0.9;")


def test_transfer_results_fill_the_transfer_matrix_and_a_failed_read_fails_the_check():
    from launcher.check import Target

    job = started(make())
    targets = [Target(r, "ab"[r > 0], f"10.0.0.{r}", (5600 + r,), f"e{r}") for r in range(3)]
    job.begin_check(targets, None, {r: "v2" for r in range(3)})
    job.begin_transfer_check(targets, None, 1 << 20)
    for a in range(3):
        for b in range(3):
            ok = (a, b) != (2, 0)
            result = protocol.TransferResult(rank=a, peer=b, ok=ok, mbps=900.0, used="x tcp/eth0", error=None if ok else "UCX: no route")
            job.apply({0: 0, 1: 1, 2: 1}[a], result, 1.0)
    assert job.matrix.results == {}  # a transfer is never taken for a handshake
    assert set(job.transfers.results) == {(a, b) for a in range(3) for b in range(3) if a != b}  # no rank reads itself
    assert job.transfers.complete and not job.transfers.ok
    job.judge_check(job.transfers)
    assert (job.failure.kind, job.failure.exit_code) == (FailureKind.CHECK, 5)
    assert job.failure.message == "1 of 6 pairs failed the NIXL transfer check; first: r2 (b) -> r0 (a): UCX: no route"
