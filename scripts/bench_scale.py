#!/usr/bin/env python3
"""Launch, all-pairs check and teardown at scale on the netns cluster, with the head's costs.

    sudo python scripts/bench_scale.py [--shapes 16x2 32x2 64x2 16x4 32x8] [--repeat 3] [--plot docs/bench-scale.png]

Each shape HOSTSxRANKS builds that many SSH hosts (a namespace and an sshd
each) and then, in this process, alternates plain ssh and pdsh (``python3 -c
pass`` on every host in parallel, the anchors) with one ``launcher.launch``
of RANKS built-in engine cores a host and the all-pairs check. It prints per
shape the medians of: ssh, pdsh, time to every rank ready and the ratio to pdsh, the check phase,
the teardown (check done to every agent gone), and, at the head, its CPU
time per host, its memory growth per host, and its threads and open file
descriptors while the job runs. ``--plot`` draws launch time against hosts
and check time against ranks.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_launch import launcher_as_installed, pdsh, plain_ssh

import launcher
from launcher import transports
from launcher.check import CheckOptions
from launcher.head.reporter import Reporter
from launcher.output.console import format_table
from launcher.plan import Host, LaunchOptions
from support.netns import NetnsCluster


class PhaseClock(Reporter):
    """When every rank was ready and when the check finished; the head's threads, fds and RSS meanwhile."""

    def __init__(self):
        self.ready_at = self.checked_at = 0.0
        self.threads = self.fds = self.rss = 0
        self.cells = 0

    def _sample(self) -> None:
        self.threads = max(self.threads, threading.active_count())
        self.fds = max(self.fds, len(os.listdir("/proc/self/fd")))
        self.rss = max(self.rss, psutil.Process().memory_info().rss)

    def ready(self, ranks) -> None:
        self.ready_at = time.perf_counter()
        self._sample()

    def checked(self, matrix) -> None:
        self.checked_at = time.perf_counter()
        self.cells = len(matrix.results)
        self._sample()


def launcher_run(cluster: NetnsCluster, slots: int, timeout: float) -> dict[str, float]:
    plan = launcher.plan_job([Host(h.name, slots=slots) for h in cluster.hosts], LaunchOptions(), env={})
    transport = transports.get("ssh", config_path=cluster.ssh_config, known_hosts=cluster.known_hosts)
    clock = PhaseClock()
    rss_before, cpu_before = psutil.Process().memory_info().rss, time.process_time()
    start = time.perf_counter()
    result = launcher.launch(plan, transport, reporter=clock, check=CheckOptions(timeout=timeout))
    end = time.perf_counter()
    if result.check is None or clock.cells != len(result.ranks) ** 2:
        raise RuntimeError(result.failure.message if result.failure else f"the check has {clock.cells} cells")
    return {
        "failed": len(result.check.failures),
        "ready": clock.ready_at - start,
        "check": clock.checked_at - clock.ready_at,
        "teardown": end - clock.checked_at,
        "cpu": time.process_time() - cpu_before,
        "rss": max(0, clock.rss - rss_before),
        "threads": clock.threads,
        "fds": clock.fds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4x2", "8x2", "16x2", "32x2", "64x2", "16x4", "32x8"], help="HOSTSxRANKS a host")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--plot", metavar="FILE.png")
    parser.add_argument("--handshake-timeout", type=float, default=5.0)
    args = parser.parse_args()
    launcher_as_installed()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the head holds a few descriptors per host
    header = ("hosts", "ranks", "ssh (s)", "pdsh (s)", "ready (s)", "vs pdsh", "check (s)", "pairs", "failed", "teardown (s)")
    header += ("head CPU/host (ms)", "head RSS/host (KiB)", "head threads", "head fds")
    rows, points = [header], []
    for shape in args.shapes:
        hosts, slots = (int(n) for n in shape.split("x"))
        with NetnsCluster(hosts) as cluster:
            plain_ssh(cluster)  # warm caches once, for both
            ssh, anchor, runs = [], [], []
            for _ in range(args.repeat):
                ssh.append(plain_ssh(cluster))
                anchor.append(pdsh(cluster))
                runs.append(launcher_run(cluster, slots, args.handshake_timeout))
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            p, s = statistics.median(anchor), statistics.median(ssh)
            rows.append(
                (
                    str(hosts), str(hosts * slots), f"{s:.2f}", f"{p:.2f}", f"{med['ready']:.2f}", f"{med['ready'] / p:.2f}x",
                    f"{med['check']:.2f}", str((hosts * slots) ** 2), str(max(r["failed"] for r in runs)), f"{med['teardown']:.2f}",
                    f"{1000 * med['cpu'] / hosts:.0f}", f"{med['rss'] / 1024 / hosts:.0f}", f"{med['threads']:.0f}", f"{med['fds']:.0f}",
                )
            )  # fmt: skip
            points.append((hosts, slots, {"ssh": s, "pdsh": p}, med))
            print(f"{shape}: pdsh {p:.2f}s, ready {med['ready']:.2f}s, check {med['check']:.2f}s", file=sys.stderr, flush=True)
    print(f"median of {args.repeat} runs per row, {os.cpu_count()} CPUs; all-pairs check of the built-in cores", end="")
    print(f" (--handshake-timeout {args.handshake_timeout:g}); failed: the most pairs failed in one run")
    print(format_table(rows, right=True))
    if args.plot:
        plot(points, args.plot)
    return 0


def plot(points, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    by_slots: dict[int, list] = {}
    for hosts, slots, p, med in points:
        by_slots.setdefault(slots, []).append((hosts, p, med))
    markers = iter("o^Dvs*")
    for slots, series in sorted(by_slots.items()):
        series.sort(key=lambda point: point[0])
        marker = next(markers)
        label = f"launcher, {slots} ranks a host"
        left.plot([h for h, _, _ in series], [m["ready"] for _, _, m in series], marker=marker, markersize=7, label=label)
        right.plot([h * slots for h, _, _ in series], [m["check"] for _, _, m in series], marker=marker, markersize=7, label=label)
        for hosts, _, m in series:
            right.annotate(f"{hosts} hosts", (hosts * slots, m["check"]), textcoords="offset points", xytext=(5, -4), fontsize=8)
    for name, style in (("pdsh", "--"), ("ssh", ":")):
        by_hosts: dict[int, list[float]] = {}
        for h, _, anchors, _ in points:
            by_hosts.setdefault(h, []).append(anchors[name])
        xs = sorted(by_hosts)
        left.plot(xs, [statistics.median(by_hosts[h]) for h in xs], marker="s", linestyle=style, label=f"{name} python3 -c pass")
    left.set(xlabel="hosts", ylabel="seconds", title="launch: until every rank is ready")
    left.legend()
    right.set(xlabel="ranks", ylabel="seconds", title="all-pairs check phase (every rank to every rank)")
    right.legend()
    fig.suptitle(f"netns cluster on one {os.cpu_count()}-CPU machine (scripts/bench_scale.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
