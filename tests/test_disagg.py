"""Prefill/decode in one job: roles, each role's vllm serve, the proxy that routes prefill then decode."""

import http.client
import json
import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from conftest import RunningLauncher, failed_line, free_port_base, port_taken, run_launcher, standin_reports, wait_for, write_hostfile
from launcher import cli, hostfile, plan
from launcher.command import user_command
from launcher.plan import Host, LaunchOptions, PlanError
from launcher.readiness import Url, WithHead
from launcher.vllm import disagg
from support.netns import NET

PRODUCER = '{"kv_connector":"NixlConnector","kv_role":"kv_producer"}'
CONSUMER = '{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}'


def test_roles_come_from_the_command_line_over_the_hostfile_and_every_host_needs_one():
    hosts = hostfile.parse("a role=decode\nb\nc\n")
    assert [h.role for h in disagg.assign_roles(hosts, [["a"], ["b"]], [["c"]])] == ["prefill", "prefill", "decode"]
    with pytest.raises(disagg.RoleError, match="host a is in both --prefill and --decode"):
        disagg.assign_roles(hosts, [["a"]], [["a"]])
    with pytest.raises(disagg.RoleError, match="host a is in two --prefill instances"):
        disagg.assign_roles(hosts, [["a", "b"], ["a"]], [["c"]])
    with pytest.raises(disagg.RoleError, match="--prefill/--decode name z, which the hostfile does not list"):
        disagg.assign_roles(hosts, [["z"]], [])
    with pytest.raises(PlanError, match=r"b \(hostfile:2\) has no role: give it role=prefill or role=decode"):
        plan.build(hostfile.parse("a role=decode\nb\n", source="hostfile"), LaunchOptions(command=("vllm", "serve", "m")), {}, "j")
    with pytest.raises(PlanError, match="no prefill host"):
        plan.build([Host("a", role="decode")], LaunchOptions(command=("vllm", "serve", "m")), {}, "j")
    with pytest.raises(hostfile.HostfileError, match="role='prefil': a host's role is prefill or decode"):
        hostfile.parse("a role=prefil\n")


def test_each_role_host_runs_its_own_instance_with_nixl_in_its_role_and_its_slots_as_dp():
    hosts = [Host("p", role="prefill"), Host("d", slots=2, role="decode")]
    built = plan.build(hosts, LaunchOptions(command=("vllm", "serve", "m", "--port", "8100")), {}, "j")
    argv = [list(user_command(r.argv)) for r in built.ranks]
    assert argv[0] == ["vllm", "serve", "m", "--port", "8100", "--kv-transfer-config", PRODUCER]
    assert argv[1] == ["vllm", "serve", "m", "--port", "8100", "--kv-transfer-config", CONSUMER, "--data-parallel-size", "2"]
    assert [r.ports for r in built.ranks] == [(5600,), (5600, 5601)]  # each instance its own DP indexes
    assert built.readiness == Url(url="http://{host_ip}:8100/health", ports=True) and built.roles == ("prefill", "decode")


def test_a_connector_the_command_names_reaches_both_roles_verbatim():
    own = '{"kv_connector": "NixlConnector", "kv_role": "kv_both", "engine_id": "{host}"}'
    hosts = [Host("p", role="prefill"), Host("d", role="decode")]
    built = plan.build(hosts, LaunchOptions(command=("vllm", "serve", "m", "--kv-transfer-config", own)), {}, "j")
    assert [list(user_command(r.argv))[-1] for r in built.ranks] == [own.replace("{host}", "p"), own.replace("{host}", "d")]


