"""User commands on loopback: `launcher run -- vllm serve ...` with a stand-in vLLM."""

import os
import signal
import sys
import time

import psutil
import pytest

from conftest import (
    VLLM_DP_FLAGS,
    RunningLauncher,
    failed_line,
    port_taken,
    run_launcher,
    standin,
    standin_reports,
    vllm_handshake,
    wait_for,
    write_hostfile,
)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]

DP_ARGS = VLLM_DP_FLAGS  # with a start rank: every host but the API server's
# Every one reaches the command verbatim: no shell runs between the head and it.
AWKWARD = ["a b", "it's", '"quoted"', "$(touch {pwned})", "; exit 9", "line1\nline2", "ünïcode ✓", "*", "{{rank}}", "-x=1=2"]
LEAKED = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "198.18.255.254", "VLLM_HOST_IP": "198.18.255.254", "VLLM_DP_RANK": "5", "VLLM_DP_SIZE": "9"}


def test_per_host_vllm_dp_binds_its_own_address_and_gets_every_argument_verbatim(tmp_path, port_base):
    hf = write_hostfile(tmp_path, "localhost slots=2\n")
    pwned = tmp_path / "pwned"
    tags = [t.replace("{pwned}", str(pwned)) for t in AWKWARD]
    secret = "hf_s3cr3t-value"
    run = RunningLauncher(  # `--env NAME` takes the value from the head's env: not even the head's argv shows it
        [
            "-H",
            hf,
            "--port-base",
            str(port_base),
            "--per-host",
            "--env",
            "HF_TOKEN",
            "--env",
            "VLLM_X=a\nb=c",
            "--",
            *standin(*DP_ARGS, "--headless", *[f"--tag={t}" for t in tags]),
        ],
        env={**os.environ, **LEAKED, "HF_TOKEN": secret},
    )
    rows = run.ready_rows(1)
    assert rows == [(0, "localhost", "127.0.0.1", port_base, rows[0][4])]
    # Both DP ranks' side channels answer vLLM's v2 handshake at base + DP index.
    assert vllm_handshake("127.0.0.1", port_base + 1).endswith("_dp1")
    # The secret is in the environment, never in any process's argv.
    assert not [p.pid for p in psutil.process_iter(["cmdline"]) if secret in " ".join(p.info["cmdline"] or [])]
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 143

    assert any(line.startswith("[r0-1 localhost] standin: ") for line in run.stdout)  # the process serves DP ranks 0-1
    seen = standin_reports(run.stdout)[(0, "localhost")]
    assert seen["tags"] == [t.replace("{{rank}}", "{rank}") for t in tags] and not pwned.exists()
    assert seen["argv"][seen["argv"].index("--data-parallel-address") + 1] == "127.0.0.1"
    assert (seen["dp_size"], seen["dp_ranks"]) == (2, [0, 1])  # from the CLI flags, not the leaked VLLM_DP_*
    assert (seen["side_channel_host"], seen["vllm_host_ip"], seen["side_channel_port"]) == ("127.0.0.1", "127.0.0.1", port_base)
    assert seen["env"]["HF_TOKEN"] == secret and seen["env"]["VLLM_X"] == "a\nb=c"
    assert "VLLM_DP_RANK" not in seen["env"] and "LAUNCHER_CONTROL_FD" not in seen["launcher_vars"]


def test_a_command_that_never_becomes_ready_ends_after_the_ready_timeout(tmp_path, port_base):
    hf = write_hostfile(tmp_path, "localhost slots=2\n")
    done = run_launcher(
        "run",
        "-H",
        hf,
        "--port-base",
        str(port_base),
        "--ready-timeout",
        "2",
        "--grace",
        "1",
        "--env",
        "STANDIN_DELAY=60",
        "--",
        *standin("--headless", "--data-parallel-size", "2", "--data-parallel-start-rank", "{rank}", "--data-parallel-size-local", "1"),
    )
    assert done.returncode == 4, done.stderr
    first = failed_line(done.stderr)
    assert first.startswith("2 ranks not ready after 2s: rank 0 on localhost (started), rank 1 on localhost (started)")
    assert "its last output: standin: {" in first and first.endswith("raise --ready-timeout if they are slow")


