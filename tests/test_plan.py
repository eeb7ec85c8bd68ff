import pytest

from launcher import plan
from launcher.plan import Host, LaunchOptions, PlanError

HOSTS = [Host("a", slots=2), Host("b", slots=3, ifname="eth1"), Host("c", slots=1)]


def test_ranks_follow_hostfile_order_with_ports_base_plus_dp_rank():
    p = plan.build(HOSTS, LaunchOptions(port_base=7000), {}, job_id="j1")
    assert [(r.rank, r.host, r.local_rank, r.port) for r in p.ranks] == [
        (0, "a", 0, 7000), (1, "a", 1, 7001), (2, "b", 0, 7002), (3, "b", 1, 7003), (4, "b", 2, 7004), (5, "c", 0, 7005),
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
