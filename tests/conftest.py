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


# --- the netns + sshd cluster --------------------------------------------------

sys.path.insert(0, os.path.join(REPO, "scripts"))
from netns_cluster import NetnsCluster, missing_tools  # noqa: E402

E2E_REQUIRED = bool(os.environ.get("CI") or os.environ.get("LAUNCHER_REQUIRE_E2E"))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """Three SSH hosts in network namespaces; h1 has a second interface (198.19.0.11)."""
    missing = missing_tools()
    if missing:
        message = f"netns cluster unavailable: missing {', '.join(missing)}; run scripts/setup-test-host.sh"
        if E2E_REQUIRED:
            pytest.fail(message)  # in CI a missing sshd is a failure, not a skip
        pytest.skip(message)
    with NetnsCluster(3, workdir=str(tmp_path_factory.mktemp("netns"))) as built:
        yield built


@pytest.fixture
def hosts(cluster, no_leaks):
    """The cluster, checked after the test: every host holds nothing but its sshd."""
    yield cluster

    stray = wait_for(lambda: not cluster.stray_pids(), timeout=5.0) or cluster.stray_pids()
    if stray is True:
        return
    for pids in stray.values():
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    described = {h: [" ".join(psutil.Process(p).cmdline()) for p in pids if psutil.pid_exists(p)] for h, pids in stray.items()}
    pytest.fail(f"processes left on hosts: {described}")
