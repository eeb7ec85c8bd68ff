"""`check --transfer`: built-in cores as real NIXL agents moving and verifying bytes (UCX over TCP).

On loopback and on the SSH namespace cluster; NIXL is the CPU install
(scripts/setup-test-host.sh: numpy, then nixl-cu12 and nixl with --no-deps).
"""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, _require, failed_line, launch_hosts, run_launcher, write_hostfile
from launcher.check import CheckOptions
from launcher.plan import LaunchOptions
from support.netns import NET, NET2

pytestmark = pytest.mark.e2e

MiB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def nixl():
    _require("NIXL", [name for name in ("nixl", "numpy") if importlib.util.find_spec(name) is None])


def transfer_matrix(stdout: str) -> str:
    return stdout.split("NIXL READ bandwidth", 1)[1]


def test_loopback_every_rank_reads_every_peer_and_the_heatmap_is_written(tmp_path, no_leaks, port_base):
    plot = tmp_path / "transfer.png"
    done = run_launcher(
        "check", "-H", write_hostfile(tmp_path, "localhost slots=3"), "--port-base", str(port_base),
        "--transfer", "--transfer-bytes", "256K", "--plot", str(plot),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    matrix = transfer_matrix(done.stdout)
    assert "(256 KiB per read, every byte verified; row: reader rank, column: read from)" in matrix
    # Every off-diagonal cell is a bandwidth; a rank does not read itself.
    for rank in range(3):
        row = re.search(rf"^localhost r{rank}\s+(.*)$", matrix, re.M).group(1).split()
        assert row[rank] == "·" and all(float(c) > 0 for i, c in enumerate(row) if i != rank), row
    assert "all 6 transfers ok" in matrix
    assert re.search(r"^UCX used: .*tcp/lo \(6 reads\)$", matrix, re.M), matrix  # the network path, not shared memory
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"heatmap written to {plot}" in done.stderr


def test_hosts_on_two_networks_move_bytes_over_the_interface_each_rank_chose(hosts):
    # h1 has eth0 and eth1; ifname=eth0 picks the network its peers share, and UCX must follow it.
    result = launch_hosts("h1 slots=2 ifname=eth0\nh2\nh3\n", hosts, LaunchOptions(transfer_bytes=MiB), check=CheckOptions(timeout=5))
    assert result.ok, result.failure
    assert result.check.ok and result.transfer.ok
    assert len(result.transfer.results) == 4 * 3  # every ordered pair of distinct ranks
    for r in result.transfer.results.values():
        assert r.ok and r.mbps > 0 and r.latency_ms > 0
        assert r.used.endswith("tcp/eth0"), r.used  # h1's eth1 never carries it
    assert {r.address for r in result.ranks if r.host == "h1"} == {f"{NET}.11"}


def test_ucx_on_an_interface_the_peers_cannot_reach_is_red_with_the_reason(hosts, tmp_path):
    # The side channel binds eth0 (every handshake passes) but UCX is told to use h1's eth1, which
    # h2 and h3 have no route to: the failure the handshake cannot see.
    hf = write_hostfile(tmp_path, "h1 ifname=eth0 env:UCX_NET_DEVICES=eth1\nh2\nh3\n")
    done = run_launcher("check", "-H", hf, *hosts.ssh_args(), "--transfer", "--handshake-timeout", "3", timeout=120)
    assert done.returncode == 5, done.stderr
    assert "all 9 handshakes ok" in done.stdout
    matrix = transfer_matrix(done.stdout)
    failed = failed_line(done.stderr)
    assert re.match(r"\d+ of 6 pairs failed the NIXL transfer check; first: r\d \(h\d\) -> r\d \(h\d\): ", failed), failed
    # Every pair with h1 in it is red; h2 and h3 still reach each other.
    assert re.search(r"^h2 r1\s+FAIL\s+·\s+[\d.]+$", matrix, re.M), matrix
    assert re.search(r"^h3 r2\s+FAIL\s+[\d.]+\s+·$", matrix, re.M), matrix
    # The reason is UCX's own: the address it could not reach, and the setting to look at.
    reason = rf"cannot add the peer.s NIXL agent .*: UCX: .*no route to {re.escape(NET2)}\.11:\d+; UCX_NET_DEVICES \(here eth0\)"
    assert re.search(rf"r1 \(h2\) -> r0 \(h1\): {reason}", matrix), matrix


def test_without_nixl_the_transfer_check_fails_at_once_saying_how_to_install_it(tmp_path, no_leaks, port_base):
    # An interpreter where 'import nixl' fails as on a host without it.
    shadow = tmp_path / "no-nixl" / "nixl"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'nixl'\")\n")
    hf = write_hostfile(tmp_path, f"localhost slots=2 env:PYTHONPATH={shadow.parent}")
    done = run_launcher("check", "-H", hf, "--port-base", str(port_base), "--transfer", timeout=60)
    assert done.returncode == 69, done.stderr  # the rank's own code (EX_UNAVAILABLE): never one of the launcher's
    failed = failed_line(done.stderr)
    assert re.match(r"rank \d on localhost exited with code 69: NIXL is not installed here", failed), failed
    assert "pip install --no-deps nixl-cu12==1.5.1 nixl==1.5.1" in failed