def test_a_failing_rank_ends_the_job_with_its_own_exit_code(tmp_path, port_base):
    hf = write_hostfile(tmp_path, "localhost slots=3\n")
    logs = tmp_path / "logs"
    done = run_launcher(
        "run",
        "-H",
        hf,
        "--port-base",
        str(port_base),
        "--env",
        "STANDIN_EXIT=7",
        "--env",
        "STANDIN_EXIT_DP=1",
        "--log-dir",
        str(logs),
        "--",
        *standin(
            "--headless", "--data-parallel-size", "{world_size}", "--data-parallel-start-rank", "{rank}", "--data-parallel-size-local", "1"
        ),
    )
    assert done.returncode == 7, done.stderr
    assert failed_line(done.stderr) == "rank 1 on localhost exited with code 7; last output: standin: exiting as asked"
    summary = done.stderr.split("RANK  HOST", 1)[1]
    row = [line for line in summary.splitlines() if line.startswith("1 ")][0]
    assert row.split()[5] == "7" and row.endswith("ROOT CAUSE: standin: exiting as asked")  # its exit code and last word
    # --log-dir: each rank's output, unprefixed, in a file of its own.
    assert sorted(p.name for p in logs.iterdir()) == ["rank-0.log", "rank-1.log", "rank-2.log"]
    assert (logs / "rank-1.log").read_text().splitlines()[-1] == "standin: exiting as asked"


@pytest.mark.parametrize(
    "ready, never",
    [
        ("--ready-log=API server at", "--ready-log=no such line"),
        ("--ready-url=http://{host_ip}:{api}/health", "--ready-url=http://{host_ip}:{api}/nothing-here"),
        ("--ready-port={api}", "--ready-port={free}"),
    ],
)
def test_readiness_by_log_line_url_or_port_is_what_decides(tmp_path, port_base, ready, never):
    hf = write_hostfile(tmp_path, "localhost\n")
    ports = {"{api}": str(port_base + 5), "{free}": str(port_base + 6)}

    def rule(text):
        for k, v in ports.items():
            text = text.replace(k, v)
        return text

    command = ["--", *standin("--port", ports["{api}"])]
    run = RunningLauncher(["-H", hf, "--port-base", str(port_base), rule(ready), *command])
    assert run.ready_rows(1)[0][:3] == (0, "localhost", "127.0.0.1")
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 130
    # The same stand-in under a rule it never meets is never ready.
    stuck = run_launcher("run", "-H", hf, "--port-base", str(port_base), "--ready-timeout", "2", "--grace", "1", rule(never), *command)
    assert stuck.returncode == 4 and "1 ranks not ready after 2s: rank 0 on localhost (started)" in stuck.stderr


def test_a_missing_command_is_one_clear_error(tmp_path, port_base):
    hf = write_hostfile(tmp_path, "localhost\n")
    done = run_launcher("run", "-H", hf, "--port-base", str(port_base), "--", "no-such-vllm", "serve")
    assert done.returncode == 127, done.stderr
    assert failed_line(done.stderr).startswith("rank 0 on localhost exited with code 127: command not found on localhost: 'no-such-vllm'")
    assert "Traceback" not in done.stderr


def test_check_on_a_command_connects_only_and_a_wrong_generation_handshake_kills_vllms_listener(tmp_path, port_base):
    hf = write_hostfile(tmp_path, "localhost slots=2\n")
    cmd = standin(*DP_ARGS, "--headless")
    tcp = run_launcher("check", "-H", hf, "--port-base", str(port_base), "--per-host", "--", *cmd)
    assert tcp.returncode == 0, tcp.stderr
    assert "all 1 TCP connects ok" in tcp.stdout and "died" not in tcp.stderr
    # A v1 request has the wrong arity for this (v2) listener: vLLM's listener
    # thread dies on it, which is why TCP is the default for commands.
    v1 = run_launcher(
        "check", "-H", hf, "--port-base", str(port_base), "--per-host", "--wire", "v1", "--handshake-timeout", "1", "--", *cmd
    )
    assert v1.returncode == 5 and "listener for" in v1.stderr and "died on request" in v1.stderr


def test_preflight_finds_a_busy_port_before_the_command_starts(tmp_path, port_base):
    hf = write_hostfile(tmp_path, "localhost slots=2\n")
    with port_taken(port_base + 1):
        done = run_launcher(
            "run", "-H", hf, "--port-base", str(port_base), "--per-host", "--preflight", "--", *standin(*DP_ARGS, "--headless")
        )
    assert done.returncode != 0
    assert "preflight: built-in engine cores" in done.stderr and "standin:" not in done.stdout
    first = failed_line(done.stderr)
    assert first.startswith("rank 1 on localhost exited with code 71") and f"127.0.0.1:{port_base + 1}" in first  # EX_OSERR