def test_plan_json_shows_every_hosts_argv_for_two_dp2_prefills_and_one_dp2_decode_on_six_hosts(tmp_path):
    hf = write_hostfile(
        tmp_path, "".join(f"{h} role=prefill group=p{i // 2}\n" for i, h in enumerate(["p1", "p2", "p3", "p4"])) + "d1\nd2\n"
    )
    done = run_launcher(
        "plan", "-H", hf, "--decode", "d1+d2", "--rpc-port", "13000", "--json", "--", "vllm", "serve", "M", "--port", "8100"
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    dp = ["--data-parallel-size", "2", "--data-parallel-size-local", "1", "--data-parallel-address", "{head_ip}"]
    leader = lambda kv, rpc: ["vllm", "serve", "M", "--port", "8100", "--kv-transfer-config", kv, *dp, "--data-parallel-rpc-port", str(rpc)]
    argv = {h["name"]: h["processes"][0]["argv"] for h in doc["hosts"]}
    assert argv == {
        "p1": leader(PRODUCER, 13000), "p2": [*leader(PRODUCER, 13000), "--data-parallel-start-rank", "1", "--headless"],
        "p3": leader(PRODUCER, 13001), "p4": [*leader(PRODUCER, 13001), "--data-parallel-start-rank", "1", "--headless"],
        "d1": leader(CONSUMER, 13002), "d2": [*leader(CONSUMER, 13002), "--data-parallel-start-rank", "1", "--headless"],
    }  # fmt: skip
    assert [(i["role"], i["name"], i["hosts"], i["api_hosts"], i["rpc_port"]) for i in doc["instances"]] == [
        ("prefill", "p0", ["p1", "p2"], ["p1"], 13000),
        ("prefill", "p1", ["p3", "p4"], ["p3"], 13001),
        ("decode", "d1+d2", ["d1", "d2"], ["d1"], 13002),
    ]
    ports = {h["name"]: h["processes"][0]["ports"] for h in doc["hosts"]}
    assert ports == {"p1": [5600], "p2": [5601], "p3": [5600], "p4": [5601], "d1": [5600], "d2": [5601]}  # base + DP index
    headless = {h["name"]: h["readiness"] for h in doc["hosts"]}
    assert headless["p2"] == "its side-channel ports accept TCP connections" and "8100/health" in headless["p1"]
    text = run_launcher("plan", "-H", hf, "--decode", "d1+d2", "--", "vllm", "serve", "M").stdout
    assert "prefill instance p0: DP 2 over p1, p2; API server on p1, DP RPC port 13345, {head_ip} = p1's address" in text


def test_an_instance_over_hosts_takes_the_hybrid_mode_and_refuses_what_vllm_would():
    hosts = [Host("p1", slots=2, role="prefill", group="p"), Host("p2", slots=2, role="prefill", group="p"), Host("d", role="decode")]
    hybrid = plan.build(hosts, LaunchOptions(command=("vllm", "serve", "m"), vllm_dp="hybrid"), {}, "j")
    second = list(user_command(hybrid.hosts[1].ranks[0].argv))
    assert "--headless" not in second and second[second.index("--data-parallel-start-rank") + 1] == "2"
    assert [plan_host.readiness for plan_host in hybrid.hosts][:2] == [Url(url="http://{host_ip}:8000/health", ports=True)] * 2
    assert [hybrid.hosts[i].host.name for i in hybrid.api_hosts(hybrid.instances[0])] == ["p1", "p2"]
    serve = ("vllm", "serve", "m")
    refused = {
        "external": (LaunchOptions(command=serve, vllm_dp="external"), "--vllm-dp external in a P/D job"),
        "hybrid, one slot": (LaunchOptions(command=serve, vllm_dp="hybrid"), "prefill instance p: --vllm-dp hybrid needs at least 2 slots"),
        "size": (
            LaunchOptions(command=(*serve, "-dp", "3")),
            "instance p: --data-parallel-size 3 in the command, but the hostfile's slots add up to 4",
        ),
        "rpc ports": (LaunchOptions(command=serve, rpc_port=65535), "DP RPC ports 65535..65536 run past 65535 for 2 instances"),
    }
    for what, (options, message) in refused.items():
        tried = hosts if what != "hybrid, one slot" else [replace(h, slots=1) for h in hosts]
        with pytest.raises(PlanError) as info:
            plan.build(tried, options, {}, "j")
        assert message in str(info.value), what
    mixed = hostfile.parse("a role=prefill group=g\nb role=decode group=g\n", source="hf")
    with pytest.raises(
        PlanError, match=r"b \(hf:2\) is in group g with role=decode, but a \(hf:1\) has role=prefill: one instance has one role"
    ):
        plan.build(mixed, LaunchOptions(command=("vllm", "serve", "m")), {}, "j")
    with pytest.raises(hostfile.HostfileError, match="group='p 0'"):
        hostfile.parse("a role=prefill 'group=p 0'\n")


@pytest.mark.parametrize(
    "text, instances",
    [
        ("h1,h2", [["h1"], ["h2"]]),  # one instance a host, as before groups
        ("h[1-2]", [["h1"], ["h2"]]),
        ("h1+h2", [["h1", "h2"]]),
        ("h[1-2]+h[3-4],h5", [["h1", "h2", "h3", "h4"], ["h5"]]),
        ("a[1,3]+b,c", [["a1", "a3", "b"], ["c"]]),
    ],
)
def test_prefill_and_decode_host_lists_join_hosts_with_plus(text, instances):
    assert cli._instances(text) == instances


def test_with_vllm_nodes_an_instances_hosts_are_its_tensor_parallel_nodes():
    hosts = [Host("p1", role="prefill", group="p"), Host("p2", role="prefill", group="p"), Host("d", role="decode")]
    built = plan.build(hosts, LaunchOptions(command=("vllm", "serve", "m", "-tp", "2"), vllm_nodes=True, rpc_port=29500), {}, "j")
    argv = [list(user_command(r.argv)) for r in built.ranks]
    common = ["vllm", "serve", "m", "-tp", "2", "--kv-transfer-config"]
    assert argv == [
        [*common, PRODUCER, "--nnodes", "2", "--node-rank", "0", "--master-addr", "{head_ip}", "--master-port", "29500"],
        [*common, PRODUCER, "--nnodes", "2", "--node-rank", "1", "--master-addr", "{head_ip}", "--master-port", "29500", "--headless"],
        [*common, CONSUMER],  # the decode instance is one host: no node flags
    ]
    assert [hp.readiness for hp in built.hosts][1] == WithHead()  # workers only: no side channel, no API
    assert [hp.leader for hp in built.hosts] == [0, 0, 2] and built.hosts[0].rpc_port == 29500
    with pytest.raises(PlanError, match="prefill instance p: --vllm-nodes: each host of an instance is one node"):
        plan.build([replace(h, slots=2) for h in hosts], LaunchOptions(command=("vllm", "serve", "m"), vllm_nodes=True), {}, "j")
    with pytest.raises(PlanError, match="--vllm-nodes with --vllm-dp"):
        plan.build(hosts, LaunchOptions(command=("vllm", "serve", "m"), vllm_nodes=True, vllm_dp="internal"), {}, "j")


def test_over_ssh_a_prefill_instance_of_two_tensor_parallel_nodes_serves_the_decoder(hosts, tmp_path, vllm_standin):
    proxy = free_port_base(4)
    hf = write_hostfile(tmp_path, "h1\nh2\nh3\n")
    args = ["-H", hf, *hosts.ssh_args(), "--prefill", "h1+h2", "--decode", "h3", "--vllm-nodes", "--rpc-port", str(proxy + 2)]
    args += ["--proxy-port", str(proxy), "--check", "--wire", "v2", "--", vllm_standin, "serve", "m", "-tp", "2", "--port", "8100"]
    run = RunningLauncher(args)
    try:
        assert wait_for(lambda: any("P/D proxy on http://" in line for line in run.stderr), 30), run.stderr[-5:]
        answer = json.loads(post(proxy, "/v1/completions", {"prompt": "x", "max_tokens": 2})[2])
        assert answer["pulled_from"] == f"{NET}.11:5600"  # the instance's engine core, on its first node
        seen = {host: s["nodes"] | {"headless": s["headless"]} for (_, host), s in standin_reports(run.stdout).items()}
        assert seen["h2"] == {"nnodes": 2, "node_rank": 1, "master": f"{NET}.11:{proxy + 2}", "headless": True}
        assert seen["h3"]["nnodes"] == 1  # the decoder: one host, no node flags
        assert any("all 4 handshakes ok" in line for line in run.stdout), run.stdout[-8:]  # h1 and h3's engines
    finally:
        run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 130


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("h1[]-,+ab \\x00é"), max_size=24))
def test_any_prefill_text_is_instances_of_host_names_or_a_one_line_error(text):
    try:
        found = cli._instances(text)
    except PlanError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    assert all(names and all(names) for names in found)
    hosts = [Host(name) for name in ("h1", "h2", "a", "b")]
    try:
        assigned = disagg.assign_roles(hosts, found, [])
    except disagg.RoleError as exc:
        assert "\n" not in str(exc)
        return
    assert {h.name for h in assigned if h.role == "prefill"} == {n for names in found for n in names}


