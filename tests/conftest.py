"""Fixtures and markers; the helpers tests import live in tests/support/ and are re-exported here."""

import contextlib
import os
import shlex
import shutil
import signal
import sys

import psutil
import pytest

from support.cli import (  # noqa: F401
    ROW,
    RunningLauncher,
    failed_line,
    launch_hosts,
    launcher_cmd,
    run_json,
    run_launcher,
    table_rows,
    write_hostfile,
)
from support.ports import free_port_base, port_taken  # noqa: F401
from support.processes import RUN_TMPDIR, _alive, launcher_processes, this_run, wait_for  # noqa: F401
from support.real_vllm import VLLM_HOME, RealVllm  # noqa: F401
from support.standin import STANDIN, VLLM_DP_FLAGS, standin, standin_reports, vllm_handshake  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Started in the background of a script, a run inherits SIGINT ignored (a shell without job control does
# that), and launcher keeps an ignored SIGINT ignored, as nohup asks; the tests send SIGINT on purpose.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0:
        shutil.rmtree(RUN_TMPDIR, ignore_errors=True)
    else:
        print(f"\nthis run's files (tmp_path, logs) are kept in {RUN_TMPDIR}", file=sys.stderr)


# Markers follow the fixtures a test uses: `-m "not netns"` then never builds a cluster, whatever a module declares.
_FIXTURE_MARKERS = {
    "cluster": ("e2e", "netns"),
    "hosts": ("e2e", "netns"),
    "slurm": ("e2e", "netns"),
    "real_vllm": ("real_vllm",),
    "no_leaks": ("e2e",),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            for marker in _FIXTURE_MARKERS.get(fixture, ()):
                item.add_marker(marker)
    # GPU tests run where a GPU is; elsewhere they are deselected, not skipped (CI counts a skip as a failure).
    if not _has_gpu():
        gpu = [item for item in items if item.get_closest_marker("gpu")]
        if gpu:
            config.hook.pytest_deselected(items=gpu)
            items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def _has_gpu() -> bool:
    from launcher.gpus import nvidia_smi_devices

    return bool(nvidia_smi_devices(timeout=5.0))


@pytest.fixture
def no_leaks():
    """Fail the test if it leaves an agent or engine core behind (and sweep them)."""
    before = {p.pid for p in launcher_processes()}
    yield

    def alive():
        return [p for p in launcher_processes() if p.pid not in before and _alive(p)]

    wait_for(lambda: not alive(), timeout=3.0)
    leaked = []
    for p in alive():
        with contextlib.suppress(psutil.Error):
            leaked.append((p.pid, " ".join(p.cmdline())))  # before the kill: a zombie has no command line
            p.kill()
    assert not leaked, f"processes left behind: {leaked}"


@pytest.fixture
def port_base():
    return free_port_base()


@pytest.fixture
def vllm_standin(tmp_path):
    """A ``vllm`` executable that is the stand-in, for what launcher does only for ``vllm serve`` (--vllm-dp)."""
    path = tmp_path / "bin" / "vllm"
    path.parent.mkdir()
    path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(STANDIN)} "$@"\n')
    path.chmod(0o755)
    return str(path)


# --- the netns + sshd cluster --------------------------------------------------

from support import slurm as slurm_cluster  # noqa: E402
from support.netns import NetnsCluster, missing_tools  # noqa: E402

E2E_REQUIRED = bool(os.environ.get("CI") or os.environ.get("LAUNCHER_REQUIRE_E2E"))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """Three SSH hosts in network namespaces; h1 has a second interface (198.19.0.11)."""
    _require("netns cluster", missing_tools())
    with NetnsCluster(3, workdir=str(tmp_path_factory.mktemp("netns"))) as built:
        yield built


@pytest.fixture(scope="session")
def slurm(cluster, tmp_path_factory):
    """Real Slurm on the cluster's hosts: slurmctld on the head, a slurmd in each namespace."""
    _require("Slurm cluster", slurm_cluster.missing_tools())
    with slurm_cluster.SlurmCluster(hosts=cluster, workdir=str(tmp_path_factory.mktemp(f"{slurm_cluster.PREFIX}-slurm"))) as built:
        yield built


# --- real vLLM (scripts/setup-real-vllm.sh) -----------------------------------------


@pytest.fixture(scope="session")
def real_vllm():
    missing = [p for p in (RealVllm.python, RealVllm.vllm, os.path.join(RealVllm.model, "config.json")) if not os.path.exists(p)]
    _require("real vLLM", missing)
    return RealVllm()


def _require(what, missing):
    if missing:
        message = f"{what} unavailable: missing {', '.join(missing)}; run scripts/setup-test-host.sh"
        if E2E_REQUIRED:
            pytest.fail(message)  # in CI a missing sshd or slurmd is a failure, not a skip
        pytest.skip(message)


def _described(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline()) or f"pid {pid}"
    except psutil.Error:
        return f"pid {pid} (gone, or a zombie)"


@pytest.fixture
def hosts(cluster, no_leaks):
    """The cluster, checked after the test: every host holds nothing but its sshd."""
    yield cluster

    if wait_for(lambda: not cluster.stray_pids(), timeout=5.0):
        return
    stray = cluster.stray_pids()
    for pids in stray.values():
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    described = {h: [_described(p) for p in pids] for h, pids in stray.items()}
    pytest.fail(f"processes left on hosts: {described}")
