"""run --router: vllm-project's vllm-router (or any router command) fronts a P/D job, as a part of it."""

import contextlib
import json
import os
import re
import shlex
import signal
import sys
import urllib.request

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import RunningLauncher, failed_line, free_port_base, launcher_processes, run_launcher, wait_for, write_hostfile
from launcher.vllm import router
from support.real_vllm import ROUTER_BIN

WITH_ROUTER = {"PATH": f"{ROUTER_BIN}:{os.environ['PATH']}"}


def test_vllm_router_gets_its_own_pd_flags_and_a_command_its_placeholders():
    prefill, decode = ["http://10.0.0.1:8100", "http://10.0.0.2:8100"], ["http://10.0.0.3:8100"]
    assert router.router_argv(router.parse("vllm-router"), prefill, decode, "127.0.0.1", 9000) == [
        "vllm-router", "--vllm-pd-disaggregation",
        "--prefill", "http://10.0.0.1:8100", "--prefill", "http://10.0.0.2:8100", "--decode", "http://10.0.0.3:8100",
        "--host", "127.0.0.1", "--port", "9000",
    ]  # fmt: skip
    metrics = router.router_argv(router.parse("vllm-router"), prefill, decode, "127.0.0.1", 9000, metrics_port=9001)
    assert metrics[-4:] == ["--prometheus-host", "127.0.0.1", "--prometheus-port", "9001"]  # never its default, one per machine
    mine = router.parse("my-router --listen {address}:{port} --prefill {prefill_urls} --decode-list={decode_urls}")
    assert router.router_argv(mine, prefill, decode, "0.0.0.0", 9000) == [
        "my-router", "--listen", "0.0.0.0:9000", "--prefill", *prefill, "--decode-list=http://10.0.0.3:8100",
    ]  # fmt: skip
    each = router.parse("r --prefill {prefill_url} --decode={decode_url} --port {port}")
    assert router.router_argv(each, prefill, decode, "127.0.0.1", 1) == [
        "r", "--prefill", prefill[0], "--prefill", prefill[1], "--decode=http://10.0.0.3:8100", "--port", "1",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "--router is empty"),
        ("'vllm-router", "--router is not one shell-quoted command"),
        ("r --p {prefil_urls} --d {decode_urls}", "--router: {prefil_urls} in '{prefil_urls}' is no placeholder"),
        ("r --p {prefill_urls}", "--router r ...: the command never names {decode_url} or {decode_urls}"),
        ("r --p {prefill_url}{port} --d {decode_url}", "--router: {prefill_url} repeats its word once per URL"),
    ],
)
def test_a_router_that_could_not_route_is_refused_with_the_word_at_fault(text, message):
    with pytest.raises(router.RouterError) as info:
        router.parse(text)
    assert str(info.value).startswith(message)


@given(text=st.text(max_size=60), urls=st.lists(st.text(alphabet="abc:/0123456789", min_size=1, max_size=12), max_size=3))
def test_any_router_text_is_refused_in_one_line_or_gives_an_argv_without_placeholders(text, urls):
    try:
        template = router.parse(text)
    except router.RouterError as exc:
        assert "\n" not in str(exc) or "\n" in text
        return
    argv = router.router_argv(template, urls, urls, "127.0.0.1", 1)
    produced = "".join(argv).replace("".join(urls), "")
    placeholders = {"{" + name + "}" for name in router.PLACEHOLDERS}
    assert not any(p in w for p in placeholders for w in argv if w not in urls), produced


def pd_args(tmp_path, proxy, api, vllm_standin, router_text, *more):
    hf = write_hostfile(tmp_path, "127.0.0.1 role=prefill\n127.0.0.2 role=decode\n")
    return ["-H", hf, "--port-base", str(proxy - 12), "--proxy-port", str(proxy), "--router", router_text, *more,
            "--", vllm_standin, "serve", "m", "--port", str(api)]  # fmt: skip


def post(port):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(
        "POST", "/v1/completions", json.dumps({"model": "m", "prompt": "hi", "max_tokens": 3}), {"Content-Type": "application/json"}
    )
    reply = conn.getresponse()
    return reply.status, json.loads(reply.read())


