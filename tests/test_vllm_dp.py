"""--vllm-dp: vllm serve's data-parallel flags written per host, as vLLM 0.32 wants them for each load-balancing mode."""

import pytest

from conftest import RunningLauncher, standin_reports, wait_for, write_hostfile
from launcher import plan
from launcher.command import user_command
from launcher.plan import Host, LaunchOptions, PlanError
from launcher.readiness import Log, Ports, Url, WithHead
from support.netns import NET

NIXL = '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'
HOSTS = [Host("n1", slots=2), Host("n2", slots=2), Host("n3", slots=2)]


def commands(options, hosts=HOSTS):
    built = plan.build(hosts, options, {}, "j")
    return built, [list(user_command(r.argv)) for r in built.ranks]


def test_internal_mode_the_first_host_serves_the_api_and_the_others_are_headless_with_their_start_ranks():
    built, argv = commands(LaunchOptions(command=("vllm", "serve", "m", "--kv-transfer-config", NIXL), vllm_dp="internal"))
    dp = ["--data-parallel-size", "6", "--data-parallel-size-local", "2", "--data-parallel-address", "{head_ip}"]
    dp += ["--data-parallel-rpc-port", "13345"]
    assert argv[0] == ["vllm", "serve", "m", "--kv-transfer-config", NIXL, *dp]  # no start rank: vLLM would read hybrid
    assert argv[1] == [*argv[0], "--data-parallel-start-rank", "2", "--headless"]
    assert argv[2] == [*argv[0], "--data-parallel-start-rank", "4", "--headless"]
    assert [r.ports for r in built.ranks] == [(5600, 5601), (5602, 5603), (5604, 5605)]  # vLLM's own base + DP index
    assert built.readiness_of(0) == Url(url="http://{host_ip}:8000/health", ports=True)
    assert built.readiness_of(1) == built.readiness_of(2) == Ports()


def test_hybrid_mode_every_host_serves_its_own_api_and_none_is_headless():
    built, argv = commands(LaunchOptions(command=("vllm", "serve", "m", "--port", "9000"), vllm_dp="hybrid"))
    assert [a[a.index("--data-parallel-start-rank") + 1] for a in argv] == ["0", "2", "4"]
    assert not any("--headless" in a for a in argv)
    assert all(built.readiness_of(i) == Url(url="http://{host_ip}:9000/health") for i in range(3))


def test_without_a_side_channel_headless_hosts_are_ready_with_the_first():
    built, _ = commands(LaunchOptions(command=("vllm", "serve", "m"), vllm_dp="internal"))
    assert built.readiness_of(0) == Url(url="http://{host_ip}:8000/health")
    assert built.readiness_of(1) == WithHead()


def test_external_mode_one_process_and_api_port_per_rank():
    command = ("vllm", "serve", "m-moe", "--port", "9000", "--kv-transfer-config", NIXL)
    built, argv = commands(LaunchOptions(command=command, vllm_dp="external"), hosts=HOSTS[:2])
    assert argv == [  # --port moved to the end, one a rank
        ["vllm", "serve", "m-moe", "--kv-transfer-config", NIXL, "--data-parallel-size", "4", "--data-parallel-address", "{head_ip}",
         "--data-parallel-rpc-port", "13345", "--data-parallel-rank", str(r), "--port", str(9000 + r % 2)]
        for r in range(4)
    ]  # fmt: skip
    assert [r.ports for r in built.ranks] == [(5600,), (5601,), (5602,), (5603,)]
    assert all(built.readiness_of(i) == Ports() for i in range(2))
    assert any("MoE models only" in w for w in built.warnings)
    without_nixl, _ = commands(LaunchOptions(command=("vllm", "serve", "m-moe"), vllm_dp="external"), hosts=HOSTS[:1])
    assert without_nixl.readiness_of(0) == Log(pattern="Application startup complete")


def test_flags_the_user_gave_win_when_they_agree():
    command = ("vllm", "serve", "m", "-dp", "6", "--data-parallel-address=10.0.0.1", "--data-parallel-rpc-port", "2345")
    built, argv = commands(LaunchOptions(command=command, vllm_dp="internal"))
    assert argv[0] == [*command, "--data-parallel-size-local", "2"]
    assert built.hosts[0].rpc_port is None  # their port: launcher does not claim {rpc_port}


