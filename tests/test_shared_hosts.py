"""Two jobs on one cluster: a port the second needs and the first holds is named with the first job, before harm."""

import re
import signal
import sys

import pytest

from conftest import RunningLauncher, failed_line, run_launcher, write_hostfile

pytestmark = pytest.mark.e2e

# A DP front end, as far as ports go: it listens on {rpc_port}, says so, and serves.
HOLD_RPC_PORT = "import socket,time; s=socket.socket(); s.bind(('', {rpc_port})); s.listen(); print('holding', flush=True); time.sleep(60)"


def job_id_of(run: RunningLauncher, rank: int) -> str:
    """The job id, from the built-in core's line 'engine core <job>-dp<rank> listening on ...'."""
    for line in run.stdout:
        m = re.search(rf"engine core ([0-9a-f]+)-dp{rank} listening", line)
        if m:
            return m.group(1)
    raise AssertionError(run.stdout)


def test_a_second_job_on_the_first_jobs_ports_names_that_job(tmp_path, no_leaks, port_base):
    hf = write_hostfile(tmp_path, "localhost slots=2")
    first = RunningLauncher(["-H", hf, "--port-base", str(port_base)])
    (_, _, _, _, pid), _ = first.ready_rows(2)
    second = run_launcher("check", "-H", hf, "--port-base", str(port_base), timeout=60)
    assert second.returncode == 3, second.stderr
    assert re.search(
        rf"side-channel port {port_base} is already in use at 127\.0\.0\.1:{port_base} on host \S+, held by launcher job "
        rf"{job_id_of(first, 0)} \(rank 0, pid {pid}\); stop it or move this job's ports with --port-base",
        failed_line(second.stderr),
    ), second.stderr
    first.proc.send_signal(signal.SIGINT)
    assert first.finish() == 130  # the first job was not disturbed


def test_a_second_dp_front_end_on_one_host_is_refused_before_any_rank_starts(tmp_path, no_leaks, port_base):
    one = write_hostfile(tmp_path, "localhost slots=1")
    first = RunningLauncher(
        [
            "-H",
            one,
            "--port-base",
            str(port_base),
            "--rpc-port",
            str(port_base + 50),
            "--ready-log",
            "holding",
            "--",
            sys.executable,
            "-c",
            HOLD_RPC_PORT,
        ]
    )
    first.ready_rows(1)
    marker = tmp_path / "ran"
    second = run_launcher(
        "run", "-H", one, "--port-base", str(port_base + 10), "--rpc-port", str(port_base + 50), "--to-completion",
        "--", "sh", "-c", f": {{rpc_port}}; touch {marker}",
    )  # fmt: skip
    assert second.returncode == 4, second.stderr
    line = failed_line(second.stderr)
    assert re.match(
        rf"rank 0 on localhost cannot become ready: the data-parallel RPC port {port_base + 50} \(\{{rpc_port\}}\) on localhost is held "
        rf"by launcher job [0-9a-f]{{16}} \(rank 0, pid \d+\); two jobs whose DP front ends share a host need different RPC ports: "
        rf"give this one --rpc-port \d+$",
        line,
    ), line
    assert not marker.exists()
    first.proc.send_signal(signal.SIGINT)
    assert first.finish() == 130


def test_over_ssh_the_holder_on_the_remote_host_is_named(hosts, tmp_path):
    hf = write_hostfile(tmp_path, "h2 slots=2")
    first = RunningLauncher(["-H", hf, *hosts.ssh_args()])
    (_, _, _, _, pid), _ = first.ready_rows(2)
    second = run_launcher("check", "-H", write_hostfile(tmp_path, "h1\nh2\n"), *hosts.ssh_args(), timeout=60)
    assert second.returncode == 3, second.stderr
    # h2's rank 1 of the second job wants 5601, which the first job's rank 1 holds.
    assert f"held by launcher job {job_id_of(first, 1)} (rank 1, pid " in failed_line(second.stderr), second.stderr
    first.proc.send_signal(signal.SIGINT)
    assert first.finish() == 130