def test_preflight_refuses_hosts_that_run_different_python_versions(tmp_path, port_base):
    # A host whose interpreter reports another Python version (hostfile python=).
    other = tmp_path / "python-3.9"
    other.write_text(
        "#!/bin/sh\nexec " + sys.executable + " -c \"import platform, runpy; platform.python_version = lambda: '3.9.0'; "
        "runpy.run_module('launcher.agent', run_name='__main__')\"\n"
    )
    other.chmod(0o755)
    hf = write_hostfile(tmp_path, f"localhost\n127.0.0.1 python={other}\n")
    done = run_launcher("run", "-H", hf, "--port-base", str(port_base), "--preflight", "--", *standin("--headless"))
    assert done.returncode == 5, done.stderr
    first = failed_line(done.stderr)
    assert first.startswith("hosts run different Python versions: ") and "3.9.0 on 127.0.0.1" in first
    assert first.endswith("install one version everywhere") and "standin:" not in done.stdout


def test_a_vllm_whose_side_channel_port_another_program_holds_fails_instead_of_hanging(tmp_path, port_base):
    # vLLM prints its bind error and then waits forever (shown on vLLM's code in test_real_vllm); the port
    # still accepts connections, the other program's. The agent sees who holds it and ends the job.
    hf = write_hostfile(tmp_path, "localhost slots=2\n")
    started = time.monotonic()
    with port_taken(port_base + 1):  # another instance's side channel, say
        done = run_launcher(
            "run", "-H", hf, "--port-base", str(port_base), "--per-host", "--grace", "1", "--", *standin(*DP_ARGS, "--headless")
        )
    assert time.monotonic() - started < 20
    assert done.returncode == 4, done.stderr
    first = failed_line(done.stderr)
    assert first.startswith(
        f"rank 0 on localhost cannot become ready: side-channel port {port_base + 1} at 127.0.0.1 "
        f"is held by another process (pid {os.getpid()}: "
    )
    assert first.endswith("move this job's ports with --port-base")
    assert f"zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:{port_base + 1}')" in done.stderr


def test_a_second_ctrl_c_kills_at_once_instead_of_waiting_out_the_grace(tmp_path, port_base):
    hf = write_hostfile(tmp_path, "localhost\n")
    stubborn = "trap '' TERM INT; setsid sleep 1000 & sleep 1000 & echo up; wait"
    run = RunningLauncher(["-H", hf, "--port-base", str(port_base), "--grace", "60", "--ready-log", "^up$", "--", "sh", "-c", stubborn])
    rank_pid = run.ready_rows(1)[0][4]
    family = [psutil.Process(rank_pid), *psutil.Process(rank_pid).children(recursive=True)]
    assert len(family) == 3
    run.proc.send_signal(signal.SIGINT)
    assert wait_for(lambda: any("again to kill at once" in line for line in run.stderr), 5)
    time.sleep(0.5)
    assert run.proc.poll() is None  # waiting out the 60 s grace on a rank that ignores SIGTERM
    started = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    assert run.finish(timeout=20) == 130
    assert time.monotonic() - started < 10  # not the 60 s grace
    assert any("killing every rank now (SIGKILL)" in line for line in run.stderr)
    assert wait_for(lambda: not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], 3)


def test_a_finite_command_runs_to_completion_on_every_rank(tmp_path, port_base):
    hf = write_hostfile(tmp_path, "localhost slots=3\n")
    script = 'echo "rank {rank} of {world_size} binds $VLLM_NIXL_SIDE_CHANNEL_HOST:$(({port_base} + {rank}))"'
    done = run_launcher("run", "-H", hf, "--port-base", str(port_base), "--to-completion", "--", "sh", "-c", script)
    assert done.returncode == 0, done.stderr
    assert sorted(line for line in done.stdout.splitlines() if " binds " in line) == [
        f"[r{r} localhost] rank {r} of 3 binds 127.0.0.1:{port_base + r}" for r in range(3)
    ]
    assert "ranks done 3/3" in done.stderr and "ok: 3 ranks on 1 hosts, every rank exited 0" in done.stderr


def test_a_finite_command_that_fails_on_one_rank_stops_the_rest(tmp_path, port_base):
    hf = write_hostfile(tmp_path, "localhost slots=3\n")
    started = time.monotonic()
    done = run_launcher(
        "run",
        "-H",
        hf,
        "--port-base",
        str(port_base),
        "--to-completion",
        "--grace",
        "2",
        "--",
        "sh",
        "-c",
        "if [ {rank} = 2 ]; then echo broken >&2; exit 4; fi; exec sleep 60",
    )
    assert done.returncode == 4, done.stderr
    assert failed_line(done.stderr) == "rank 2 on localhost exited with code 4; last output: broken"
    assert time.monotonic() - started < 20  # the others were stopped, not waited for
