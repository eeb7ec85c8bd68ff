"""Slurm mode on a real Slurm: slurmctld on the head, one slurmd per namespace host.

Jobs are submitted with `sbatch` exactly as a user would; the batch script
runs on node h1 (inside its namespace) and starts agents with srun.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, launcher_cmd, run_launcher, table_rows, wait_for
from support.netns import NET

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

HEAD = f"{NET}.1"
# What a user's shell may hold when it calls sbatch; Slurm exports it all (--export=ALL).
LEAKED = {
    "VLLM_NIXL_SIDE_CHANNEL_HOST": HEAD,
    "VLLM_HOST_IP": HEAD,
    "CUDA_VISIBLE_DEVICES": "0",
    "VLLM_DP_RANK": "3",
    "STANDIN_PRIVATE_NOTE": "the head's, not on the allowlist",
}
LAUNCHER = f"{sys.executable} -m launcher.cli"


class Job:
    def __init__(self, slurm, tmp_path, script, *args, env=None):
        self.slurm, self.output = slurm, tmp_path / "job.out"
        slurm.wait_idle()  # the last test's job may still be completing: start this one at once
        env = {**os.environ, **slurm.env, **LEAKED, "LAUNCHER": LAUNCHER, **(env or {})}
        done = subprocess.run(
            ["sbatch", "--parsable", f"--output={self.output}", f"--chdir={tmp_path}", *args, os.path.join(REPO, "scripts", script)],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        self.id = done.stdout.strip().split(";")[0]

    def text(self) -> str:
        return self.output.read_text() if self.output.exists() else ""

    def info(self) -> dict[str, str]:
        out = self.slurm.scontrol("show", "job", "--oneliner", self.id).stdout
        return dict(re.findall(r"(\w+)=(\S+)", out))

    def wait(self, timeout=60) -> dict[str, str]:
        ended = wait_for(lambda: self.info().get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout, 0.2)
        assert ended, f"job {self.id} still {self.info().get('JobState')} after {timeout}s: {self.text()[-2000:]}"
        return self.info()

    def wait_for_output(self, text, timeout=60):
        assert wait_for(lambda: text in self.text(), timeout, 0.2), f"no {text!r} in job {self.id}'s output: {self.text()[-2000:]}"

    def standins(self) -> dict[str, dict]:
        """What the stand-in vLLM saw on each node."""
        return {host: json.loads(body) for host, body in re.findall(r"^\[r[\d-]+ (\S+)\] standin: (\{.*)$", self.text(), re.M)}


def test_the_example_batch_script_checks_all_pairs_green_and_drops_the_heads_variables(slurm, hosts, tmp_path):
    job = Job(slurm, tmp_path, "slurm_example.sbatch", "--nodes=3", "--ntasks-per-node=2")
    info = job.wait()
    out = job.text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out[-2000:]
    assert "starting 6 ranks on 3 hosts (slurm)" in out and "all 36 handshakes ok" in out
    rows = table_rows(out)
    # Slurm's node order, SLURM_TASKS_PER_NODE's slots, each rank on its own node's address, not the head's.
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        (rank, f"h{rank // 2 + 1}", slurm.hosts.host(f"h{rank // 2 + 1}").address, 5600 + rank) for rank in range(6)
    ]


def test_vllm_dp_batch_script_serves_until_scancel_and_leaves_nothing(slurm, hosts, tmp_path, vllm_standin):
    job = Job(
        slurm,
        tmp_path,
        "slurm_vllm_dp.sbatch",
        "--nodes=3",
        env={"VLLM": vllm_standin, "MODEL": "m", "DP_LOCAL": "2", "READY_TIMEOUT": "30"},
    )
    job.wait_for_output("processes ready 3/3")
    subprocess.run(["scancel", job.id], env={**os.environ, **slurm.env}, check=True)
    info = job.wait()
    out = job.text()
    assert info["JobState"] == "CANCELLED", out[-2000:]
    assert "preflight passed" in out, out[-2000:]
    # scancel signals the steps and the batch script at once; whichever the head hears first, it is a stop, not a fault.
    assert re.search(r"^launcher: stopped(: the agent on h\d received SIGTERM| by SIGTERM; all 6 ranks stopped)", out, re.M), out[-1500:]
    assert "FAILED" not in out, out[-2000:]
    seen = job.standins()
    assert set(seen) == {"h1", "h2", "h3"}, out[-2000:]
    for host, got in seen.items():
        own = slurm.hosts.host(host).address
        assert (got["side_channel_host"], got["vllm_host_ip"]) == (own, own)
        assert got["argv"][got["argv"].index("--data-parallel-address") + 1] == slurm.hosts.host("h1").address
        assert got["headless"] == (host != "h1") and "VLLM_DP_RANK" not in got["env"] and "CUDA_VISIBLE_DEVICES" not in got["env"]
        assert "STANDIN_PRIVATE_NOTE" not in got["env"]  # the allowlist holds under Slurm as over SSH
    assert {host: got["dp_ranks"] for host, got in seen.items()} == {"h1": [0, 1], "h2": [2, 3], "h3": [4, 5]}
    # The `hosts` fixture then checks every node holds nothing but its sshd and slurmd.


def test_a_rank_failing_on_one_node_ends_the_job_with_that_ranks_code(slurm, hosts, tmp_path, vllm_standin):
    job = Job(
        slurm,
        tmp_path,
        "slurm_vllm_dp.sbatch",
        "--nodes=3",
        env={
            "VLLM": vllm_standin,
            "MODEL": "m",
            "DP_LOCAL": "2",
            "STANDIN_EXIT": "7",
            "STANDIN_EXIT_DP": "2",
            "EXTRA_ARGS": "--env STANDIN_EXIT --env STANDIN_EXIT_DP",  # not on the allowlist: named to reach the ranks
        },
    )
    info = job.wait()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "7:0"), job.text()[-2000:]
    assert "launcher: FAILED: rank 2 on h2 exited with code 7" in job.text()


def test_hosts_and_plan_read_the_allocation_outside_any_daemon():
    env = {**os.environ, "SLURM_JOB_NODELIST": "gpu[10-11],cpu1", "SLURM_TASKS_PER_NODE": "2(x2),1"}
    done = run_launcher("hosts", env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    assert [line.split()[:4:3] for line in done.stdout.splitlines()[1:]] == [["gpu10", "2"], ["gpu11", "2"], ["cpu1", "1"]]
    plan = run_launcher("plan", "--slots", "4", env=env, timeout=30)
    assert plan.returncode == 0 and "12 ranks on 3 hosts" in plan.stdout
    outside = subprocess.run(
        launcher_cmd("check", "--transport", "slurm", "-H", os.path.join(REPO, "hostfile")),
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        timeout=30,
    )
    assert outside.returncode == 2
    assert outside.stderr.startswith(
        "launcher: error: the slurm transport runs inside an allocation (sbatch or salloc): SLURM_JOB_ID is not set"
    )


def test_a_step_slurm_cancelled_is_told_apart_from_a_lost_agent():
    from launcher.plan import Host
    from launcher.transports.slurm import SrunConnection

    def connection(stderr_line):
        proc = subprocess.Popen(
            ["sh", "-c", f"echo '{stderr_line}' >&2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        conn = SrunConnection(Host("h2"), proc)
        conn.wait(5)
        conn.stderr_tail(wait=5)
        return conn

    cancelled = connection("slurmstepd: error: *** STEP 5.2 ON h2 CANCELLED AT 2026-11-24T12:18:30 ***")
    assert cancelled.stop_reason() == "Slurm cancelled its step (STEP 5.2 ON h2 CANCELLED AT 2026-11-24T12:18:30)"
    assert connection("srun: error: h2: task 0: Killed").stop_reason() is None


def test_srun_gets_the_extra_options_and_none_of_the_heads_worker_specific_values():
    from launcher.plan import Host
    from launcher.transports.slurm import SlurmTransport

    head_env = {"SLURM_JOB_ID": "7", "PATH": os.environ["PATH"], "CUDA_VISIBLE_DEVICES": "0", "VLLM_HOST_IP": HEAD, "HF_HOME": "/h"}
    transport = SlurmTransport(env=head_env, extra_args=("--gpus-per-node=8",))
    argv = transport.command(Host("n2", cwd="/srv"))
    assert "--nodelist=n2" in argv
    assert argv[-6:] == ["--chdir=/srv", "--export=PATH", "--gpus-per-node=8", sys.executable, "-m", "launcher.agent"]
    assert transport.srun_environment() == {"SLURM_JOB_ID": "7", "PATH": os.environ["PATH"], "HF_HOME": "/h"}