@pytest.mark.parametrize(
    "args, message",
    [
        (["check", "--transfer", "--", "sleep", "9"], "--transfer moves bytes between built-in engine cores, not a command's"),
        (["run", "--transfer"], "run --transfer needs --check or --preflight"),
        (["check", "--transfer-bytes", "2G"], "2G must be 1 byte to 1 GiB"),
        (["check", "--plot", "/nonexistent/dir/m.png"], "--plot /nonexistent/dir/m.png: cannot write in /nonexistent/dir"),
    ],
)
def test_transfer_and_plot_misuse_is_refused_before_anything_starts(tmp_path, args, message, no_leaks):
    done = run_launcher(*args[:1], "-H", write_hostfile(tmp_path, "localhost"), *args[1:], timeout=20)
    assert done.returncode == 2 and message in done.stderr.splitlines()[0], done.stderr


def test_a_preflight_moves_bytes_before_the_command_starts(tmp_path, no_leaks, port_base):
    marker = tmp_path / "ran"
    done = run_launcher(
        "run", "-H", write_hostfile(tmp_path, "localhost slots=2"), "--port-base", str(port_base),
        "--preflight", "--transfer", "--transfer-bytes", "64K", "--to-completion",
        "--", sys.executable, "-c", f"open('{marker}-{{rank}}', 'w')",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "all 2 transfers ok" in transfer_matrix(done.stdout)
    assert done.stderr.index("preflight passed") < done.stderr.index("ranks done 1/2")  # bytes moved first
    assert sorted(p.name for p in tmp_path.glob("ran-*")) == ["ran-0", "ran-1"]


def test_a_hostile_peers_metadata_is_a_failed_pair_never_a_crash():
    """What a peer advertises (agent blob, buffer address and length) reaches NIXL: fuzzed with two agents in a
    process of its own (NIXL 1.5.1 crashes at exit when two connected agents share a process, so not pytest's)."""
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "support", "transfer_fuzz.py")],
        capture_output=True, text=True, errors="replace", timeout=300, env={**os.environ, "PYTHONPATH": REPO},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["examples"] >= 150 and report["failed_pairs"] > 0 and report["reasons_without_text"] == 0, report


def test_ucxs_log_lives_in_a_private_directory_and_is_read_without_following_links(tmp_path):
    """A predictable /tmp name let another user plant a symlink that UCX, writing its log, followed."""
    from launcher.transfer import UcxLog

    env: dict[str, str] = {}
    logs = [UcxLog.for_this_process(env), UcxLog.for_this_process({})]
    private = os.path.dirname(env["UCX_LOG_FILE"])
    assert env["UCX_LOG_FILE"] == logs[0].path and logs[0].path != logs[1].path  # a fresh directory each time
    info = os.stat(private)
    assert (info.st_mode & 0o777, info.st_uid) == (0o700, os.getuid())
    target = tmp_path / "precious"
    target.write_text("| remote memory read by x\n")
    os.symlink(target, logs[0].path)  # planted anyway: it is never read through
    logs[0].update()
    assert logs[0].used == "UCX (its log did not say which lane)"
    for log in logs:
        log.remove()
    assert not os.path.exists(private) and target.read_text() == "| remote memory read by x\n"
    mine = UcxLog.for_this_process({"UCX_LOG_FILE": str(tmp_path / "ucx.%p.log")})  # the user's own log: kept
    assert mine.path == str(tmp_path / f"ucx.{os.getpid()}.log")
    mine.remove()


def test_a_peer_blob_that_crashes_nixl_fails_its_pair_and_the_next_blob_gets_a_fresh_vetter():
    """UCX crashed on about 1 in 50 fuzzed blobs (a cut worker address), killing the rank that loaded it.
    A rank loads a peer's metadata only after a vetter process loaded it; the vetter's crash is the
    pair's failure. Here the crash is a real SIGSEGV delivered while the vetter loads."""
    from launcher.transfer import MetadataVetter

    vetter = MetadataVetter({**os.environ, "PYTHONPATH": REPO})
    try:
        assert vetter.vet(b"not nixl metadata", timeout=60) is None  # NIXL refuses it cleanly: safe for the rank to try
        first = vetter._proc
        first.send_signal(signal.SIGSTOP)  # mid-load from here on
        verdict = []
        asked = threading.Thread(target=lambda: verdict.append(vetter.vet(b"nixlSerDes|Agent...", timeout=60)))
        asked.start()
        time.sleep(0.5)
        first.send_signal(signal.SIGSEGV)
        first.send_signal(signal.SIGCONT)
        asked.join(60)
        assert verdict == ["loading it crashed a NIXL agent (SIGSEGV): the peer's metadata is malformed"]
        assert vetter.vet(b"not nixl metadata either", timeout=60) is None and vetter._proc.pid != first.pid
    finally:
        vetter.close()


def test_gpu_memory_is_chosen_only_where_a_cuda_device_and_a_library_are_and_otherwise_named():
    from launcher.transfer import NixlMissing, choose_memory, cuda_library, staged

    assert choose_memory("host", {}) == ("host", "--transfer-memory host")
    assert choose_memory("auto", {"CUDA_VISIBLE_DEVICES": ""})[0] == "host"
    library, why = cuda_library()
    if library is None:  # this machine: no CUDA; auto falls back, gpu says what to install
        assert choose_memory("auto", {}) == ("host", f"auto: {why}")
        with pytest.raises(
            NixlMissing, match=r"^--transfer-memory gpu needs a CUDA device and torch or cupy .* or use --transfer-memory host$"
        ):
            choose_memory("gpu", {})
    # What UCX logged for a read of GPU memory: GPU to GPU, or through host memory.
    assert not staged("zero-copy cuda_ipc/cuda")
    assert staged("software emulation tcp/lo") and staged("copy-in tcp/eth0, cuda_copy/cuda")
    assert not staged("zero-copy rc_mlx5/mlx5_0:1")
