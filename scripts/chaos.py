#!/usr/bin/env python3
"""Chaos soak: random faults at random moments across head, agent, ranks and the side channel.

    python scripts/chaos.py [--cycles 1000] [--minutes 45] [--seed 1] [--where loopback|netns]

Each cycle starts ``launcher run`` on two ranks (``--where netns``: two SSH
namespace hosts, one rank each; needs root), picks a fault and a moment
(before, during or after start-up), injects it, and, when the fault does
not end the job by itself, stops the job with SIGINT a second later. It
records the head's exit code and the first line it printed about the end
(numbers and ids folded), how long the head took to exit after the fault, a
hang (no exit 30 s after the fault: the head is SIGKILLed and the cycle
counted), and a leak (any process of the cycle still alive 5 s after the
head exited: found by the cycle's own working directory on loopback, on
namespace hosts as anything but their sshd; killed after counting).

Faults: SIGINT, SIGTERM, SIGKILL and a 3 s SIGSTOP of the head; SIGKILL and
SIGSTOP of an agent; SIGKILL and SIGSTOP of a rank; garbage and a flood of
frames at a rank's side channel. Ranks are built-in engine cores for the
side-channel faults and otherwise the worst rank there is: it ignores
SIGTERM and leaves a grandchild in a session of its own.

Bounded in count (--cycles) and time (--minutes); traffic goes to loopback
or the namespace hosts only. Prints a table per fault kind; exit status 1
if any cycle hung or leaked.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)
from launcher.output.console import format_table  # noqa: E402

# Ignores SIGTERM (teardown needs the SIGKILL after the grace) and leaves a grandchild in its own session.
WORST_RANK = "trap '' TERM; setsid sleep 1000 & sleep 1000 & echo up; wait"
HEARTBEAT, GRACE, HANG = 2.0, 1.0, 30.0  # a never-ready job ends at --ready-timeout 10, well within HANG
FAULTS = (
    "head SIGINT", "head SIGTERM", "head SIGKILL", "head SIGSTOP 3s",
    "agent SIGKILL", "agent SIGSTOP", "rank SIGKILL", "rank SIGSTOP",
    "side channel garbage", "side channel flood",
)  # fmt: skip
# Faults that end the job by themselves; after the others the job is stopped with SIGINT. (A head paused
# before its agents start pauses the job, and nothing ends it.)
ENDS_JOB = {"head SIGINT", "head SIGTERM", "head SIGKILL", "agent SIGKILL", "agent SIGSTOP", "rank SIGKILL"}
FLOOD = """
import sys, zmq
s = zmq.Context().socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0); s.connect(sys.argv[1])
s.send_multipart([b''] + [b''] * 1_000_000)
s.send_multipart([b''] + [b'x' * 4000] * 10_000)
"""


def free_port_base(count: int = 4) -> int:
    while True:
        base = random.randint(20000, 40000)
        if all(_free(base + i) for i in range(count)):
            return base


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def fold(line: str) -> str:
    """A first line with its numbers and ids folded, so that lines of one kind count together."""
    line = re.sub(r"\b[0-9a-f]{16}\b", "<job>", line)
    line = re.sub(r"\d+(\.\d+)?", "N", line)
    return line[:110]


class Cycle:
    """One launch, one fault, its outcome."""

    def __init__(self, fault: str, moment: float, where: str, cluster, workdir: str):
        self.fault, self.moment, self.where, self.cluster, self.workdir = fault, moment, where, cluster, workdir
        self.stderr: list[str] = []
        self.ready = threading.Event()
        self.port = free_port_base()

    def argv(self) -> list[str]:
        builtin = self.fault.startswith("side channel")
        common = ["--port-base", str(self.port), "--heartbeat-timeout", str(HEARTBEAT), "--grace", str(GRACE), "--ready-timeout", "10"]
        if self.where == "netns":
            hostfile = os.path.join(self.workdir, "hostfile")
            with open(hostfile, "w") as f:
                f.write(self.cluster.hostfile(slots=1))
            common = ["-H", hostfile, *self.cluster.ssh_args(), *common]
        else:
            hostfile = os.path.join(self.workdir, "hostfile")
            with open(hostfile, "w") as f:
                f.write("localhost slots=2\n")
            common = ["-H", hostfile, *common]
        rank = [] if builtin else ["--ready-log", "^up$", "--", "sh", "-c", WORST_RANK]
        return [sys.executable, "-m", "launcher.cli", "run", *common, *rank]

    def run(self) -> dict:
        head = subprocess.Popen(
            self.argv(), cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ}
        )
        threading.Thread(target=self._read, args=(head,), daemon=True).start()
        if self.moment < 0:  # after start-up
            self.ready.wait(30)
        else:
            time.sleep(self.moment)
        fault_at = time.monotonic()
        self.inject(head)
        if self.fault not in ENDS_JOB and head.poll() is None:
            time.sleep(1.0)
            _signal(head.pid, signal.SIGINT)
        hung = False
        try:
            head.wait(HANG)
        except subprocess.TimeoutExpired:
            hung = True
            _signal(head.pid, signal.SIGCONT)
            head.kill()
            head.wait()
        exited_after = time.monotonic() - fault_at
        leaked = self.leftovers(settle=5.0)
        return {
            "fault": self.fault,
            "code": head.returncode,
            "line": self.first_line(),
            "hung": hung,
            "leaked": leaked,
            "seconds": exited_after,
            "before_ready": not self.ready.is_set(),
            "moment": self.moment,
            "tail": self.stderr[-6:],
        }

    def _read(self, head: subprocess.Popen) -> None:
        for line in head.stderr:
            self.stderr.append(line.rstrip("\n"))
            if "ranks ready 2/2" in line:
                self.ready.set()

    def first_line(self) -> str:
        for line in self.stderr:
            if line.startswith(("launcher: FAILED", "launcher: stopped", "launcher: error")) or "stopped by" in line:
                return fold(line)
        return "(nothing: the head was killed)"

    # --- faults -----------------------------------------------------------------------

    def inject(self, head: subprocess.Popen) -> None:
        what, _, how = self.fault.partition(" ")
        if what == "head":
            name = how.split()[0]
            _signal(head.pid, getattr(signal, name))
            if name == "SIGSTOP":
                time.sleep(3.0)
                _signal(head.pid, signal.SIGCONT)
        elif what in ("agent", "rank"):
            # A fault lands on its target once it exists: at 0.1 s after the start there may be no agent yet.
            find = self.agents if what == "agent" else self.ranks
            targets = _first(lambda: find(head), until=lambda: head.poll() is not None)
            if targets:
                _signal(random.choice(targets), getattr(signal, how))
        elif self.fault == "side channel garbage":
            self.garbage()
        elif self.fault == "side channel flood":
            address = self.cluster.hosts[0].address if self.where == "netns" else "127.0.0.1"
            subprocess.Popen([sys.executable, "-c", FLOOD, f"tcp://{address}:{self.port}"], stderr=subprocess.DEVNULL)

    def garbage(self) -> None:
        address = self.cluster.hosts[0].address if self.where == "netns" else "127.0.0.1"
        for _ in range(20):
            try:
                with socket.create_connection((address, self.port), timeout=0.5) as s:
                    s.sendall(os.urandom(random.randint(1, 4000)))
            except OSError:
                pass

    def agents(self, head: subprocess.Popen) -> list[int]:
        if self.where == "netns":
            return [p.pid for p in _all() if _netns_of(p.pid) and "launcher.agent" in " ".join(_cmdline(p))][:1]
        try:
            return [p.pid for p in psutil.Process(head.pid).children() if "launcher.agent" in " ".join(_cmdline(p))]
        except psutil.Error:
            return []

    def ranks(self, head: subprocess.Popen) -> list[int]:
        agents = self.agents(head)
        found = []
        for pid in agents:
            try:
                found += [c.pid for c in psutil.Process(pid).children()]
            except psutil.Error:
                pass
        return found

    # --- what is left -------------------------------------------------------------------

    def leftovers(self, settle: float) -> int:
        deadline = time.monotonic() + settle
        while True:
            left = self._mine()
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for pid in left:
            _signal(pid, signal.SIGCONT)
            _signal(pid, signal.SIGKILL)
        return len(left)

    def _mine(self) -> list[int]:
        if self.where == "netns":
            return [pid for pids in self.cluster.stray_pids().values() for pid in pids]
        found = []
        for p in _all():
            try:
                if p.pid != os.getpid() and p.cwd() == self.workdir and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p.pid)
            except psutil.Error:
                continue
        return found


def _first(found, until, timeout: float = 10.0) -> list[int]:
    """What ``found()`` returns once it is not empty (polled), or [] when ``until()`` or the timeout comes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until():
        if pids := found():
            return pids
        time.sleep(0.01)
    return []


