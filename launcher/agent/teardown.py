"""The end of a job on this host: every rank, its group and every descendant stopped; and the sweep by job id.

The agent is its ranks' child subreaper, so what detaches from a rank is
re-parented here and stopped too (DESIGN: Lifeline). ``sweep_job`` is the
head's second line of defence after it lost an agent, run by a fresh one.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil

from .. import rankenv


def terminate_tree(processes: list, grace: float, hurry: threading.Event | None = None, pause=None) -> None:
    """Stop these processes, their groups and every descendant of this process.

    SIGTERM, then SIGKILL after ``grace`` seconds, or as soon as ``hurry`` is set.
    ``pause(seconds)`` sleeps between looks (an ``ExitWatch`` ends it at an exit).
    """
    if _all_gone(processes):
        return  # the usual end of a finished job: nothing to signal, and no process table to scan (~3 ms)
    me = psutil.Process()
    hurry = hurry or threading.Event()
    pause = pause or hurry.wait
    _signal_all(processes, me, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not hurry.is_set():
        _reap_exited(processes)
        if _all_gone(processes):
            return
        pause(0.05)
    _signal_all(processes, me, signal.SIGKILL)
    for p in processes:
        p.wait()
    psutil.wait_procs(me.children(recursive=True), timeout=2.0)
    _reap_exited(processes)


def _all_gone(processes) -> bool:
    """Whether every one of ``processes`` has exited and this process has no child left, running or
    unreaped. A descendant whose parent has died is re-parented to us (the subreaper), so no child means
    no descendant: one waitid, where psutil's children(recursive=True) reads every process's stat."""
    if any(p.poll() is None for p in processes):
        return False
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return False


def _signal_all(processes, me: psutil.Process, signum: int) -> None:
    """Each rank's group, then every descendant outside those groups (one that left its group).

    Once each: a second SIGTERM can land after a rank's handler has run and
    its interpreter, shutting down, has restored the default action.
    """
    groups = set()
    for p in processes:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signum)  # the rank is its group's leader
                groups.add(p.pid)
            except ProcessLookupError:
                pass
    for child in me.children(recursive=True):
        try:
            if os.getpgid(child.pid) not in groups:
                child.send_signal(signum)
        except (psutil.Error, ProcessLookupError):
            pass


def _reap_exited(processes) -> None:
    """Collect every exited child: a rank through its Popen (which keeps its exit code), anything else
    (a descendant re-parented to us, the subreaper) directly. waitid names an exited child without
    reaping it, so this costs no scan of /proc: the agent wakes at each rank's exit, and a scan a
    wake-up was most of a teardown's CPU on a host with hundreds of processes."""
    ranks = {p.pid: p for p in processes}
    asked: set[int] = set()
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None:
            return
        if info.si_pid in ranks:
            if info.si_pid in asked or ranks[info.si_pid].poll() is None:
                return  # another thread holds its Popen, and reaps it
            asked.add(info.si_pid)
        else:
            try:
                os.waitpid(info.si_pid, os.WNOHANG)
            except ChildProcessError:
                pass


def sweep_job(job_id: str) -> list[int]:
    """SIGKILL every process of this user on this host that carries ``LAUNCHER_JOB_ID=job_id``.

    The head's second line of defence after it lost an agent (SIGKILLed, or its
    host cut off): the agent's ranks died with it (PR_SET_PDEATHSIG), but what
    they started in sessions of their own did not. They are found by the job
    id in their environment (inherited from the rank; 64 random bits), never by
    name, and only among this user's processes in this host's network namespace:
    an id is no credential, and another user's process that carries it (run as
    root, the sweep could reach it) is not this job's; a process in another
    network namespace is another host's (a container's, or a test host's).
    """
    found, me, here = [], os.getuid(), _netns(os.getpid())
    for proc in psutil.process_iter(["pid", "uids"]):
        if proc.pid == os.getpid() or proc.info["uids"] is None or proc.info["uids"].real != me or _netns(proc.pid) != here:
            continue
        try:
            if proc.environ().get(rankenv.JOB_ID_VAR) == job_id:
                proc.kill()
                found.append(proc)
        except psutil.Error:
            continue
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and not all(_dead(p) for p in found):
        time.sleep(0.02)
    return [p.pid for p in found]


def _netns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _dead(proc: psutil.Process) -> bool:
    """Gone, or a zombie: dead, waiting for its parent to reap it (which is not ours to wait for)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