@pytest.mark.parametrize(
    "command, message",
    [
        (
            ("vllm", "serve", "m", "--headless"),
            "prefill instance p: --headless in the command: launcher writes it per host of each instance",
        ),
        (("vllm", "serve", "m", "--kv-transfer-config", '{"kv_connector":"LMCacheConnectorV1"}'), "the P/D proxy speaks the NixlConnector"),
        (("vllm", "serve", "m", "-dp", "4"), "--data-parallel-size 4 in the command, but a host's slots are its instance's DP size (1)"),
        (("python", "x.py"), "--prefill/--decode run 'vllm serve'"),
    ],
)
def test_a_command_that_cannot_be_a_pd_instance_is_refused_before_launch(command, message):
    with pytest.raises(PlanError, match=None) as info:
        plan.build([Host("p", role="prefill"), Host("d", role="decode")], LaunchOptions(command=command), {}, "j")
    assert message in str(info.value)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(st.text(max_size=12), JSON, max_size=6), prefilled=st.dictionaries(st.text(max_size=20), JSON, max_size=4))
def test_requests_are_rewritten_for_each_role_whatever_the_client_sent(body, prefilled):
    sent = json.dumps(body, sort_keys=True)
    p = disagg.prefill_request(body)
    assert p["max_tokens"] == 1 and p["stream"] is False and p["kv_transfer_params"]["do_remote_decode"] is True
    assert not {"stream_options", "min_tokens", "min_completion_tokens"} & set(p)
    d = disagg.decode_request(body, prefilled)
    params = prefilled.get("kv_transfer_params")
    assert d.get("kv_transfer_params") == (params if isinstance(params, dict) and params else None)  # never the client's
    assert {k: v for k, v in d.items() if k != "kv_transfer_params"} == {k: v for k, v in body.items() if k != "kv_transfer_params"}
    assert json.dumps(body, sort_keys=True) == sent  # the client's request is never changed in place


