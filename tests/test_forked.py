"""Ranks forked from the agent look and behave as if they had been exec'd."""

import os
import signal
import sys
import time

import psutil
import pytest

from launcher import forked

pytestmark = pytest.mark.skipif(not forked.supported(), reason="this kernel refuses PR_SET_MM_MAP")

ARGV = [sys.executable, "-m", "launcher.engine_core"]


def spawn(main, env=None, **kwargs):
    return forked.spawn(main, ARGV, {"PATH": os.environ["PATH"], "LAUNCHER_JOB_ID": "0123abcd", **(env or {})}, **kwargs)


@pytest.mark.parametrize(
    "parent, child, same",
    [
        ({"PATH": "/bin"}, {"PATH": "/usr/bin", "UCX_TLS": "tcp", "LAUNCHER_RANK": "1"}, True),
        ({"PYTHONPATH": "/a"}, {"PYTHONPATH": "/a"}, True),
        ({"PYTHONPATH": "/a"}, {"PYTHONPATH": "/b"}, False),
        ({}, {"PYTHONPATH": "/shadow"}, False),
        ({"LD_LIBRARY_PATH": "/opt/ucx/lib"}, {}, False),
        ({}, {"LD_PRELOAD": "libfoo.so"}, False),
    ],
)
def test_a_rank_whose_environment_loads_other_code_is_not_forked(parent, child, same):
    assert forked.same_code(parent, child) is same


def sleep_forever():
    print("up", flush=True)
    time.sleep(60)
    return 0


def started(child):
    assert child.stdout.readline() == b"up\n"
    return child


def test_proc_shows_the_ranks_own_command_line_and_environment():
    parent_secret = "VLLM_NIXL_SIDE_CHANNEL_HOST"
    os.environ[parent_secret] = "198.18.255.254"
    try:
        child = started(spawn(sleep_forever, {"LAUNCHER_RANK": "3", "ODD": "a=b\tc ü"}))
    finally:
        del os.environ[parent_secret]
    try:
        proc = psutil.Process(child.pid)
        assert proc.cmdline() == ARGV
        environ = proc.environ()
        assert environ["LAUNCHER_JOB_ID"] == "0123abcd" and environ["LAUNCHER_RANK"] == "3" and environ["ODD"] == "a=b\tc ü"
        assert parent_secret not in environ  # the parent's environment is not what the rank runs with
    finally:
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=5) == -signal.SIGKILL


def test_the_child_sees_its_environment_its_own_session_and_only_the_passed_descriptors():
    keep_r, keep_w = os.pipe()
    stray_r, stray_w = os.pipe()

    def report():
        fds = ",".join(str(fd) for fd in sorted(map(int, os.listdir("/proc/self/fd"))) if is_open(fd))
        print(os.environ.get("LAUNCHER_RANK"), os.getsid(0) == os.getpid(), sys.stdin.read() == "", fds)
        return 0

    child = spawn(report, {"LAUNCHER_RANK": "5"}, pass_fds=[keep_w])
    for fd in (keep_r, keep_w, stray_r, stray_w):
        os.close(fd)
    out = child.stdout.read().decode()
    assert child.wait(timeout=5) == 0
    assert out.split() == ["5", "True", "True", f"0,1,2,{keep_w}"]


def is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    "main, code, stderr",
    [
        (lambda: 3, 3, ""),
        (lambda: sys.exit("bad address"), 1, "bad address"),
        (lambda: 1 / 0, 1, "ZeroDivisionError"),
    ],
    ids=["returned", "sys.exit(message)", "uncaught"],
)
def test_exit_codes_and_errors_are_an_interpreters(main, code, stderr):
    child = spawn(main)
    err = child.stderr.read().decode()
    assert child.wait(timeout=5) == code
    assert stderr in err


def test_the_parents_signal_handlers_are_not_the_childs():
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # the agent's own stop handler
    try:
        child = started(spawn(sleep_forever))
    finally:
        signal.signal(signal.SIGTERM, previous)
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait(timeout=5) == -signal.SIGTERM  # died of it, as a fresh interpreter would


def test_poll_is_none_while_running_and_wait_times_out():
    child = spawn(sleep_forever)
    try:
        assert child.poll() is None
        with pytest.raises(Exception, match="timed out"):
            child.wait(timeout=0.1)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()


def test_a_child_with_a_stdin_pipe_reads_it_and_writes_whole_lines_of_any_size():
    def echo():
        for line in sys.stdin.buffer:
            sys.stdout.buffer.write(line * 1000)  # a megabyte: the pipe takes it in pieces, the child writes it all
        sys.stdout.flush()
        return 0

    child = spawn(echo, stdin_pipe=True)
    child.stdin.write(b"x" * 1023 + b"\n")
    child.stdin.close()
    assert child.stdout.read() == (b"x" * 1023 + b"\n") * 1000
    assert child.wait(timeout=5) == 0
