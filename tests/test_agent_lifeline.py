"""The agent holds the job on its host: real misbehaving ranks, real signals."""

import signal
import subprocess
import sys
import time

import pytest

from conftest import wait_for
from launcher import protocol
from launcher.rankenv import RankIdentity
from support.processes import dead

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]

# A rank that ignores SIGTERM and forks a grandchild that leaves its process
# group (setsid) and ignores SIGTERM too: only SIGKILL, aimed at it by pid, stops it.
STUBBORN = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)
    os._exit(0)
print(f"grandchild {pid}", flush=True)
time.sleep(600)
"""
SLEEPER = "import time; print('up', flush=True); time.sleep(600)"


def identity(rank: int, size: int) -> RankIdentity:
    return RankIdentity(
        job_id="t", rank=rank, local_rank=rank, local_size=size, world_size=size, host="localhost", host_index=0,
        engine_id=f"t-dp{rank}", port_base=0,
    )  # fmt: skip


def start_agent(scripts, grace=1.0, heartbeat_timeout=60.0):
    spec = protocol.AgentSpec(
        job_id="t",
        host="localhost",
        host_index=0,
        host_is_loopback=True,
        reached_address="127.0.0.1",
        ranks=[
            protocol.RankLaunch(identity=identity(i, len(scripts)), argv=["{python}", "-c", code], env={}, ports=[0])
            for i, code in enumerate(scripts)
        ],
        grace=grace,
        heartbeat_interval=0.2,
        heartbeat_timeout=heartbeat_timeout,
    )
    agent = subprocess.Popen([sys.executable, "-m", "launcher.agent"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    agent.stdin.write(protocol.encode(spec))
    agent.stdin.flush()
    return agent


def read_until(agent, want, count=1):
    seen = []
    while len([m for m in seen if want(m)]) < count:
        line = agent.stdout.readline()
        assert line, f"agent ended early; saw {seen}"
        seen.append(protocol.decode(line))
    return seen


def started_pids(events):
    return [m.pid for m in events if isinstance(m, protocol.Started)]


def gone(pids):
    return all(dead(p) for p in pids)


def grandchild_of(events):
    return next(int(m.line.split()[1]) for m in events if isinstance(m, protocol.Output) and m.line.startswith("grandchild"))


def test_stdin_eof_stops_ranks_that_ignore_sigterm_and_detached_grandchildren():
    agent = start_agent([STUBBORN, SLEEPER], grace=1.0)
    events = read_until(agent, lambda m: isinstance(m, protocol.Output), count=2)
    pids = started_pids(events) + [grandchild_of(events)]
    assert not gone(pids)
    start = time.monotonic()
    agent.stdin.close()  # what a lost SSH connection or a dead head looks like
    rest = agent.stdout.read().splitlines()
    assert agent.wait(10) == 0
    assert wait_for(lambda: gone(pids), 3.0)
    assert time.monotonic() - start < 1.0 + 2.0  # within the grace period plus 2 s
    exits = {m.rank: m.returncode for m in map(protocol.decode, rest) if isinstance(m, protocol.Exited)}
    assert exits == {0: -signal.SIGKILL, 1: -signal.SIGTERM}  # the stubborn one needed SIGKILL


def test_ranks_die_with_a_sigkilled_agent():
    agent = start_agent([SLEEPER, SLEEPER])
    pids = started_pids(read_until(agent, lambda m: isinstance(m, protocol.Output), count=2))
    agent.kill()
    agent.wait()
    assert wait_for(lambda: gone(pids), 3.0), "ranks outlived their agent (PR_SET_PDEATHSIG)"


def test_a_silent_head_is_noticed_by_heartbeat_timeout():
    agent = start_agent([SLEEPER], heartbeat_timeout=1.0)  # stdin stays open but says nothing
    pids = started_pids(read_until(agent, lambda m: isinstance(m, protocol.Output)))
    assert agent.wait(10) == 0
    assert wait_for(lambda: gone(pids), 3.0)
    agent.stdin.close()


def test_a_ranks_exit_is_reported_after_its_last_output_and_at_once():
    """The head quotes a failed rank's last lines: they must reach it before the exit does, and the exit
    must not wait for a clock (the agent sleeps on the ranks' pidfds)."""
    loud = "import sys\nfor i in range(2000): print(f'line {i}')\nprint('last words', file=sys.stderr)\nsys.exit(3)"
    agent = start_agent([loud, SLEEPER], heartbeat_timeout=60.0)
    events = read_until(agent, lambda m: isinstance(m, protocol.Exited))
    exited = next(m for m in events if isinstance(m, protocol.Exited))
    assert (exited.rank, exited.returncode) == (0, 3)
    lines = [m.line for m in events if isinstance(m, protocol.Output) and m.rank == 0]
    assert lines[:2] == ["line 0", "line 1"] and len(lines) == 2001 and "last words" in lines
    agent.stdin.close()
    assert agent.wait(10) == 0
