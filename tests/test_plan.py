import pytest

from launcher import plan
from launcher.plan import Host, LaunchOptions, PlanError
from launcher.rankenv import RankIdentity

HOSTS = [Host("a", slots=2), Host("b", slots=3, ifname="eth1"), Host("c", slots=1)]


def test_ranks_follow_hostfile_order_with_ports_base_plus_dp_rank():
    p = plan.build(HOSTS, LaunchOptions(port_base=7000), {}, job_id="j1")
    assert [(r.rank, r.host, r.local_rank, r.port) for r in p.ranks] == [
        (0, "a", 0, 7000),
        (1, "a", 1, 7001),
        (2, "b", 0, 7002),
        (3, "b", 1, 7003),
        (4, "b", 2, 7004),
        (5, "c", 0, 7005),
    ]
    assert {r.world_size for r in p.ranks} == {6}
    assert [r.local_size for r in p.ranks] == [2, 2, 3, 3, 3, 1]
    assert len({r.engine_id for r in p.ranks}) == 6  # unique across hosts, unlike old vLLM's "_dp0" suffix
    assert p.ranks[2].env["LAUNCHER_BIND_IFNAME"] == "eth1"


def test_port_base_comes_from_the_heads_vllm_variable_then_default():
    assert plan.build(HOSTS, LaunchOptions(), {"VLLM_NIXL_SIDE_CHANNEL_PORT": "6100"}, "j").port_base == 6100
    assert plan.build(HOSTS, LaunchOptions(), {}, "j").port_base == 5600


@pytest.mark.parametrize(
    "hosts, options, env, message",
    [
        ([], LaunchOptions(), {}, "no hosts to launch on"),
        (HOSTS, LaunchOptions(port_base=65532), {}, "side-channel ports 65532..65537 run past 65535"),
        (HOSTS, LaunchOptions(), {"VLLM_NIXL_SIDE_CHANNEL_PORT": "x"}, "is 'x', not a port number"),
        (HOSTS, LaunchOptions(env=(("VLLM_NIXL_SIDE_CHANNEL_HOST", "10.0.0.1"),)), {}, "worker-specific"),
        (HOSTS, LaunchOptions(env=(("LAUNCHER_RANK", "1"),)), {}, "reserved LAUNCHER_ prefix"),
        ([Host("a", env=(("VLLM_NIXL_SIDE_CHANNEL_PORT", "1"),), origin="hf:2")], LaunchOptions(), {}, "hf:2"),
    ],
)
def test_bad_plans_are_one_line_errors(hosts, options, env, message):
    with pytest.raises(PlanError) as err:
        plan.build(hosts, options, env, "j")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_hashed_vllm_variable_that_differs_per_host_warns():
    hosts = [Host("a", env=(("VLLM_ATTENTION_BACKEND", "X"),)), Host("b")]
    assert any("VLLM_ATTENTION_BACKEND" in w for w in plan.build(hosts, LaunchOptions(), {}, "j").warnings)
    ok = [Host("a", env=(("NCCL_SOCKET_IFNAME", "eth1"),)), Host("b")]
    assert plan.build(ok, LaunchOptions(), {}, "j").warnings == ()


# --- user commands -----------------------------------------------------------

from conftest import VLLM_DP_FLAGS  # noqa: E402
from launcher.command import user_command  # noqa: E402
from launcher.readiness import Log, Ports, Report  # noqa: E402
from launcher.vllm.flags import kv_transfer_engine_id  # noqa: E402

VLLM_DP = (
    "vllm",
    "serve",
    "M",
    *VLLM_DP_FLAGS,
    "--kv-transfer-config",
    '{"kv_connector":"NixlConnector","kv_role":"kv_both"}',
    "--headless",
)


