#!/usr/bin/env python3
"""Fault injection on the netns cluster: how fast is everything gone, and is anything left?

    sudo python scripts/reliability.py [--grace 2] [--repeat 3]

Each case starts ``launcher run`` over SSH on 3 namespace hosts, one rank per
host, running the worst rank we can think of: it ignores SIGTERM and leaves
two grandchildren, one in its own session. Once all are ready, the case
injects its fault and measures, from that moment, when the head exits and
when the last job process on any host is gone (by scanning each namespace's
process table), and what is still there after 30 s. Target: everything gone
within grace + 2 s (partitions: within the heartbeat timeout + grace + 2 s).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_cli  # noqa: F401  (puts tests/support on the path)

from launcher.output.console import format_table
from support.netns import NetnsCluster

# Ignores SIGTERM (so teardown needs the SIGKILL after the grace period) and
# leaves a grandchild in its own session and one in its process group.
WORST_RANK = "trap '' TERM; setsid sleep 1000 & sleep 1000 & echo up; if [ {rank} = 1 ] && [ -n \"$FAIL\" ]; then sleep 1; exit 9; fi; wait"
HEARTBEAT = 3.0


def start(cluster: NetnsCluster, workdir: str, grace: float, fail: bool = False) -> subprocess.Popen:
    hostfile = os.path.join(workdir, "hostfile")
    with open(hostfile, "w") as f:
        f.write(cluster.hostfile(slots=1))
    env = {**os.environ, **({"FAIL": "1"} if fail else {})}
    args = [
        sys.executable,
        "-m",
        "launcher.cli",
        "run",
        "-H",
        hostfile,
        *cluster.ssh_args(),
        "--grace",
        str(grace),
        "--heartbeat-timeout",
        str(HEARTBEAT),
        "--ready-log",
        "^up$",
        "--env-include",
        "FAIL",
        "-q",
        "--",
        "sh",
        "-c",
        WORST_RANK,
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    for line in proc.stderr:
        if "ranks ready 3/3" in line:
            return proc
    raise RuntimeError(f"launcher exited {proc.wait()} before its ranks were ready")


def job_pids(cluster: NetnsCluster) -> list[int]:
    """Agents, ranks and their children on every host. Not sshd's own session processes: a
    session whose client vanished in a partition lingers until TCP gives up, which is sshd's
    business (and ClientAlive settings users do not control)."""
    found = []
    for pids in cluster.stray_pids().values():
        for pid in pids:
            try:
                if psutil.Process(pid).name() != "sshd":
                    found.append(pid)
            except psutil.NoSuchProcess:
                pass
    return found


def case_signal_head(signum):
    def inject(cluster, proc):
        proc.send_signal(signum)

    return inject


def kill_agent(cluster, proc):
    h2 = cluster.host("h2")
    agent = next(p for p in h2.pids() if "launcher.agent" in " ".join(psutil.Process(p).cmdline()))
    os.kill(agent, signal.SIGKILL)


def drop_ssh(cluster, proc):
    h2 = cluster.host("h2")
    for pid in h2.pids():
        if pid != cluster.sshd["h2"].pid and psutil.Process(pid).name() == "sshd":
            os.kill(pid, signal.SIGKILL)


def partition(cluster, proc):
    subprocess.run(["ip", "link", "set", "lnch-v2", "down"], check=True)


def rank_fails(cluster, proc):
    pass  # rank 1 exits 9 one second after it is up


CASES = [
    ("SIGINT to the head", case_signal_head(signal.SIGINT), False),
    ("SIGTERM to the head", case_signal_head(signal.SIGTERM), False),
    ("SIGKILL to the head", case_signal_head(signal.SIGKILL), False),
    ("SIGKILL to an agent", kill_agent, False),
    ("SSH session dropped", drop_ssh, False),
    ("silent partition (veth down)", partition, False),
    ("a rank exits 9", rank_fails, True),
]


def run_case(cluster, workdir, grace, inject, fail) -> tuple[int | None, float, float, int]:
    proc = start(cluster, workdir, grace, fail)
    t0 = time.monotonic()
    inject(cluster, proc)
    head_exit = gone = None
    try:
        while time.monotonic() - t0 < 30:
            if head_exit is None and proc.poll() is not None:
                head_exit = time.monotonic() - t0
            if gone is None and not job_pids(cluster):
                gone = time.monotonic() - t0
            if head_exit is not None and gone is not None:
                break
            time.sleep(0.02)
        left = len(job_pids(cluster))
    finally:
        subprocess.run(["ip", "link", "set", "lnch-v2", "up"], check=False)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pid in job_pids(cluster):  # leave the next case a clean cluster
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return proc.returncode, head_exit if head_exit is not None else float("nan"), gone if gone is not None else float("nan"), left


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grace", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = [("case", "exit", "head exits (s)", "all gone (s)", "processes left", "target (s)")]
    with NetnsCluster(3) as cluster, tempfile.TemporaryDirectory() as workdir:
        for name, inject, fail in CASES:
            results = [run_case(cluster, workdir, args.grace, inject, fail) for _ in range(args.repeat)]
            codes = sorted({str(r[0]) for r in results})
            target = args.grace + 2 + (HEARTBEAT if "partition" in name else 0)
            rows.append(
                (
                    name,
                    "/".join(codes),
                    f"{statistics.median(r[1] for r in results):.2f}",
                    f"{max(r[2] for r in results):.2f}",
                    str(sum(r[3] for r in results)),
                    f"{target:g}",
                )
            )
            print(f"{name}: {results}", file=sys.stderr, flush=True)
    print(
        f"3 SSH hosts, 1 rank each (ignores SIGTERM, 2 grandchildren), grace {args.grace:g}s, "
        f"heartbeat timeout {HEARTBEAT:g}s; {args.repeat} runs per case: median head exit, worst all-gone, total left"
    )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
