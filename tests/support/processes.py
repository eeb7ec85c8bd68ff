"""This test run's processes: its own TMPDIR marks them, and the leak checks find them by it.

Imported first by conftest: creating the run's directory and exporting it as
TMPDIR is what marks every process the run starts.
"""

import contextlib
import os
import tempfile
import time

import psutil

from support.netns import PREFIX

# This run's own TMPDIR marks its processes: every process it starts inherits it (the local transport passes
# it on as a login variable, a rank gets its agent's), so a process that escaped and lost its parent is still
# known to be this run's, and another run on the machine (LAUNCHER_NETNS_PREFIX) is never mistaken for a leak.
RUN_TMPDIR = tempfile.mkdtemp(prefix=f"launcher-tests-{PREFIX}-")
os.environ["TMPDIR"] = RUN_TMPDIR
tempfile.tempdir = None


def launcher_processes():
    """This run's agents, engine cores, stand-in vLLMs and routers still alive on this machine (any namespace)."""
    ours = this_run()
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(
            name in cmd
            for name in ("launcher.agent", "launcher.engine_core", "launcher.bootstrap", "standin_vllm.py", "vllm-router", "vllm::router")
        ) and ours(p):
            found.append(p)
    return found


def this_run():
    """Whether a process was started by this test run: in one of its namespace hosts, its descendant, or
    carrying its TMPDIR. The namespaces and descendants are read once, for a scan of every process."""
    try:
        names = [n for n in os.listdir("/run/netns") if n.startswith(f"{PREFIX}-h")]
    except OSError:
        names = []
    hosts = set()
    for name in names:
        with contextlib.suppress(OSError):
            hosts.add(f"net:[{os.stat(f'/run/netns/{name}').st_ino}]")
    here = os.readlink("/proc/self/ns/net")
    descendants = {c.pid for c in psutil.Process().children(recursive=True)}

    def ours(p) -> bool:
        try:
            netns = os.readlink(f"/proc/{p.pid}/ns/net")
            if netns != here:
                return netns in hosts
            return p.pid in descendants or p.environ().get("TMPDIR") == RUN_TMPDIR
        except (OSError, psutil.Error):
            return False

    return ours


def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def _alive(p) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def dead(pid: int) -> bool:
    """Gone, or a zombie waiting for a parent that is not ours to wait for."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
