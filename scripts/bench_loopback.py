#!/usr/bin/env python3
"""Loopback multi-process start-up, the multi-process-test use case: launcher against the fan-outs it replaces.

    python scripts/bench_loopback.py [--ranks 2 4 8] [--repeat 9] [--plot docs/bench-loopback.png]

For each rank count, in this process and alternating (so that every
contender sees the same machine state), the wall time and CPU time (of the
children) to run N ``python -c pass``:

- fan-out: a Python parent starting N subprocesses and waiting (the least it costs);
- mpirun: Open MPI's ``mpirun -np N`` (scripts/setup-bench.sh installs it), when present;
- launcher: ``launcher run -q --to-completion -H 'localhost slots=N' -- python -c pass``
  (the head, one agent, N ranks, every lifeline property in place).

It prints medians and launcher's ratios, and with --plot draws wall time against ranks.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_launch import launcher_as_installed

from launcher.report import format_table

PY = sys.executable


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the children) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def contenders(ranks: int, hostfile: str) -> dict[str, list[str]]:
    found = {
        "fan-out": [PY, "-c", f"import subprocess,sys; ps=[subprocess.Popen([sys.executable,'-c','pass']) for _ in range({ranks})]; "
                              "[p.wait() for p in ps]"],
        "launcher": [PY, "-m", "launcher.entry", "run", "-q", "--to-completion", "-H", hostfile, "--", PY, "-c", "pass"],
    }  # fmt: skip
    if shutil.which("mpirun"):
        found["mpirun"] = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(ranks), PY, "-c", "pass"]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--plot", metavar="FILE.png")
    args = parser.parse_args()
    launcher_as_installed()
    results: dict[str, dict[int, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            hostfile = os.path.join(tmp, f"hosts-{ranks}")
            with open(hostfile, "w") as f:
                f.write(f"localhost slots={ranks}\n")
            runs: dict[str, list[tuple[float, float]]] = {}
            for argv in contenders(ranks, hostfile).values():
                timed(argv)  # warm the page cache for each, once
            for _ in range(args.repeat):
                for name, argv in contenders(ranks, hostfile).items():
                    runs.setdefault(name, []).append(timed(argv))
            for name, samples in runs.items():
                results.setdefault(name, {})[ranks] = (statistics.median(w for w, _ in samples), statistics.median(c for _, c in samples))
            print(f"{ranks} ranks done", file=sys.stderr, flush=True)
    rows = [
        (
            "ranks",
            *(f"{n} wall (s)" for n in results),
            "launcher / fan-out",
            "launcher / mpirun" if "mpirun" in results else "",
            "CPU: launcher / fan-out",
        )
    ]
    for ranks in args.ranks:
        wall = {n: results[n][ranks][0] for n in results}
        cpu = {n: results[n][ranks][1] for n in results}
        rows.append(
            (
                str(ranks),
                *(f"{wall[n]:.3f}" for n in results),
                f"{wall['launcher'] / wall['fan-out']:.2f}x",
                f"{wall['launcher'] / wall['mpirun']:.2f}x" if "mpirun" in wall else "",
                f"{cpu['launcher'] / cpu['fan-out']:.2f}x",
            )
        )
    print(f"median of {args.repeat} alternating runs, {os.cpu_count()} CPUs, python -c pass per rank")
    print(format_table(rows, right=True))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, by_ranks in results.items():
            ax.plot(list(by_ranks), [w for w, _ in by_ranks.values()], marker="o", label=name)
        ax.set_xlabel("ranks (python -c pass each)")
        ax.set_ylabel("wall time (s), median")
        ax.set_title(f"Loopback start-to-exit, {os.cpu_count()} CPUs", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
