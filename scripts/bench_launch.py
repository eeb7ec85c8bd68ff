#!/usr/bin/env python3
"""Start-up time and memory of launcher against plain OpenSSH, on the netns cluster.

    sudo python scripts/bench_launch.py [--hosts 1 2 4 8] [--ranks-per-host 1] [--repeat 5]

For each host count it builds the namespace cluster, then, in this process,
alternates (so all see the same machine state):

- plain ssh: ``ssh -F CONFIG hN python3 -c pass`` to every host in parallel
  (OpenSSH, a Python start on the far end: the least any SSH launcher pays);
- pdsh: ``pdsh -R ssh -w h1,...`` of the same, when pdsh is installed
  (scripts/setup-bench.sh);
- launcher: ``launcher.launch`` of N built-in engine cores per host, from
  the call until every rank is bound and ready (agents started, addresses
  detected, listeners bound, the head's reachability probe done), then stop.

It prints median times, launcher's ratios, and the resident memory of one
agent and one engine core on a host. Numbers are for this machine; the
ratios are the figures to compare.
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_cli  # noqa: F401  (puts tests/support on the path)

import launcher
from launcher import transports
from launcher.head.reporter import Reporter
from launcher.output.console import format_table
from launcher.plan import Host, LaunchOptions
from support.netns import NetnsCluster


def launcher_as_installed() -> None:
    """Compile launcher's bytecode, as ``pip install`` does: with PYTHONDONTWRITEBYTECODE set and a
    checkout's bytecode stale, every interpreter would compile the changed modules again (~20 ms a start)."""
    compileall.compile_dir(os.path.dirname(launcher.__file__), quiet=1)


def plain_ssh(cluster: NetnsCluster) -> float:
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["ssh", "-F", cluster.ssh_config, "-o", "BatchMode=yes", h.name, "python3", "-c", "pass"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for h in cluster.hosts
    ]
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"ssh failed: {p.stderr.read().decode()}")
    return time.perf_counter() - start


class ReadyProbe(Reporter):
    """Notes when every rank is ready, and then one agent's and one engine core's memory on the first host.

    A forked core shares most of its pages with its agent: its USS (the pages
    only it holds) is what one more rank costs; its RSS counts the shared ones too.
    """

    def __init__(self, cluster: NetnsCluster):
        self.cluster, self.at, self.rss = cluster, 0.0, {}

    def ready(self, ranks) -> None:
        self.at = time.perf_counter()
        for pid in self.cluster.hosts[0].pids():
            try:
                proc = psutil.Process(pid)
                cmd = " ".join(proc.cmdline())
                for name in ("launcher.agent", "launcher.engine_core"):
                    if name in cmd:
                        self.rss[name] = proc.memory_info().rss
                        self.rss[name + " uss"] = proc.memory_full_info().uss
            except psutil.Error:
                pass


def pdsh(cluster: NetnsCluster) -> float:
    env = {**os.environ, "PDSH_RCMD_TYPE": "ssh", "PDSH_SSH_ARGS_APPEND": f"-F {cluster.ssh_config} -o BatchMode=yes"}
    start = time.perf_counter()
    subprocess.run(
        ["pdsh", "-w", ",".join(h.name for h in cluster.hosts), "python3", "-c", "pass"],
        env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return time.perf_counter() - start


def launcher_ready(cluster: NetnsCluster, probe: ReadyProbe, slots: int) -> float:
    plan = launcher.plan_job([Host(h.name, slots=slots) for h in cluster.hosts], LaunchOptions(), env={})
    transport = transports.get("ssh", config_path=cluster.ssh_config, known_hosts=cluster.known_hosts)
    start = time.perf_counter()
    result = launcher.launch(plan, transport, reporter=probe)
    if not result.ok:
        raise RuntimeError(result.failure.message)
    return probe.at - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--ranks-per-host", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    launcher_as_installed()
    with_pdsh = shutil.which("pdsh") is not None
    rows = [("hosts", "ranks", "plain ssh (s)", "pdsh (s)", "launcher ready (s)", "vs ssh", "vs pdsh")]
    rows[0] += ("agent RSS (MiB)", "core RSS (MiB)", "core USS (MiB)")
    for count in args.hosts:
        with NetnsCluster(count) as cluster:
            probe = ReadyProbe(cluster)
            plain_ssh(cluster)  # warm caches and known_hosts once, for all
            ssh, pd, ours = [], [], []
            for _ in range(args.repeat):
                ssh.append(plain_ssh(cluster))
                if with_pdsh:
                    pd.append(pdsh(cluster))
                ours.append(launcher_ready(cluster, probe, args.ranks_per_host))
            s, o = statistics.median(ssh), statistics.median(ours)
            p = statistics.median(pd) if pd else None
            rows.append(
                (
                    str(count),
                    str(count * args.ranks_per_host),
                    f"{s:.3f}",
                    f"{p:.3f}" if p else "-",
                    f"{o:.3f}",
                    f"{o / s:.2f}x",
                    f"{o / p:.2f}x" if p else "-",
                    f"{probe.rss.get('launcher.agent', 0) / 2**20:.0f}",
                    f"{probe.rss.get('launcher.engine_core', 0) / 2**20:.0f}",
                    f"{probe.rss.get('launcher.engine_core uss', 0) / 2**20:.1f}",
                )
            )
            print(f"{count} hosts: ssh {s:.3f}s, launcher {o:.3f}s", file=sys.stderr, flush=True)
    print(f"median of {args.repeat} runs per row, {args.ranks_per_host} built-in ranks a host, {os.cpu_count()} CPUs")
    print(format_table(rows, right=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