@pytest.mark.e2e
def test_vllm_router_fronts_the_job_and_its_death_ends_the_job_with_its_code(tmp_path, no_leaks, vllm_standin):
    base = free_port_base(16)
    proxy, api = base + 12, base + 14
    run = RunningLauncher(pd_args(tmp_path, proxy, api, vllm_standin, "vllm-router", "--metrics-port", str(base + 15)), env=WITH_ROUTER)
    try:
        line = wait_for(lambda: next((x for x in run.stderr if "router vllm-router on http://" in x), None), 60)
        assert line, run.stderr[-8:]
        assert f"prefill on 127.0.0.1:{api}, decode on 127.0.0.2:{api}" in line
        status, answer = post(proxy)
        assert status == 200 and answer["pulled_from"] == f"127.0.0.1:{base}" and answer["served_by"] == "127.0.0.2", answer
        with urllib.request.urlopen(f"http://127.0.0.1:{base + 15}/targets", timeout=10) as reply:
            (router_target,) = [t for t in json.load(reply) if t["labels"].get("role") == "router"]
        with urllib.request.urlopen(f"http://{router_target['targets'][0]}/metrics", timeout=10) as reply:
            assert b"vllm_router_pd_prefill_requests_total" in reply.read()  # Prometheus finds the router's own series
        pid = int(re.search(r"\(pid (\d+)\)", line).group(1))
        os.kill(pid, signal.SIGKILL)
        assert run.finish() == 137  # its code, as a rank's: killed by signal 9
        assert failed_line("\n".join(run.stderr)).startswith("the router (vllm-router) was killed by signal 9")
    finally:
        if run.proc.poll() is None:
            run.proc.kill()


def standin_engines():
    """The pids of this test run's stand-in vLLM engines."""
    found = set()
    for p in launcher_processes():
        with contextlib.suppress(psutil.Error):
            if "standin_vllm.py" in " ".join(p.cmdline()):
                found.add(p.pid)
    return found


@pytest.mark.e2e
@pytest.mark.parametrize("head_ends_by", ["SIGINT", "SIGKILL"])
def test_with_restart_a_killed_router_comes_back_alone_and_serves_again(tmp_path, no_leaks, vllm_standin, head_ends_by):
    """--restart on-failure: the router is stateless, so it restarts on its own (after its backoff); the instances'
    engines, which take minutes to start in earnest, keep running. The new router is stopped with the job, and
    dies with a SIGKILLed head as the first did (the head's main thread spawned it: PR_SET_PDEATHSIG)."""
    base = free_port_base(16)
    proxy, api = base + 12, base + 14
    more = ("--restart", "on-failure", "--restart-backoff", "0.2,1", "--metrics-port", str(base + 15), "--log-dir", str(tmp_path / "logs"))
    run = RunningLauncher(pd_args(tmp_path, proxy, api, vllm_standin, "vllm-router", *more), env=WITH_ROUTER)
    try:
        routers = lambda: [int(p) for x in run.stderr for p in re.findall(r"router vllm-router on http://\S+ \(pid (\d+)\)", x)]
        assert wait_for(lambda: len(routers()) == 1, 60), run.stderr[-8:]
        assert post(proxy)[0] == 200
        engines = standin_engines()
        assert len(engines) == 2, engines
        os.kill(routers()[0], signal.SIGKILL)
        assert wait_for(lambda: len(routers()) == 2, 60), run.stderr[-8:]
        assert run.proc.poll() is None and routers()[1] != routers()[0]
        said = "\n".join(run.stderr)
        assert re.search(r"restarting the router in [0-9.]+s \(restart 1\): the router \(vllm-router\) was killed by signal 9", said)
        assert wait_for(lambda: any("the router is ready again after restart 1" in x for x in run.stderr), 10), said
        assert post(proxy)[0] == 200  # the new router serves the same instances
        assert standin_engines() == engines  # untouched
        with urllib.request.urlopen(f"http://127.0.0.1:{base + 15}/health", timeout=10) as reply:
            assert reply.status == 200
        log = tmp_path / "logs" / "router.log"
        assert wait_for(lambda: log.read_text().count("Router ready") == 2, 10), log.read_text()[-500:]  # both lives, one log
    finally:
        run.proc.send_signal(getattr(signal, head_ends_by))
    assert run.finish() == {"SIGINT": 130, "SIGKILL": -9}[head_ends_by], run.stderr[-8:]
    second = routers()[1]
    assert wait_for(lambda: not psutil.pid_exists(second) or psutil.Process(second).status() == psutil.STATUS_ZOMBIE, 10)


