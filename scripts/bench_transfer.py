#!/usr/bin/env python3
"""What ``check --transfer`` costs on top of the handshake check, on the netns cluster.

    sudo python scripts/bench_transfer.py [--hosts 2 4 8] [--bytes 1048576] [--repeat 3]

For each host count (one built-in rank per host) it builds the namespace
cluster, then, in this process, alternates:

- baseline: ``launcher.launch`` with the all-pairs handshake check, start to
  result (every process stopped);
- transfer: the same with ``transfer_bytes``: every rank also becomes a NIXL
  agent and READs every peer's buffer three times (one cold, two warm), verified.

It prints median wall times, their ratio, the median warm bandwidth over all
pairs and an engine core's resident memory with its NIXL agent. The ratio is
the figure to compare; the bandwidth is veth over one 2-CPU machine's kernel.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_cli  # noqa: F401  (puts tests/support on the path)

import launcher
from launcher import transports
from launcher.check import CheckOptions
from launcher.head.reporter import Reporter
from launcher.output.console import format_table
from launcher.plan import Host, LaunchOptions
from support.netns import NetnsCluster


class CoreMemory(Reporter):
    """An engine core's RSS on the first host, once every rank is ready (its NIXL agent and buffers included)."""

    def __init__(self, cluster: NetnsCluster):
        self.cluster, self.rss = cluster, 0

    def checked(self, matrix) -> None:
        for pid in self.cluster.hosts[0].pids():
            try:
                proc = psutil.Process(pid)
                if "launcher.engine_core" in " ".join(proc.cmdline()):
                    self.rss = max(self.rss, proc.memory_info().rss)
            except psutil.Error:
                pass


def timed_check(cluster: NetnsCluster, nbytes: int | None, reporter: Reporter) -> tuple[float, list[float]]:
    plan = launcher.plan_job([Host(h.name) for h in cluster.hosts], LaunchOptions(transfer_bytes=nbytes), env={})
    transport = transports.get("ssh", config_path=cluster.ssh_config, known_hosts=cluster.known_hosts)
    start = time.perf_counter()
    result = launcher.launch(plan, transport, check=CheckOptions(), reporter=reporter)
    elapsed = time.perf_counter() - start
    if not result.ok:
        raise RuntimeError(result.failure.message)
    return elapsed, [r.mbps for r in result.transfer.results.values()] if result.transfer else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--bytes", type=int, default=1 << 20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = [("hosts", "reads", "check (s)", "check --transfer (s)", "ratio", "median MB/s", "core RSS (MiB)")]
    for count in args.hosts:
        with NetnsCluster(count) as cluster:
            memory = CoreMemory(cluster)
            timed_check(cluster, None, Reporter())  # warm caches and known_hosts once, for both
            base, ours, mbps = [], [], []
            for _ in range(args.repeat):
                base.append(timed_check(cluster, None, Reporter())[0])
                elapsed, rates = timed_check(cluster, args.bytes, memory)
                ours.append(elapsed)
                mbps += rates
            b, o = statistics.median(base), statistics.median(ours)
            reads = count * (count - 1)
            rows.append(
                (
                    str(count),
                    str(reads),
                    f"{b:.2f}",
                    f"{o:.2f}",
                    f"{o / b:.2f}x",
                    f"{statistics.median(mbps):.0f}",
                    f"{memory.rss / 2**20:.0f}",
                )
            )
            print(f"{count} hosts: check {b:.2f}s, with transfer {o:.2f}s", file=sys.stderr, flush=True)
    print(f"median of {args.repeat} runs per row, {args.bytes} bytes per read, {os.cpu_count()} CPUs")
    print(format_table(rows, right=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
