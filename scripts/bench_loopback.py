#!/usr/bin/env python3
"""Loopback multi-process start-up, the multi-process-test use case: launcher against the fan-outs it replaces.

    python scripts/bench_loopback.py [--ranks 2 4 8] [--repeat 9] [--plot docs/bench-loopback.png]

For each rank count, in this process and alternating (so that every
contender sees the same machine state), the wall time and CPU time (this
process's and its children's) to run N ``python -c pass``, with the
interpreter that runs this script (a clean venv starts in a third of the
time of one whose site-packages run .pth hooks):

- fan-out: a Python parent starting N subprocesses and waiting (the least it costs);
- mpirun: Open MPI's ``mpirun -np N`` (scripts/setup-bench.sh installs it), when present;
- launcher: ``launcher run -q --to-completion -H 'localhost slots=N' -- python -c pass``
  (the head, one agent, N ranks, every lifeline property in place);

and, from this already-running interpreter (what a pytest session does):

- Popen fan-out: N ``subprocess.Popen`` and their waits;
- launch(): ``launcher.launch`` of the same job (no head interpreter to start).

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
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_launch import launcher_as_installed

import launcher
from launcher.output.console import format_table
from launcher.plan import Host, LaunchOptions

PY = sys.executable
IN_FAN_OUT, IN_LAUNCH = "Popen fan-out", "launch()"  # the in-process contenders


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children so far."""
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run."""
    cpu, start = cpu_seconds(), time.perf_counter()
    run()
    return time.perf_counter() - start, cpu_seconds() - cpu


def command(argv: list[str]) -> Callable[[], object]:
    return lambda: subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)


def fan_out(ranks: int) -> None:
    for p in [subprocess.Popen([PY, "-c", "pass"]) for _ in range(ranks)]:
        p.wait()


def launch_in_process(ranks: int) -> None:
    plan = launcher.plan_job([Host(name="localhost", slots=ranks)], LaunchOptions(command=(PY, "-c", "pass"), to_completion=True))
    result = launcher.launch(plan)
    if not result.ok:
        raise RuntimeError(result.failure.message)


def contenders(ranks: int, hostfile: str) -> dict[str, Callable[[], object]]:
    found = {
        "fan-out": command([PY, "-c", f"import subprocess,sys; ps=[subprocess.Popen([sys.executable,'-c','pass']) "
                                      f"for _ in range({ranks})]; [p.wait() for p in ps]"]),
        "launcher": command([PY, "-m", "launcher.entry", "run", "-q", "--to-completion", "-H", hostfile, "--", PY, "-c", "pass"]),
    }  # fmt: skip
    if shutil.which("mpirun"):
        found["mpirun"] = command(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(ranks), PY, "-c", "pass"])
    found[IN_FAN_OUT] = lambda: fan_out(ranks)
    found[IN_LAUNCH] = lambda: launch_in_process(ranks)
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
            for run in contenders(ranks, hostfile).values():
                timed(run)  # warm the page cache for each, once
            for _ in range(args.repeat):
                for name, run in contenders(ranks, hostfile).items():
                    runs.setdefault(name, []).append(timed(run))
            for name, samples in runs.items():
                results.setdefault(name, {})[ranks] = (statistics.median(w for w, _ in samples), statistics.median(c for _, c in samples))
            print(f"{ranks} ranks done", file=sys.stderr, flush=True)
    commands = [n for n in results if n not in (IN_FAN_OUT, IN_LAUNCH)]
    print(f"median of {args.repeat} alternating runs, {os.cpu_count()} CPUs, python -c pass per rank, {PY}")
    print("commands, each from its own interpreter start:")
    print(ratio_table(results, args.ranks, commands, "launcher", ["fan-out", "mpirun"]))
    print("in-process, from this running interpreter (a test session calling launcher.launch):")
    print(ratio_table(results, args.ranks, [IN_FAN_OUT, IN_LAUNCH], IN_LAUNCH, [IN_FAN_OUT]))
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


def ratio_table(results, ranks_list: list[int], names: list[str], ours: str, baselines: list[str]) -> str:
    """Wall time of each of ``names`` per rank count, and ``ours`` as a ratio of each baseline (wall, then CPU)."""
    baselines = [b for b in baselines if b in results]
    rows = [
        (
            "ranks",
            *(f"{n} wall (s)" for n in names),
            *(f"{ours} / {b}" for b in baselines),
            *(f"CPU: {ours} / {b}" for b in baselines[:1]),
        )
    ]
    for ranks in ranks_list:
        wall = {n: results[n][ranks][0] for n in names}
        cpu = {n: results[n][ranks][1] for n in names}
        rows.append(
            (
                str(ranks),
                *(f"{wall[n]:.3f}" for n in names),
                *(f"{wall[ours] / wall[b]:.2f}x" for b in baselines),
                *(f"{cpu[ours] / cpu[b]:.2f}x" for b in baselines[:1]),
            )
        )
    return format_table(rows, right=True)


if __name__ == "__main__":
    sys.exit(main())
