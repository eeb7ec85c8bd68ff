"""Restart by failure group with real processes killed by real signals: on loopback, and over SSH on namespace hosts."""

import http.client
import json
import os
import re
import signal
import subprocess
import time

import psutil
import pytest

from conftest import RunningLauncher, free_port_base, standin_reports, vllm_handshake, wait_for, write_hostfile
from support.netns import NET

pytestmark = pytest.mark.e2e


def said(run, text, timeout=60):
    """The first stderr line of ``run`` holding ``text``, waiting for it (None if the head exited first)."""
    found = wait_for(
        lambda: next((line for line in run.stderr if text in line), None) or (run.proc.poll() is not None and "exited"), timeout
    )
    assert found and found != "exited", f"never said {text!r}: {run.stderr[-8:]}"
    return found


def job_pids(job_id):
    """{rank: pid} of every rank process of the job on this machine (any namespace: one PID space)."""
    found = {}
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if env.get("LAUNCHER_JOB_ID") != job_id or "LAUNCHER_RANK" not in env or p.status() == psutil.STATUS_ZOMBIE:
                continue
            if "launcher.agent" in " ".join(psutil.Process(p.ppid()).cmdline()):  # the rank itself, not a child of it
                found[int(env["LAUNCHER_RANK"])] = p.pid
        except psutil.Error:
            continue
    return found


def job_id_of(run):
    return re.search(r"job ([0-9a-f]{16}): starting", said(run, ": starting ")).group(1)


def document(run):
    return json.loads("\n".join(run.stdout))


def test_a_killed_rank_brings_its_whole_dp_group_back_on_new_pids_and_the_same_ports(hosts, tmp_path):
    base = free_port_base(4)
    hf = write_hostfile(tmp_path, hosts.hostfile(slots=1))
    run = RunningLauncher(
        ["-H", hf, *hosts.ssh_args(), "--port-base", str(base), "--restart", "on-failure", "--restart-backoff", "0.5,1", "--json"]
    )
    said(run, "ranks ready 3/3")
    job_id = job_id_of(run)
    before = wait_for(lambda: len(job_pids(job_id)) == 3 and job_pids(job_id), 10)
    os.kill(before[1], signal.SIGKILL)
    said(run, "the job is ready again after restart 1")
    after = job_pids(job_id)
    assert sorted(after) == [0, 1, 2] and not set(after.values()) & set(before.values())  # every rank replaced, not just the dead one
    for rank, host in enumerate(hosts.hosts):
        assert vllm_handshake(host.address, base + rank).endswith(f"-dp{rank}")  # same ports, serving again
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 143
    (record,) = document(run)["restarts"]
    assert record["unit"] == "the job" and record["cause"].startswith("rank 1 on h2 was killed by signal 9; last output: ")
    assert 0.5 <= record["backoff"] <= 1.0 and record["ready_after"] > record["backoff"]


def test_killing_the_head_in_the_middle_of_a_restart_leaves_nothing_on_any_host(hosts, tmp_path):
    base = free_port_base(4)
    hf = write_hostfile(tmp_path, hosts.hostfile(slots=1))
    run = RunningLauncher(["-H", hf, *hosts.ssh_args(), "--port-base", str(base), "--restart", "on-failure", "--restart-backoff", "20,20"])
    said(run, "ranks ready 3/3")
    job_id = job_id_of(run)
    os.kill(job_pids(job_id)[2], signal.SIGKILL)
    said(run, "restarting the job in 20.0s")
    run.proc.kill()  # SIGKILL: no teardown from the head; the agents read EOF and stop their hosts
    run.finish()
    # The hosts fixture then asserts that every host holds nothing but its sshd.


def crash_loop_script(tmp_path):
    """Ready (says "up") and dies 1 s later the first time; every later start exits 4 at once."""
    script = tmp_path / "crashy.sh"
    flag = tmp_path / "started-once"
    script.write_text(
        f'#!/bin/sh\necho "start $(date +%s.%N)"\nif [ -e {flag} ]; then exit 4; fi\ntouch {flag}\necho up\nsleep 1\nexit 4\n'
    )
    script.chmod(0o755)
    return str(script)


