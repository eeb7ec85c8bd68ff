import os
import socket
import sys
import time

import psutil
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port_base(count: int = 8) -> int:
    """A base with ``count`` consecutive free TCP ports on loopback."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        ok = True
        for port in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range")


def launcher_processes():
    """Agents and engine cores of ours still alive on this machine (any namespace)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "launcher.agent" in cmd or "launcher.engine_core" in cmd:
            found.append(p)
    return found


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


@pytest.fixture
def no_leaks():
    """Fail the test if it leaves an agent or engine core behind (and sweep them)."""
    before = {p.pid for p in launcher_processes()}
    yield

    def alive():
        return [p for p in launcher_processes() if p.pid not in before and _alive(p)]

    wait_for(lambda: not alive(), timeout=3.0)
    leaked = alive()
    for p in leaked:
        p.kill()
    assert not leaked, f"processes left behind: {[(p.pid, ' '.join(p.cmdline())) for p in leaked]}"


@pytest.fixture
def port_base():
    return free_port_base()


def launcher_cmd(*args):
    return [sys.executable, "-m", "launcher.cli", *args]