def test_per_host_mode_starts_one_process_per_host_with_its_dp_slice():
    p = plan.build(HOSTS, LaunchOptions(port_base=7000, command=VLLM_DP, per_host=True, rpc_port=9000), {}, "j")
    commands = [user_command(r.argv) for r in p.ranks]
    assert [(r.host, r.rank, r.ports) for r in p.ranks] == [
        ("a", 0, (7000, 7001)),
        ("b", 2, (7002, 7003, 7004)),
        ("c", 5, (7005,)),
    ]
    assert [c[4:10:2] for c in commands] == [("6", "2", "0"), ("6", "3", "2"), ("6", "1", "5")]
    # {head_ip} waits for the hosts; everything else is filled in by the plan.
    assert {c[10] for c in commands} == {"{head_ip}"} and {c[12] for c in commands} == {"9000"}
    assert p.leaders == {0} and p.world_size == 6 and p.readiness == Ports()
    # Per rank (the default), every rank is its own process with its own port.
    per_rank = plan.build(
        HOSTS, LaunchOptions(command=("x", "{rank}", "{local_rank}", "{port}")), {"VLLM_NIXL_SIDE_CHANNEL_PORT": "7000"}, "j"
    )
    assert [user_command(r.argv) for r in per_rank.ranks][3] == ("x", "3", "1", "7003")


def test_a_vllm_command_is_expected_where_its_own_dp_flags_bind_it():
    kv = ("--kv-transfer-config", '{"kv_connector":"NixlConnector"}')
    # vLLM's recipe: the API-server host names no start rank (vLLM 0.32 would infer hybrid load balancing).
    head = ("vllm", "serve", "M", "-dp", "{world_size}", "--data-parallel-size-local", "{local_size}", *kv)
    p = plan.build(HOSTS, LaunchOptions(port_base=7000, command=VLLM_DP, head_command=head, per_host=True), {}, "j")
    assert [r.ports for r in p.ranks] == [(7000, 7001), (7002, 7003, 7004), (7005,)]
    # Prefill and decode without data parallelism: each binds base + 0 on its own host, whatever its rank.
    pd = plan.build(HOSTS, LaunchOptions(port_base=7000, command=("vllm", "serve", "M", *kv), per_host=True), {}, "j")
    assert [r.ports for r in pd.ranks] == [(7000,), (7000,), (7000,)]
    # External load balancing: the rank it is given.
    ext = plan.build(
        [Host("a")], LaunchOptions(port_base=7000, command=("vllm", "serve", "M", "-dp", "8", "--data-parallel-rank", "5", *kv)), {}, "j"
    )
    assert ext.ranks[0].ports == (7005,)
    # Not vLLM: the launcher's own rule, base + rank.
    other = plan.build(HOSTS, LaunchOptions(port_base=7000, command=("python", "serve.py")), {}, "j")
    assert [r.port for r in other.ranks] == [7000, 7001, 7002, 7003, 7004, 7005]


def test_two_vllm_processes_that_would_bind_one_port_on_a_host_are_refused():
    kv = ("--kv-transfer-config", '{"kv_connector":"NixlConnector"}')
    with pytest.raises(plan.PlanError, match=r"a: processes 0 and 1 would both bind side-channel port 7000"):
        plan.build([Host("a", slots=2)], LaunchOptions(port_base=7000, command=("vllm", "serve", "M", *kv)), {}, "j")


def test_vllm_without_a_nixl_connector_needs_another_readiness_rule():
    command = ("vllm", "serve", "M", "--data-parallel-size", "1")
    with pytest.raises(plan.PlanError, match="runs vllm serve without a NixlConnector --kv-transfer-config.*--ready-url"):
        plan.build([Host("a")], LaunchOptions(command=command), {}, "j")
    assert plan.build([Host("a")], LaunchOptions(command=command, readiness=Log(pattern="x")), {}, "j").ranks


def test_the_head_command_runs_on_the_first_host_only():
    options = LaunchOptions(command=VLLM_DP, head_command=VLLM_DP[:-1], per_host=True)
    argvs = [user_command(r.argv) for r in plan.build(HOSTS, options, {}, "j").ranks]
    assert "--headless" not in argvs[0] and all(a[-1] == "--headless" for a in argvs[1:])


