#!/usr/bin/env python3
"""Soak: many launch + all-pairs check + teardown cycles on the netns cluster; count what leaks.

    sudo python scripts/soak.py [--cycles 100] [--hosts 3] [--slots 2]

Each cycle is ``launcher.launch(plan, ssh, check=...)`` from this process, so
leaks in the head itself (threads, file descriptors) show up as well as those
on the hosts. After the last cycle it compares against the state before the
first: processes on every host other than its sshd, our processes on the
head, network namespaces, TCP sockets in LISTEN (head and every host), temp
files, and the head's threads and open fds. Any difference is a leak and
makes the exit status 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_cli  # noqa: F401  (puts tests/support on the path)

import launcher
from launcher import transports
from launcher.check import CheckOptions
from launcher.plan import Host, LaunchOptions
from support.netns import NetnsCluster


def listening(netns: str | None = None) -> set[str]:
    cmd = ["ss", "-Hltn"]
    out = subprocess.run((["ip", "netns", "exec", netns] if netns else []) + cmd, capture_output=True, text=True).stdout
    return {line.split()[3] for line in out.splitlines() if line.split()}


def snapshot(cluster: NetnsCluster) -> dict[str, object]:
    me = psutil.Process()
    return {
        "host processes": sum(len(p) for p in cluster.stray_pids().values()),
        "head children": len(me.children(recursive=True)),
        "namespaces": subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.count("\n"),
        "LISTEN sockets": len(listening()) + sum(len(listening(h.netns)) for h in cluster.hosts),
        "temp files": len(os.listdir(tempfile.gettempdir())),
        "head threads": threading.active_count(),
        "head fds": me.num_fds(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--slots", type=int, default=2)
    args = parser.parse_args()
    with NetnsCluster(args.hosts) as cluster:
        hosts = [Host(h.name, slots=args.slots) for h in cluster.hosts]
        transport = transports.get("ssh", config_path=cluster.ssh_config, known_hosts=cluster.known_hosts)
        before = snapshot(cluster)
        times, failures = [], []
        for cycle in range(1, args.cycles + 1):
            plan = launcher.plan_job(hosts, LaunchOptions(grace=2.0), env={})
            start = time.perf_counter()
            result = launcher.launch(plan, transport, check=CheckOptions())
            times.append(time.perf_counter() - start)
            if not result.ok:
                failures.append(f"cycle {cycle}: {result.failure.message}")
            if cycle % 10 == 0:
                print(f"cycle {cycle}/{args.cycles}: {times[-1]:.2f}s, {len(failures)} failed", file=sys.stderr, flush=True)
        time.sleep(1.0)  # let the last agents' sshd sessions close
        after = snapshot(cluster)
    ranks = args.hosts * args.slots
    print(f"{args.cycles} cycles of launch + {ranks}x{ranks} handshake check + teardown, {args.hosts} SSH hosts x {args.slots} ranks")
    print(
        f"cycle time: median {statistics.median(times):.2f}s, p95 {sorted(times)[int(len(times) * 0.95) - 1]:.2f}s, "
        f"max {max(times):.2f}s; failed cycles: {len(failures)}"
    )
    for line in failures[:5]:
        print(f"  {line}")
    width = max(map(len, before))
    leaked = False
    print(f"{'':{width}}  before  after")
    for key in before:
        mark = "" if before[key] == after[key] else "  <- LEAK"
        leaked |= bool(mark)
        print(f"{key:{width}}  {before[key]!s:>6}  {after[key]!s:>5}{mark}")
    return 1 if leaked or failures else 0


if __name__ == "__main__":
    sys.exit(main())