def test_a_crash_loop_gives_up_with_the_ranks_own_code_keeping_every_attempts_log(tmp_path, no_leaks):
    hf = write_hostfile(tmp_path, "localhost\n")
    logs = tmp_path / "logs"
    args = ["-H", hf, "--port-base", str(free_port_base(2)), "--ready-log", "^up", "--log-dir", str(logs)]
    run = RunningLauncher(
        [*args, "--restart", "on-failure", "--max-restarts", "2", "--restart-backoff", "1,1.5", "--", crash_loop_script(tmp_path)]
    )
    assert run.finish(timeout=60) == 4  # the rank's own exit code
    failed = next(line for line in run.stderr if line.startswith("launcher: FAILED: "))
    assert failed.startswith(
        "launcher: FAILED: gave up restarting the job after 2 restarts in 1h (--max-restarts); last: rank 0 on localhost exited with code 4"
    )
    attempts = [logs / "rank-0.0.log", logs / "rank-0.1.log", logs / "rank-0.log"]  # the first failure is never overwritten
    starts = [float(path.read_text().split()[1]) for path in attempts]
    assert "up" in attempts[0].read_text().split()
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps[0] >= 1.0 + 1.0 and gaps[1] >= 1.0  # the first ran 1 s; each restart waited at least the minimum


def test_ctrl_c_during_a_backoff_stops_at_once(tmp_path, no_leaks):
    hf = write_hostfile(tmp_path, "localhost slots=2\n")
    args = ["-H", hf, "--port-base", str(free_port_base(2)), "--ready-log", "^up", "--restart", "on-failure", "--restart-backoff", "30,30"]
    run = RunningLauncher([*args, "--", "sh", "-c", 'echo up; if [ "$LAUNCHER_RANK" = 1 ]; then sleep 0.5; exit 1; fi; sleep 100'])
    said(run, "restarting the job in 30.0s")
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    assert run.finish(timeout=20) == 130 and time.monotonic() - t0 < 8