@pytest.mark.parametrize(
    "command, mode, hosts, message",
    [
        (("vllm", "serve", "m", "--data-parallel-size", "4"), "internal", HOSTS, "--data-parallel-size 4 in the command, but the hostfile's slots add up to 6"),  # noqa: E501
        (("vllm", "serve", "m", "--headless"), "internal", HOSTS, "--headless in the command: launcher makes every host but the first"),
        (("vllm", "serve", "m", "-dpn", "0"), "internal", HOSTS, "--data-parallel-rank in the command: launcher gives each process its DP rank"),  # noqa: E501
        (("vllm", "serve", "m", "--data-parallel-hybrid-lb"), "internal", HOSTS, "asks for hybrid load balancing: use --vllm-dp hybrid"),
        (("vllm", "serve", "m"), "hybrid", [Host("a", slots=2), Host("b")], "--vllm-dp hybrid needs at least 2 slots on every host"),
        (("vllm", "serve", "m", "-dpl", "2"), "internal", [Host("a", slots=2), Host("b")], "hosts have different slots (2, 1)"),
        (("python", "train.py"), "internal", HOSTS, "--vllm-dp writes the flags of 'vllm serve'"),
    ],
)  # fmt: skip
def test_a_flag_that_contradicts_the_hostfile_or_the_mode_is_refused_before_launch(command, mode, hosts, message):
    with pytest.raises(PlanError) as info:
        plan.build(hosts, LaunchOptions(command=command, vllm_dp=mode), {}, "j")
    assert str(info.value).startswith("--vllm-dp: ") and message in str(info.value)


def test_vllm_dp_needs_a_command_and_writes_the_head_command_itself():
    with pytest.raises(PlanError, match="give -- vllm serve MODEL"):
        plan.build(HOSTS, LaunchOptions(vllm_dp="internal"), {}, "j")
    with pytest.raises(PlanError, match="drop --head-command"):
        plan.build(HOSTS, LaunchOptions(command=("vllm", "serve", "m"), head_command=("vllm", "serve", "x"), vllm_dp="internal"), {}, "j")


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["internal", "hybrid", "external"])
def test_the_stand_in_accepts_each_modes_flags_and_every_engine_binds_its_own_port(mode, tmp_path, no_leaks, port_base, vllm_standin):
    # Two "hosts" on loopback addresses; the stand-in applies vLLM 0.32's load-balancing rules (it refuses mixed
    # modes, and external balancing for a model that is not MoE).
    hf = write_hostfile(tmp_path, "127.0.0.1 slots=2\n127.0.0.2 slots=2\n")
    api = port_base + 40
    run = RunningLauncher(
        ["-H", hf, "--port-base", str(port_base), "--rpc-port", str(port_base + 20), "--vllm-dp", mode, "--check"]
        + ["--", vllm_standin, "serve", "m-moe", "--port", str(api), "--kv-transfer-config", NIXL]
    )
    # Internal and hybrid: a process a host serving both its ranks; external: a process a rank.
    first_ranks = [0, 2] if mode != "external" else [0, 1, 2, 3]
    try:
        rows = run.ready_rows(len(first_ranks))
        assert [(r, p) for r, _, _, p, _ in rows] == [(r, port_base + r) for r in first_ranks]
        pairs = len(first_ranks) ** 2
        assert wait_for(lambda: any(f"all {pairs} TCP connects ok" in line for line in run.stdout), 30), run.stdout[-10:]
        seen = standin_reports(run.stdout).values()
        assert {s["dp_ranks"][0]: s["lb_mode"] for s in seen} == dict.fromkeys(first_ranks, mode)
        if mode == "external":  # an API server a rank, on --port + its local index
            assert sorted(s["argv"][s["argv"].index("--port") + 1] for s in seen) == [str(api), str(api), str(api + 1), str(api + 1)]
    finally:
        run.proc.terminate()
    assert run.finish() == 143


def test_over_ssh_one_line_starts_internal_dp_across_hosts(hosts, tmp_path, vllm_standin):
    hf = write_hostfile(tmp_path, "h1 slots=2\nh2 slots=2\nh3 slots=1\n")
    run = RunningLauncher(
        ["-H", hf, *hosts.ssh_args(), "--vllm-dp", "--check", "--", vllm_standin, "serve", "m", "--kv-transfer-config", NIXL]
    )
    try:
        rows = run.ready_rows(3)
        assert [(r, h, a, p) for r, h, a, p, _ in rows] == [
            (0, "h1", f"{NET}.11", 5600),
            (2, "h2", f"{NET}.12", 5602),
            (4, "h3", f"{NET}.13", 5604),
        ]
        assert wait_for(lambda: any("all 9 TCP connects ok" in line for line in run.stdout), 30), run.stdout[-10:]
        seen = {s["dp_ranks"][0]: (s["lb_mode"], s["headless"], s["side_channel_host"]) for s in standin_reports(run.stdout).values()}
        assert seen == {0: ("internal", False, f"{NET}.11"), 2: ("internal", True, f"{NET}.12"), 4: ("internal", True, f"{NET}.13")}
    finally:
        run.proc.terminate()
    assert run.finish() == 143