@pytest.mark.parametrize(
    "options, hosts, message",
    [
        (LaunchOptions(command=("vllm", "--x={rnak}")), HOSTS, "unknown placeholder {rnak} in argument 1 of the command ('--x={rnak}')"),
        (LaunchOptions(head_command=("vllm",)), HOSTS, "a head command needs a command for the other hosts too"),
        (LaunchOptions(per_host=True), HOSTS, "--per-host applies to a command that serves all of a host's DP ranks"),
        (LaunchOptions(to_completion=True), HOSTS, "--to-completion is for a command that ends"),
        (
            LaunchOptions(command=("vllm", "--kv-transfer-config", '{"engine_id": "p"}'), per_host=True),
            HOSTS,
            "engine_id 'p' to rank 0 and rank 2 (hosts a and b)",
        ),
        (
            LaunchOptions(
                command=("vllm", '--kv-transfer-config={"engine_id": "p"'),
            ),
            HOSTS,
            "--kv-transfer-config is not valid JSON",
        ),
        (
            LaunchOptions(command=("vllm",)),
            [Host("a", origin="hf:1"), Host("b", env=(("VLLM_NIXL_SIDE_CHANNEL_HOST", "0.0.0.0"),), origin="hf:2")],
            "hf:2): env:VLLM_NIXL_SIDE_CHANNEL_HOST=0.0.0.0 is the wildcard address",
        ),
        (
            LaunchOptions(command=("vllm",)),
            [Host("a"), Host("b", env=(("VLLM_NIXL_SIDE_CHANNEL_HOST", "localhost"),))],
            "env:VLLM_NIXL_SIDE_CHANNEL_HOST=localhost is loopback",
        ),
        (LaunchOptions(command=("vllm",), readiness=Report()), HOSTS, "cannot report readiness itself"),
    ],
)
def test_traps_in_user_commands_are_caught_before_launch(options, hosts, message):
    with pytest.raises(PlanError) as err:
        plan.build(hosts, options, {}, "j")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unique_engine_ids_and_loopback_only_jobs_are_fine():
    per_host = ("vllm", "--kv-transfer-config", '{"engine_id": "decode-{host}-{rank}"}')
    p = plan.build(HOSTS, LaunchOptions(command=per_host), {}, "j")
    assert kv_transfer_engine_id(user_command(p.ranks[2].argv)) == "decode-b-2"
    loopback = [Host("localhost", env=(("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1"),))]
    assert plan.build(loopback, LaunchOptions(command=("vllm",)), {}, "j").world_size == 1


def test_the_preflight_plan_binds_the_same_hosts_and_ports_with_the_builtin_core():
    user = plan.build(HOSTS, LaunchOptions(command=VLLM_DP, per_host=True), {"VLLM_NIXL_SIDE_CHANNEL_PORT": "7000"}, "j")
    pre = plan.preflight_plan(user)
    assert pre.builtin and pre.options.strict_versions and pre.readiness == Report()
    assert [r.port for r in pre.ranks] == [p for r in user.ranks for p in r.ports]
    assert [h.host for h in pre.hosts] == [h.host for h in user.hosts]


def test_a_finite_commands_preflight_serves_and_its_cores_move_bytes_when_asked():
    user = plan.build(HOSTS, LaunchOptions(command=("pytest",), to_completion=True, transfer_bytes=4096), {}, "j")
    assert all(RankIdentity.from_env(r.env).transfer_bytes is None for r in user.ranks)  # a command has no NIXL buffer
    pre = plan.preflight_plan(user)  # the built-in core serves until its check is done, whatever the command does
    assert not pre.options.to_completion
    assert all(RankIdentity.from_env(r.env).transfer_bytes == 4096 for r in pre.ranks)


def test_the_auto_transport_follows_where_the_hosts_are():
    from launcher.transports import choose

    remote = [Host("n1"), Host("n2")]
    allocation = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "1(x3)"}
    assert choose(remote, allocation) == "slurm"  # every host is a node of this allocation
    assert choose(remote, {**allocation, "SLURM_JOB_NODELIST": "n[2-3]"}) == "ssh"
    assert choose(remote, {}) == "ssh"
    assert choose([Host("localhost")], allocation) == "local"


def test_job_wide_bind_selectors_fill_in_for_hosts_without_their_own():
    options = LaunchOptions(ifname="ib", cidr="10.1.0.0/16")
    p = plan.build([Host("a", ifname="eth1"), Host("b")], options, {}, "j")  # Slurm nodes look like "b": no line of their own
    assert [(h.host.ifname, h.host.cidr) for h in p.hosts] == [("eth1", "10.1.0.0/16"), ("ib", "10.1.0.0/16")]
    assert p.ranks[1].env["LAUNCHER_BIND_IFNAME"] == "ib"