def _all():
    return psutil.process_iter()


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _netns_of(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    except OSError:
        return False


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=45.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--where", choices=["loopback", "netns"], default="loopback")
    args = ap.parse_args()
    random.seed(args.seed)

    cluster = None
    if args.where == "netns":
        import cluster_cli  # noqa: F401  (puts tests/support on the path)

        from support.netns import NetnsCluster

        cluster = NetnsCluster(2, workdir=tempfile.mkdtemp(prefix="chaos-netns-")).up()
    outcomes: list[dict] = []
    stop = time.monotonic() + args.minutes * 60
    try:
        for i in range(args.cycles):
            if time.monotonic() > stop:
                break
            fault = random.choice(FAULTS)
            moment = random.choice([-1.0, -1.0, random.uniform(0.0, 1.2)])  # two thirds after start-up, else during
            workdir = tempfile.mkdtemp(prefix="chaos-")
            try:
                outcomes.append(Cycle(fault, moment, args.where, cluster, workdir).run())
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            last = outcomes[-1]
            if last["hung"] or last["leaked"]:
                when = "after start-up" if moment < 0 else f"{moment:.2f}s after the start"
                print(f"cycle {i}: {fault} {when}: hung={last['hung']} leaked={last['leaked']}; its last lines:", file=sys.stderr)
                print("\n".join(f"    {line}" for line in last["tail"]), file=sys.stderr, flush=True)
            if (i + 1) % 50 == 0:
                print(f"{i + 1} cycles", file=sys.stderr, flush=True)
    finally:
        if cluster is not None:
            cluster.down()

    rows = [("fault", "cycles", "exit codes", "first line (most common)", "exit after fault s (median)", "hangs", "leaks")]
    for fault in FAULTS:
        mine = [o for o in outcomes if o["fault"] == fault]
        if not mine:
            continue
        codes = collections.Counter(o["code"] for o in mine)
        line = collections.Counter(o["line"] for o in mine).most_common(1)[0][0]
        rows.append(
            (
                fault,
                str(len(mine)),
                " ".join(f"{c}x{n}" for c, n in sorted(codes.items())),
                line,
                f"{statistics.median(o['seconds'] for o in mine):.2f}",
                str(sum(o["hung"] for o in mine)),
                str(sum(1 for o in mine if o["leaked"])),
            )
        )
    print(f"{len(outcomes)} cycles ({args.where}, seed {args.seed})")
    print(format_table(rows))
    return 1 if any(o["hung"] or o["leaked"] for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