@pytest.mark.e2e
def test_a_restarted_router_that_never_serves_is_a_failed_restart_and_max_restarts_ends_the_job(tmp_path, no_leaks, vllm_standin):
    base = free_port_base(16)
    proxy, api = base + 12, base + 14
    once = tmp_path / "served-once"  # its first life serves; the next one never listens
    script = f"[ -e {once} ] && exec sleep 300; touch {once}; exec {sys.executable} -m http.server --bind 127.0.0.1 {proxy}"
    mine = f"sh -c {shlex.quote(script)} {{prefill_urls}} {{decode_urls}}"
    more = ("--restart", "on-failure", "--restart-backoff", "0.2,1", "--max-restarts", "1", "--ready-timeout", "5")
    run = RunningLauncher(pd_args(tmp_path, proxy, api, vllm_standin, mine, *more))
    try:
        line = wait_for(lambda: next((x for x in run.stderr if "router sh on http://" in x), None), 60)
        assert line, run.stderr[-8:]
        os.kill(int(re.search(r"\(pid (\d+)\)", line).group(1)), signal.SIGKILL)
        assert run.finish(timeout=60) == 4, run.stderr[-8:]  # not ready in time, as a rank's restart that never listens
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    assert failed_line("\n".join(run.stderr)) == (
        "gave up restarting the router after 1 restarts in 1h (--max-restarts); "
        f"last: the router (sh) did not listen on 127.0.0.1:{proxy} within 5s (--ready-timeout)"
    )
    assert any("starting the router again (restart 1)" in x for x in run.stderr)


@pytest.mark.e2e
def test_a_router_command_of_ones_own_gets_the_urls_and_dies_with_a_killed_head(tmp_path, no_leaks, vllm_standin):
    base = free_port_base(16)
    proxy, api = base + 12, base + 14
    mine = "vllm-router --vllm-pd-disaggregation --prefill {prefill_url} --decode {decode_url} --host {address} --port {port}"
    mine += f" --prometheus-port {base + 13} --policy round_robin"  # its default port is one per machine
    args = pd_args(tmp_path, proxy, api, vllm_standin, mine, "--log-dir", str(tmp_path / "logs"))
    run = RunningLauncher(args, env=WITH_ROUTER)
    line = wait_for(lambda: next((x for x in run.stderr if "router vllm-router on http://" in x), None), 60)
    assert line, run.stderr[-8:]
    assert post(proxy)[0] == 200
    router_pid = int(re.search(r"\(pid (\d+)\)", line).group(1))
    started = next(x for x in run.stderr if "starting the router: " in x)
    assert started.endswith(
        f"--decode http://127.0.0.2:{api} --host 127.0.0.1 --port {proxy} --prometheus-port {base + 13} --policy round_robin"
    )
    run.proc.kill()  # SIGKILL: no teardown of the head's; the router follows by PR_SET_PDEATHSIG, the ranks by their agents
    run.finish()
    assert wait_for(lambda: not psutil.pid_exists(router_pid) or psutil.Process(router_pid).status() == psutil.STATUS_ZOMBIE, 10)
    assert "Router ready" in (tmp_path / "logs" / "router.log").read_text()


@pytest.mark.e2e
def test_a_router_missing_or_failing_is_a_clear_error(tmp_path, no_leaks, vllm_standin):
    base = free_port_base(16)
    proxy, api = base + 12, base + 14
    missing = run_launcher("run", *pd_args(tmp_path, proxy, api, vllm_standin, "vllm-router"), env={"PATH": "/usr/bin:/bin"})
    assert missing.returncode == 2 and missing.stderr.startswith(
        "launcher: error: --router: vllm-router is not an executable on this machine's PATH; pip install vllm-router"
    ), missing.stderr
    failing = run_launcher(
        "run", *pd_args(tmp_path, proxy, api, vllm_standin, "sh -c 'echo no route; exit 3' {prefill_urls} {decode_urls}")
    )
    assert failing.returncode == 3, failing.stderr
    assert failed_line(failing.stderr) == "the router (sh) exited with code 3; last output: no route"
    silent = run_launcher(
        "run", *pd_args(tmp_path, proxy, api, vllm_standin, "sh -c 'exec sleep 300' {prefill_urls} {decode_urls}", "--ready-timeout", "3")
    )
    assert silent.returncode == 4, silent.stderr  # not ready in time, as a rank that never listens
    assert failed_line(silent.stderr) == f"the router (sh) did not listen on 127.0.0.1:{proxy} within 3s (--ready-timeout)"
    no_pd = run_launcher("run", "-H", write_hostfile(tmp_path, "localhost\n"), "--router", "vllm-router", env=WITH_ROUTER)
    assert no_pd.returncode == 2 and "--router fronts a P/D job" in no_pd.stderr
