"""--vllm-nodes: one vLLM instance whose tensor/pipeline parallel workers span the hosts, without Ray.

The flags are vLLM 0.32's multiprocessing executor's (--nnodes, --node-rank,
--master-addr, --master-port, --headless on every node but the first), and
what vLLM would refuse is refused before launch with vLLM's reason; the
stand-in vLLM applies the same checks (tests/standin_vllm.py).
"""

import json
import urllib.request

import pytest

from conftest import RunningLauncher, run_launcher, standin_reports, wait_for, write_hostfile
from launcher import plan
from launcher.command import user_command
from launcher.plan import Host, LaunchOptions, PlanError
from launcher.readiness import Url, WithHead
from support.netns import NET


def test_plan_json_shows_each_nodes_exact_argv_and_its_readiness(tmp_path):
    hf = write_hostfile(tmp_path, "h1\nh2\n")
    done = run_launcher("plan", "-H", hf, "--vllm-nodes", "--rpc-port", "29511", "--json", "--", "vllm", "serve", "M", "-tp", "2")
    assert done.returncode == 0, done.stderr
    hosts = json.loads(done.stdout)["hosts"]
    common = ["vllm", "serve", "M", "-tp", "2", "--nnodes", "2"]
    assert [h["processes"][0]["argv"] for h in hosts] == [
        [*common, "--node-rank", "0", "--master-addr", "{head_ip}", "--master-port", "29511"],
        [*common, "--node-rank", "1", "--master-addr", "{head_ip}", "--master-port", "29511", "--headless"],
    ]
    assert [h["readiness"] for h in hosts] == [
        "GET http://{host_ip}:8000/health answers 2xx",
        "it runs (a headless host: the first host's API server answers only once every engine has joined)",
    ]


def test_the_first_node_serves_the_api_and_the_others_are_ready_with_it():
    built = plan.build(
        [Host("a"), Host("b"), Host("c"), Host("d")],
        LaunchOptions(command=("vllm", "serve", "M", "-pp", "2", "-tp", "2"), vllm_nodes=True),
        {},
        "j",
    )
    assert built.hosts[0].readiness == Url(url="http://{host_ip}:8000/health", ports=False)
    assert [hp.readiness for hp in built.hosts[1:]] == [WithHead()] * 3
    assert [user_command(r.argv)[-1] for r in built.ranks] == ["13345", "--headless", "--headless", "--headless"]


@pytest.mark.parametrize(
    "hosts, command, message",
    [
        ([Host("a"), Host("b"), Host("c")], ("vllm", "serve", "M", "-tp", "2"),
         "vLLM refuses it: `--nnodes 3` must evenly divide the total world size (2)"),
        ([Host("a"), Host("b")], ("vllm", "serve", "M", "-tp", "2", "--data-parallel-backend", "ray"),
         "vLLM refuses it: `--nnodes 2` requires `--data-parallel-backend mp`; got `--data-parallel-backend ray`"),
        ([Host("a"), Host("b")], ("vllm", "serve", "M", "-tp", "2", "--node-rank", "1"),
         "--node-rank in the command: launcher gives each host its node rank"),
        ([Host("a"), Host("b")], ("vllm", "serve", "M", "--headless"),
         "--headless in the command: launcher makes every host but the first headless"),
        ([Host("a", slots=2), Host("b")], ("vllm", "serve", "M", "-tp", "2"), "a: --vllm-nodes runs one process per host"),
        ([Host("a"), Host("b")], ("python", "x.py"), "--vllm-nodes writes the multi-node flags of 'vllm serve'"),
    ],
)  # fmt: skip
def test_what_vllm_would_refuse_is_refused_before_launch(hosts, command, message):
    with pytest.raises(PlanError, match=None) as err:
        plan.build(hosts, LaunchOptions(command=command, vllm_nodes=True), {}, "j")
    assert message in str(err.value)


def test_over_ssh_one_line_starts_a_two_node_tensor_parallel_instance(hosts, tmp_path, vllm_standin, port_base):
    hf = write_hostfile(tmp_path, "h1\nh2\n")
    rpc = port_base + 7
    run = RunningLauncher(
        [
            "-H",
            hf,
            *hosts.ssh_args(),
            "--vllm-nodes",
            "--rpc-port",
            str(rpc),
            "--check",
            "--wire",
            "v2",
            "--",
            vllm_standin,
            "serve",
            "m",
            "-tp",
            "2",
            "--port",
            "8300",
            "--kv-transfer-config",
            '{"kv_connector":"NixlConnector","kv_role":"kv_both"}',
        ]
    )
    try:
        assert wait_for(lambda: any("ranks ready 2/2" in line for line in run.stderr), 60), run.stderr[-8:]
        assert wait_for(lambda: any(f"node 1 joined {NET}.11:{rpc}" in line for line in run.stdout), 30), run.stdout[-8:]
        seen = {host: s["nodes"] | {"headless": s["headless"]} for (_, host), s in standin_reports(run.stdout).items()}
        assert seen == {
            "h1": {"nnodes": 2, "node_rank": 0, "master": f"{NET}.11:{rpc}", "headless": False},
            "h2": {"nnodes": 2, "node_rank": 1, "master": f"{NET}.11:{rpc}", "headless": True},
        }
        with urllib.request.urlopen(f"http://{NET}.11:8300/health", timeout=10) as reply:
            assert reply.status == 200  # the instance's API server, on the first node
        # --check: the instance's one side channel, on the first node (its engine core); h2 runs workers only.
        assert wait_for(lambda: any("all 1 handshakes ok" in line for line in run.stdout), 20), run.stdout[-10:]
        assert any("rank 1 on h2: a headless node serves no side channel of its own; not probed" in x for x in run.stderr)
    finally:
        run.proc.terminate()
    assert run.finish() == 143
