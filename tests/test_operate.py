"""A running job operated from other shells: run --detach, ps, status, logs -f, stop; a killed head; its control socket.

Each test has a state directory of its own (XDG_STATE_HOME in tmp_path), so
two runs on one machine never share a job list.
"""

import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import time

import pytest

from conftest import free_port_base, launcher_cmd, run_launcher, wait_for, write_hostfile
from launcher.head.control_socket import socket_address
from support.processes import dead

pytestmark = pytest.mark.e2e


@pytest.fixture
def state(tmp_path, monkeypatch):
    """This test's own state directory: its env for launcher commands."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return {"XDG_STATE_HOME": str(tmp_path / "state")}


def launcher(*args, env, timeout=60):
    return run_launcher(*args, env=env, timeout=timeout)


def head_pid(job_id, env):
    return json.loads(open(os.path.join(env["XDG_STATE_HOME"], "launcher", "jobs", job_id, "job.json")).read())["pid"]


def detach(state, hostfile, *extra, cluster=None):
    ssh = cluster.ssh_args() if cluster else []
    done = launcher("run", "-H", hostfile, *ssh, "--port-base", str(free_port_base(4)), "--detach", *extra, env=state)
    return done


def test_detach_returns_once_ready_and_ps_status_logs_and_stop_operate_the_job(tmp_path, state, no_leaks):
    hf = write_hostfile(tmp_path, "localhost slots=2\n")
    started = time.monotonic()
    done = detach(state, hf, "--restart", "on-failure", "--restart-backoff", "0.5,1")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert len(job_id) == 16 and f"launcher: job {job_id} ready (2 ranks on 1 hosts), detached" in done.stderr
    assert time.monotonic() - started < 20
    short = job_id[:6]  # a unique prefix is enough
    listed = launcher("ps", env=state).stdout
    assert job_id in listed and "running" in listed
    follower = subprocess.Popen(launcher_cmd("logs", short, "-f"), stdout=subprocess.PIPE, text=True, env={**os.environ, **state})
    status = json.loads(launcher("status", short, "--json", env=state).stdout)
    assert (status["schema"], status["state"], status["health"]) == ("launcher.status/1", "running", None)
    assert [r["state"] for r in status["ranks"]] == ["ready", "ready"] and status["time_to_ready"] > 0
    os.kill(status["ranks"][1]["pid"], signal.SIGKILL)
    assert wait_for(lambda: json.loads(launcher("status", short, "--json", env=state).stdout)["restarts"][0]["ready_after"], 30)
    human = launcher("status", short, env=state).stdout
    assert human.startswith(f"job {job_id}: running, up ") and "restarts 1" in human and "killed by signal 9" in human
    assert "engine core" in launcher("logs", short, "--rank", "1", env=state).stdout  # the current attempt's output
    stopped = launcher("stop", short, env=state)
    assert stopped.returncode == 0 and f"job {job_id} ended, exit 130" in stopped.stderr  # as Ctrl-C ends a foreground job
    followed, _ = follower.communicate(timeout=30)  # -f ends with the job
    assert "ranks ready 2/2" in followed and "is ready again after restart 1" in followed and "stopped by SIGINT" in followed
    assert launcher("status", short, env=state).stdout.startswith(f"job {job_id}: ended, exit 130 (stopped by SIGINT)")
    assert wait_for(lambda: dead(head_pid(job_id, state)), 10)


def test_a_detached_job_that_cannot_start_says_what_a_foreground_run_says_with_its_exit_code(tmp_path, state, no_leaks):
    hf = write_hostfile(tmp_path, "localhost\n")
    command = ["--ready-port", "1", "--", "sh", "-c", "echo broken; exit 3"]
    foreground = launcher("run", "-H", hf, *command, env=state)
    done = detach(state, hf, *command)
    first = lambda text: next(line for line in text.splitlines() if line.startswith("launcher: FAILED: "))
    assert done.returncode == foreground.returncode == 3
    assert first(done.stderr) == first(foreground.stderr) == "launcher: FAILED: rank 0 on localhost exited with code 3; last output: broken"
    assert done.stdout == "" and "the job's log: " in done.stderr


def test_a_sigkilled_detached_head_leaves_nothing_and_status_says_lost_and_when(tmp_path, state, no_leaks):
    hf = write_hostfile(tmp_path, "localhost slots=2\n")
    job_id = detach(state, hf).stdout.strip()
    pid = head_pid(job_id, state)
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: dead(pid), 10)
    said = launcher("status", job_id, env=state).stdout
    assert said.startswith(f"job {job_id}: lost: its head (pid {pid}) stopped answering at ") and "without ending the job" in said
    lost_at = json.loads(launcher("status", job_id, "--json", env=state).stdout)["lost_at"]
    assert killed_at - 5 <= lost_at <= killed_at + 1  # when the head was last alive
    # no_leaks: its agents read EOF and stopped every rank


def test_over_ssh_a_detached_job_is_operated_and_stopped_leaving_nothing(hosts, tmp_path, state):
    hf = write_hostfile(tmp_path, hosts.hostfile(slots=1))
    done = detach(state, hf, cluster=hosts)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    status = json.loads(launcher("status", job_id[:4], "--json", env=state).stdout)
    assert [(r["host"], r["state"]) for r in status["ranks"]] == [("h1", "ready"), ("h2", "ready"), ("h3", "ready")]
    assert launcher("stop", job_id[:4], env=state).returncode == 0
    assert wait_for(lambda: dead(head_pid(job_id, state)), 10)
    # hosts: every host holds nothing but its sshd


def test_the_control_socket_answers_only_its_user_and_survives_garbage(tmp_path, state, no_leaks):
    hf = write_hostfile(tmp_path, "localhost\n")
    job_id = detach(state, hf).stdout.strip()
    try:
        job_dir = os.path.join(state["XDG_STATE_HOME"], "launcher", "jobs", job_id)
        path = os.path.join(job_dir, "control.sock")
        assert stat.S_IMODE(os.stat(job_dir).st_mode) == 0o700 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
        for junk in (b"\x00\xff\xfe\n", b"[1,2]\n", b'{"op": "format-disk"}\n', b"x" * 10000, b""):
            with socket.socket(socket.AF_UNIX) as sock, socket_address(path) as address:
                sock.settimeout(10)
                sock.connect(address)
                sock.sendall(junk)
                sock.shutdown(socket.SHUT_WR)
                answer = json.loads(sock.makefile().readline())
                assert answer["ok"] is False and answer["error"]
        assert json.loads(launcher("status", job_id, "--json", env=state).stdout)["state"] == "running"  # it serves on
        # Another user, holding a descriptor of the job's directory (opened before it dropped root): the directory's
        # mode keeps it out; with the directory and the socket opened to it, SO_PEERCRED still does.
        nobody = pwd.getpwnam("nobody").pw_uid
        script = (
            "import os, socket\n"
            f"fd = os.open({job_dir!r}, os.O_PATH | os.O_DIRECTORY)\n"
            f"os.setgroups([]); os.setgid({nobody}); os.setuid({nobody})\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            "    s.connect(f'/proc/self/fd/{fd}/control.sock'); s.sendall(b'{\"op\": \"stop\"}\\n')\n"
            "    print(s.makefile().readline().strip())\n"
            "except OSError as exc:\n"
            "    print('refused', exc.errno)\n"
        )
        outsider = lambda: subprocess.run(["python3", "-c", script], capture_output=True, text=True, timeout=30)
        first = outsider()
        assert first.stdout.startswith("refused 13"), first.stderr  # EACCES
        os.chmod(job_dir, 0o711)
        os.chmod(path, 0o666)
        second = outsider()
        answer = json.loads(second.stdout)
        assert answer["ok"] is False and answer["error"].startswith(f"uid {nobody} (pid "), second.stderr
        assert json.loads(launcher("status", job_id, "--json", env=state).stdout)["state"] == "running"  # not stopped
    finally:
        assert launcher("stop", job_id, env=state).returncode == 0


def test_operating_a_job_that_is_not_there_is_a_one_line_error(tmp_path, state):
    for command in (["status", "abc"], ["logs", "abc"], ["stop", "abc"]):
        done = launcher(*command, env=state)
        assert done.returncode == 2 and done.stderr.startswith("launcher: error: no jobs in ") and "\n" == done.stderr[-1:]
    assert launcher("ps", env=state).stdout.startswith("no jobs in ")


def test_the_console_scripts_fast_path_takes_exactly_the_operate_subcommands():
    import argparse

    from launcher import entry, operate

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    operate.add_parsers(sub, argparse.ArgumentParser)
    assert set(entry.OPERATE) == set(sub.choices)
