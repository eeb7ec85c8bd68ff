"""Two jobs on one cluster: a port the second needs and the first holds is named with the first job, before harm."""

import contextlib
import re
import signal
import sys

import pytest

from conftest import RunningLauncher, failed_line, run_launcher, write_hostfile
from launcher import exitcodes

pytestmark = pytest.mark.e2e

# A DP front end, as far as ports go: it listens on {rpc_port}, says so, and serves.
HOLD_RPC_PORT = "import socket,time; s=socket.socket(); s.bind(('', {rpc_port})); s.listen(); print('holding', flush=True); time.sleep(60)"


@contextlib.contextmanager
def first_job(args):
    """A job running in the background for the test's length; stopped by Ctrl-C, and it must stop cleanly."""
    run = RunningLauncher(args)
    try:
        yield run
    finally:
        run.proc.send_signal(signal.SIGINT)
        code = run.finish()
    assert code == 130, run.stderr[-5:]  # the first job was not disturbed by the second


def job_id_of(run: RunningLauncher, rank: int) -> str:
    """The job id, from the built-in core's line 'engine core <job>-dp<rank> listening on ...'."""
    for line in run.stdout:
        m = re.search(rf"engine core ([0-9a-f]+)-dp{rank} listening", line)
        if m:
            return m.group(1)
    raise AssertionError(run.stdout)


def test_a_second_job_on_the_first_jobs_ports_names_that_job(tmp_path, no_leaks, port_base):
    hf = write_hostfile(tmp_path, "localhost slots=2")
    with first_job(["-H", hf, "--port-base", str(port_base)]) as first:
        pids = {rank: pid for rank, *_, pid in first.ready_rows(2)}
        second = run_launcher("check", "-H", hf, "--port-base", str(port_base), timeout=60)
        assert second.returncode == exitcodes.RANK_PORT_TAKEN, second.stderr  # the rank's own: never the launcher's 3
        line = failed_line(second.stderr)
        r = int(re.match(r"rank (\d) on localhost exited with code 71: ", line).group(1))  # whichever bound first
        assert f"side-channel port {port_base + r} is already in use at 127.0.0.1:{port_base + r} on host " in line
        assert f", held by launcher job {job_id_of(first, r)} (rank {r}, pid {pids[r]}); stop it or move" in line


def test_a_second_dp_front_end_on_one_host_is_refused_before_any_rank_starts(tmp_path, no_leaks, port_base):
    one = write_hostfile(tmp_path, "localhost slots=1")
    holder = ["-H", one, "--port-base", str(port_base), "--rpc-port", str(port_base + 50), "--ready-log", "holding"]
    with first_job([*holder, "--", sys.executable, "-c", HOLD_RPC_PORT]) as first:
        first.ready_rows(1)
        marker = tmp_path / "ran"
        second = run_launcher(
            "run", "-H", one, "--port-base", str(port_base + 10), "--rpc-port", str(port_base + 50), "--to-completion",
            "--", "sh", "-c", f": {{rpc_port}}; touch {marker}",
        )  # fmt: skip
        assert second.returncode == 4, second.stderr
        line = failed_line(second.stderr)
        assert re.match(
            rf"rank 0 on localhost cannot become ready: the data-parallel RPC port {port_base + 50} \(\{{rpc_port\}}\) on localhost "
            rf"is held by launcher job [0-9a-f]{{16}} \(rank 0, pid \d+\); two jobs whose DP front ends share a host need "
            rf"different RPC ports: give this one --rpc-port \d+$",
            line,
        ), line
        assert not marker.exists()


def test_over_ssh_the_holder_on_the_remote_host_is_named(hosts, tmp_path):
    hf = write_hostfile(tmp_path, "h2 slots=2")
    with first_job(["-H", hf, *hosts.ssh_args()]) as first:
        first.ready_rows(2)
        second = run_launcher("check", "-H", write_hostfile(tmp_path, "h1\nh2\n"), *hosts.ssh_args(), timeout=60)
        assert second.returncode == exitcodes.RANK_PORT_TAKEN, second.stderr
        # h2's rank 1 of the second job wants 5601, which the first job's rank 1 holds.
        assert f"held by launcher job {job_id_of(first, 1)} (rank 1, pid " in failed_line(second.stderr), second.stderr