def post(port, path, body, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json"})
    reply = conn.getresponse()
    return reply.status, reply.getheader("Content-Type"), reply.read()


@pytest.fixture
def pd_job(tmp_path, no_leaks, vllm_standin):
    """Prefill on 127.0.0.1, decode (DP 2) on 127.0.0.2, the proxy on 127.0.0.1: a P/D job of stand-ins."""
    base = free_port_base(12)
    api, proxy = base + 8, base + 10
    hf = write_hostfile(tmp_path, "127.0.0.1 role=prefill\n127.0.0.2 slots=2 role=decode\n")
    run = RunningLauncher(
        ["-H", hf, "--port-base", str(base), "--proxy-port", str(proxy), "--", vllm_standin, "serve", "m", "--port", str(api)]
    )
    run.ready_rows(2)
    try:
        assert wait_for(lambda: any("P/D proxy on http://" in line for line in run.stderr), 10), run.stderr[-5:]
        yield run, base, proxy
    finally:
        if run.proc.poll() is None:
            run.proc.send_signal(signal.SIGINT)
        run.finish()


@pytest.mark.e2e
def test_a_request_goes_to_prefill_then_decode_which_pulls_from_the_prefill_engine(pd_job):
    run, base, proxy = pd_job
    status, kind, data = post(proxy, "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 5})
    answer = json.loads(data)
    assert status == 200 and kind == "application/json", data
    assert answer["pulled_from"] == f"127.0.0.1:{base}" and answer["usage"]["completion_tokens"] == 5
    assert answer["kv_seen"]["remote_engine_id"].endswith("_dp0")
    # Streamed: relayed chunk by chunk, as the decoder sends it.
    status, kind, data = post(proxy, "/v1/chat/completions", {"model": "m", "messages": [], "max_tokens": 3, "stream": True})
    assert status == 200 and kind == "text/event-stream" and data.endswith(b"data: [DONE]\n\n"), data
    assert json.loads(data.split(b"\n\n")[0][len(b"data: ") :])["pulled_from"] == f"127.0.0.1:{base}"
    assert {host: s["dp_size"] for (_, host), s in standin_reports(run.stdout).items()} == {"127.0.0.1": 1, "127.0.0.2": 2}


@pytest.mark.e2e
def test_the_proxy_refuses_what_is_not_a_completion_request(pd_job):
    _, _, proxy = pd_job
    assert post(proxy, "/v1/completions", None, raw=b"{not json")[0] == 400
    assert post(proxy, "/v1/completions", None, raw=b"[1, 2]")[0] == 400
    assert post(proxy, "/v1/embeddings", {})[0] == 404
    conn = http.client.HTTPConnection("127.0.0.1", proxy, timeout=10)
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read()) == {"status": "ok", "prefill_instances": 1, "decode_instances": 1, "down": {}}


@pytest.mark.e2e
def test_a_taken_proxy_port_fails_the_job_naming_it(tmp_path, no_leaks, vllm_standin):
    base = free_port_base(12)
    hf = write_hostfile(tmp_path, "127.0.0.1 role=prefill\n127.0.0.2 role=decode\n")
    with port_taken(base + 10):
        done = run_launcher("run", "-H", hf, "--port-base", str(base), "--proxy-port", str(base + 10), "--",
                            vllm_standin, "serve", "m", "--port", str(base + 8), timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert failed_line(done.stderr).startswith(f"the P/D proxy cannot listen on 127.0.0.1:{base + 10}: Address already in use")


@pytest.mark.e2e
def test_run_check_refuses_prefill_and_decode_engines_whose_compatibility_hashes_differ(tmp_path, no_leaks, vllm_standin):
    base = free_port_base(12)
    hf = write_hostfile(tmp_path, "127.0.0.1 role=prefill\n127.0.0.2 role=decode env:STANDIN_COMPAT_HASH=another-model\n")
    done = run_launcher("run", "-H", hf, "--check", "--wire", "v2", "--port-base", str(base), "--proxy-port", str(base + 10),
                        "--", vllm_standin, "serve", "m", "--port", str(base + 8), timeout=60)  # fmt: skip
    assert done.returncode == 5, done.stderr  # before the proxy serves a request that NIXL would fail
    assert failed_line(done.stderr).startswith(
        f"compatibility hash mismatch: rank 0 on 127.0.0.1 (port {base}) reports standin…, "
        f"rank 1 on 127.0.0.2 (port {base}) reports another-mode…"
    )
    assert "P/D proxy on" not in done.stderr


def test_over_ssh_decoders_take_turns_and_pull_from_the_prefill_host(hosts, tmp_path, vllm_standin):
    proxy = free_port_base(2)
    hf = write_hostfile(tmp_path, "h1\nh2\nh3\n")
    run = RunningLauncher(["-H", hf, *hosts.ssh_args(), "--prefill", "h1", "--decode", "h[2-3]", "--proxy-port", str(proxy),
                           "--", vllm_standin, "serve", "m", "--port", "8100"])  # fmt: skip
    try:
        run.ready_rows(3)
        assert wait_for(lambda: any("P/D proxy on http://" in line for line in run.stderr), 10), run.stderr[-5:]
        pulled = [json.loads(post(proxy, "/v1/completions", {"prompt": "x", "max_tokens": 2})[2]) for _ in range(4)]
        assert {p["pulled_from"] for p in pulled} == {f"{NET}.11:5600"}
        assert sorted(p["served_by"] for p in pulled) == [f"{NET}.12"] * 2 + [f"{NET}.13"] * 2  # round-robin
        routes = f"prefill on {NET}.11:8100, decode on {NET}.12:8100, {NET}.13:8100"
        assert any(f"P/D proxy on http://127.0.0.1:{proxy}: {routes}" in line for line in run.stderr), run.stderr[-5:]
    finally:
        run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 130
