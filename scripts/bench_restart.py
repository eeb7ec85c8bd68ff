#!/usr/bin/env python3
"""Recovery after a rank is killed (--restart on-failure) against the job's first start; and how fast `launcher status` answers.

    python3 scripts/bench_restart.py                 # 8 and 16 loopback hosts, 3 rounds each; status on 64 hosts
    python3 scripts/bench_restart.py --hosts 8 --rounds 5

Each round starts ``launcher run`` on N loopback hosts (127.0.0.1 ... N, one
built-in engine core each, local agents), waits for every rank ready (the
first start, from the command's start), SIGKILLs one rank and waits for the
group ready again (the recovery, from the kill): the agents and their
connections are kept, so a recovery should cost no more than a first start.
The backoff is 0: what is measured is the restart itself. Then a 64-host
job runs detached and ``launcher status`` is timed against ``python -c
pass`` (the floor: an interpreter's start), in the same process.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from launcher.output.table import format_table  # noqa: E402

LAUNCHER = os.path.join(os.path.dirname(sys.executable), "launcher")


def hostfile(folder: str, hosts: int) -> str:
    path = os.path.join(folder, f"hosts-{hosts}")
    with open(path, "w") as f:
        f.write("".join(f"127.0.0.{i + 1}\n" for i in range(hosts)))
    return path


class Lines:
    """A process's stderr, line by line with the moment each arrived."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, args=(proc.stderr,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            with self.cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self.cond.notify_all()

    def wait(self, pattern: str, after: int = 0, timeout: float = 120.0) -> tuple[int, float, str]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(after, len(self.lines)):
                    if re.search(pattern, self.lines[i][1]):
                        return i, *self.lines[i]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {pattern!r}: {self.lines[-5:]}")
                self.cond.wait(left)


def one_round(hf: str, hosts: int, port_base: int) -> tuple[float, float]:
    argv = [LAUNCHER, "run", "-H", hf, "--port-base", str(port_base), "--restart", "on-failure", "--restart-backoff", "0,0", "-q"]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = Lines(proc)
    try:
        i, ready_at, _ = lines.wait(rf"ranks ready {hosts}/{hosts}")
        first = ready_at - started
        victim = _a_rank_pid(proc.pid)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        _, back_at, _ = lines.wait(r"is ready again after restart 1", after=i)
        return first, back_at - killed
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def _a_rank_pid(head: int) -> int:
    """The first engine core under the head's agents."""
    import psutil

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for child in psutil.Process(head).children(recursive=True):
            try:
                if "launcher.engine_core" in " ".join(child.cmdline()):
                    return child.pid
            except psutil.Error:
                continue
        time.sleep(0.05)
    raise RuntimeError("no rank found")


def status_latency(folder: str, hosts: int, port_base: int, times: int) -> tuple[float, float]:
    """(median seconds of `launcher status`, of `python -c pass`) against a detached job of ``hosts`` hosts."""
    env = {**os.environ, "XDG_STATE_HOME": os.path.join(folder, "state")}
    done = subprocess.run([LAUNCHER, "run", "-H", hostfile(folder, hosts), "--port-base", str(port_base), "--detach"],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    job = done.stdout.strip()
    try:
        status, floor = [], []
        for _ in range(times):
            t = time.monotonic()
            out = subprocess.run([LAUNCHER, "status", job], capture_output=True, text=True, env=env, timeout=30)
            status.append(time.monotonic() - t)
            assert "ready in" in out.stdout and out.stdout.count(" ready ") >= hosts, out.stdout[-500:]
            t = time.monotonic()
            subprocess.run([sys.executable, "-c", "pass"], env=env, timeout=30)
            floor.append(time.monotonic() - t)
        return statistics.median(status), statistics.median(floor)
    finally:
        subprocess.run([LAUNCHER, "stop", job], capture_output=True, env=env, timeout=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="*", default=[8, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--status-hosts", type=int, default=64)
    parser.add_argument("--status-times", type=int, default=20)
    parser.add_argument("--port-base", type=int, default=17400)
    args = parser.parse_args()
    rows = [("HOSTS", "FIRST START (s)", "RECOVERY (s)", "RECOVERY / START")]
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as folder:
        for hosts in args.hosts:
            hf = hostfile(folder, hosts)
            firsts, recoveries = [], []
            for _ in range(args.rounds):
                first, recovery = one_round(hf, hosts, args.port_base)
                firsts.append(first)
                recoveries.append(recovery)
                print(f"{hosts} hosts: first start {first:.3f}s, recovery {recovery:.3f}s", file=sys.stderr)
            first, recovery = statistics.median(firsts), statistics.median(recoveries)
            rows.append((str(hosts), f"{first:.3f}", f"{recovery:.3f}", f"{recovery / first:.2f}x"))
        print(format_table(rows))
        status, floor = status_latency(folder, args.status_hosts, args.port_base, args.status_times)
        print()
        print(format_table([
            ("JOB", "launcher status (ms)", "python -c pass (ms)", "STATUS / FLOOR"),
            (f"{args.status_hosts} hosts", f"{status * 1000:.0f}", f"{floor * 1000:.0f}", f"{status / floor:.2f}x"),
        ]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