def post(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    return reply.status, json.loads(reply.read())


@pytest.mark.parametrize("peers", [False, True], ids=["alone", "restart-peers"])
def test_a_killed_prefill_restarts_alone_or_with_its_decoders_and_the_proxy_routes_to_it_again(tmp_path, no_leaks, vllm_standin, peers):
    base = free_port_base(12)
    api, proxy = base + 8, base + 10
    hf = write_hostfile(tmp_path, "127.0.0.1 role=prefill\n127.0.0.2 role=decode\n")
    args = ["-H", hf, "--port-base", str(base), "--proxy-port", str(proxy), "--restart", "on-failure", "--restart-backoff", "3,3"]
    run = RunningLauncher([*args, *(["--restart-peers"] if peers else []), "--", vllm_standin, "serve", "m", "--port", str(api)])
    try:
        said(run, "P/D proxy on http://")
        job_id = job_id_of(run)
        before = job_pids(job_id)
        assert post(proxy, {"model": "m", "prompt": "hi", "max_tokens": 2})[0] == 200
        os.kill(before[0], signal.SIGKILL)
        said(run, "restarting prefill instance 127.0.0.1 in 3.0s")
        status, answer = post(proxy, {"model": "m", "prompt": "hi", "max_tokens": 2})
        assert (
            status == 503
            and "127.0.0.1" in answer["error"]["message"]
            and "prefill instance 127.0.0.1 is restarting" in answer["error"]["message"]
        )
        said(run, "prefill instance 127.0.0.1 is ready again after restart 1")
        if peers:
            said(run, "decode instance 127.0.0.2 is ready again after restart 1")
        after = job_pids(job_id)
        assert after[0] != before[0]
        assert (after[1] != before[1]) is peers  # a decoder restarts only with --restart-peers, after the prefill
        status, answer = post(proxy, {"model": "m", "prompt": "hi", "max_tokens": 2})
        assert status == 200 and answer["pulled_from"] == f"127.0.0.1:{base}", answer
    finally:
        run.proc.send_signal(signal.SIGINT)
        run.finish()


def test_a_prefill_instance_over_two_hosts_balances_over_both_engines_and_restarts_as_one(hosts, tmp_path, vllm_standin):
    """--prefill h1+h2: one DP group, h2 headless; the decoder pulls from each engine's own address; a dead host
    takes the whole instance down and back, never the decoder."""
    proxy = free_port_base(2)
    hf = write_hostfile(tmp_path, "h1\nh2\nh3 slots=2\n")
    args = ["-H", hf, *hosts.ssh_args(), "--prefill", "h1+h2", "--decode", "h3", "--proxy-port", str(proxy)]
    run = RunningLauncher(
        [*args, "--restart", "on-failure", "--restart-backoff", "1,1", "--", vllm_standin, "serve", "m", "--port", "8100"]
    )
    try:
        said(run, f"P/D proxy on http://127.0.0.1:{proxy}: prefill on {NET}.11:8100, decode on {NET}.13:8100")
        seen = {host: s for (_, host), s in standin_reports(run.stdout).items()}
        h2 = seen["h2"]["argv"]
        assert "--headless" in h2 and h2[h2.index("--data-parallel-address") + 1] == f"{NET}.11"  # its instance's leader
        assert (seen["h1"]["dp_ranks"], seen["h2"]["dp_ranks"], seen["h3"]["dp_ranks"]) == ([0], [1], [0, 1])
        assert {seen[h]["lb_mode"] for h in seen} == {"internal"}
        pulled = {post(proxy, {"prompt": "x", "max_tokens": 2})[1]["pulled_from"] for _ in range(4)}
        assert pulled == {f"{NET}.11:5600", f"{NET}.12:5601"}  # each prefill engine bound its own host's address

        job_id = job_id_of(run)
        before = wait_for(lambda: len(job_pids(job_id)) == 3 and job_pids(job_id), 10)
        os.kill(before[1], signal.SIGKILL)  # h2: the headless half of the prefill instance
        said(run, "restarting prefill instance h1+h2 in ")
        said(run, "prefill instance h1+h2 is ready again after restart 1")
        after = job_pids(job_id)
        assert after[0] != before[0] and after[1] != before[1] and after[2] == before[2]  # the unit is the instance
        status, answer = post(proxy, {"prompt": "x", "max_tokens": 2})
        assert status == 200 and answer["pulled_from"] in pulled, answer
    finally:
        run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 130


def test_a_host_slow_to_become_ready_causes_no_restart_storm(tmp_path, no_leaks):
    hf = write_hostfile(tmp_path, "127.0.0.1\n127.0.0.2\n")
    slow = 'if [ "$LAUNCHER_HOST_INDEX" = 1 ]; then sleep 3; fi; echo up; sleep 100'
    args = [
        "-H",
        hf,
        "--port-base",
        str(free_port_base(2)),
        "--ready-log",
        "^up",
        "--restart",
        "on-failure",
        "--restart-backoff",
        "0.2,0.5",
    ]
    run = RunningLauncher([*args, "--ready-timeout", "20", "--json", "--", "sh", "-c", slow])
    said(run, "ranks ready 2/2")
    job_id = job_id_of(run)
    os.kill(job_pids(job_id)[0], signal.SIGKILL)
    said(run, "the job is ready again after restart 1")
    time.sleep(1)
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 143
    (record,) = document(run)["restarts"]  # one failure, one restart: the slow host's 3 s were waited for, twice
    assert record["ready_after"] >= 3.0


def test_under_slurm_a_failure_group_restarts_inside_the_allocation_and_scancel_leaves_nothing(slurm, hosts, tmp_path, vllm_standin):
    from test_e2e_slurm import Job

    restart = "--restart on-failure --restart-backoff 0.5,1"
    env = {"VLLM": vllm_standin, "MODEL": "m", "DP_LOCAL": "2", "READY_TIMEOUT": "30", "EXTRA_ARGS": restart}
    job = Job(slurm, tmp_path, "slurm_vllm_dp.sbatch", "--nodes=3", env=env)
    job.wait_for_output("processes ready 3/3")
    launcher_job = re.findall(r"job ([0-9a-f]{16}): starting", job.text())[-1]  # after the preflight's
    before = wait_for(lambda: len(job_pids(launcher_job)) == 3 and job_pids(launcher_job), 10)
    os.kill(before[2], signal.SIGKILL)  # h2's vllm serve (DP ranks 2-3)
    job.wait_for_output("the job is ready again after restart 1", timeout=60)
    after = job_pids(launcher_job)
    assert sorted(after) == [0, 2, 4] and not set(after.values()) & set(before.values())
    subprocess.run(["scancel", job.id], env={**os.environ, **slurm.env}, check=True)
    assert job.wait()["JobState"] == "CANCELLED"
    # The hosts fixture then checks every node holds nothing but its sshd and slurmd.
