"""Backends: the registry, each backend's allocation reading, and one contract every backend keeps.

The contract runs over every registered backend on real hosts: a local
process, an sshd in a namespace, a Slurm step on a namespace node.
"""

import os
import re
import subprocess
import sys

import psutil
import pytest

from conftest import this_run, wait_for
from launcher import protocol, transports
from launcher.cli import build_parser
from launcher.plan import Host
from launcher.readiness import Report
from launcher.transports import AllocationError, Transport
from launcher.transports.slurm import allocation_hosts


def test_the_cli_offers_every_registered_backend_and_its_options():
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    transport = next(a for a in run._actions if a.dest == "transport")
    assert transport.metavar == "{auto,local,slurm,ssh,join}" and transports.names() == ["local", "slurm", "ssh", "join"]
    dests = {a.dest for a in run._actions}
    assert {"ssh_config", "known_hosts", "srun_arg", "join_listen"} <= dests  # each backend adds its own
    for name in transports.names():
        assert issubclass(transports.backend(name), Transport) and transports.backend(name).name == name


def test_a_loopback_job_never_imports_paramiko():
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from launcher.cli import build_parser; build_parser(); "
            "from launcher import transports; transports.get('local'); print('paramiko' in sys.modules)",
        ],
        capture_output=True,
        text=True,
    )
    assert done.stdout.strip() == "False", done.stderr


def test_auto_picks_the_first_backend_that_claims_every_host():
    allocation = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "1(x3)"}
    assert transports.choose([Host("localhost"), Host("127.0.0.2")], allocation) == "local"
    assert transports.choose([Host("n1"), Host("n3")], allocation) == "slurm"
    assert transports.choose([Host("n1"), Host("other")], allocation) == "ssh"  # never join: someone must start its agents
    # A loopback host that names an SSH user or port asks for SSH, even to this machine.
    assert transports.choose([Host("localhost", user="alice")], {}) == transports.choose([Host("127.0.0.1", port=2222)], {}) == "ssh"
    with pytest.raises(transports.TransportError, match="user@ and port= need SSH"):
        transports.get("local").start(Host("localhost", user="alice"))
    assert transports.allocation_hosts(allocation, None)[2].name == "n3"
    assert transports.allocation_hosts({}, None) is None


def test_an_allocation_keeps_slurms_node_order_and_tasks_per_node():
    env = {"SLURM_JOB_NODELIST": "gpu[10-11,02],cpu1", "SLURM_TASKS_PER_NODE": "2(x3),1"}
    hosts = allocation_hosts(env)
    assert [(h.name, h.slots) for h in hosts] == [("gpu10", 2), ("gpu11", 2), ("gpu02", 2), ("cpu1", 1)]
    assert hosts[2].origin == "SLURM_JOB_NODELIST[2]"  # index == SLURM_NODEID
    assert [h.slots for h in allocation_hosts(env, slots=8)] == [8] * 4
    assert [h.slots for h in allocation_hosts({"SLURM_NODELIST": "n[1-2]"})] == [1, 1]


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "not inside a Slurm allocation (SLURM_JOB_NODELIST is not set)"),
        ({"SLURM_JOB_NODELIST": "n[1-"}, "SLURM_JOB_NODELIST='n[1-' is not a Slurm hostlist"),
        ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "2(x"}, "SLURM_TASKS_PER_NODE='2(x' is not Slurm's format"),
        ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "2(x3)"}, "gives 3 nodes but SLURM_JOB_NODELIST lists 2; pass --slots N"),
    ],
)
def test_a_bad_allocation_is_a_one_line_error_naming_the_variable(env, message):
    with pytest.raises(AllocationError) as err:
        allocation_hosts(env)
    assert message in str(err.value) and "\n" not in str(err.value)


# --- the contract, on real hosts ---------------------------------------------------------


# Backends that start agents themselves; join's agents are started by someone else (tests/test_join.py).
STARTING = [n for n in transports.names() if transports.backend(n).capabilities.sweeps]


@pytest.fixture(params=[pytest.param(n, marks=() if n == "local" else pytest.mark.netns) for n in STARTING])
def agent_host(request, tmp_path):
    """(transport, host, processes-on-that-host) for each backend that starts its agents."""
    name = request.param
    if name == "local":
        yield transports.get("local"), Host("localhost"), _local_agents
        return
    cluster = request.getfixturevalue("cluster")
    h2 = cluster.host("h2")
    if name == "ssh":
        yield transports.get("ssh", config_path=cluster.ssh_config, known_hosts=cluster.known_hosts), Host("h2"), h2.pids
        return
    slurm = request.getfixturevalue("slurm")
    slurm.wait_idle()
    env = {**os.environ, **slurm.env}
    granted = subprocess.run(
        ["salloc", "--no-shell", "-N1", "-w", "h2", "--job-name=contract"], capture_output=True, text=True, env=env, timeout=30
    )
    job = re.search(r"Granted job allocation (\d+)", granted.stderr)
    assert job, granted.stderr
    env.update(SLURM_JOB_ID=job.group(1), SLURM_JOB_NODELIST="h2")
    try:
        yield transports.get("slurm", env=env), Host("h2"), h2.pids
    finally:
        subprocess.run(["scancel", job.group(1)], env=env, check=False)


def _local_agents():
    """This run's agents on this machine (another run's are not ours to count)."""
    ours = this_run()
    return [p.pid for p in psutil.process_iter() if _is_agent(p) and ours(p)]


def _is_agent(p):
    try:
        return "launcher.agent" in " ".join(p.cmdline())
    except psutil.Error:
        return False


def spec(job_id):
    return protocol.encode(
        protocol.AgentSpec(
            job_id=job_id,
            host="h",
            host_index=0,
            host_is_loopback=False,
            ranks=[],
            grace=1.0,
            heartbeat_interval=1.0,
            heartbeat_timeout=30.0,
            readiness=Report(),
        )
    )


def agents_on(processes):
    found = []
    for pid in processes():
        try:
            p = psutil.Process(pid)
            if _is_agent(p):
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_every_backend_starts_an_agent_that_reads_its_spec_on_stdin_and_ends_at_eof(agent_host):
    transport, host, processes = agent_host
    before = {p.pid for p in agents_on(processes)}
    conn = transport.start(host)
    try:
        conn.send(spec("contract-secret-7f3a"))
        hello = protocol.decode(conn.readline())
        assert isinstance(hello, protocol.Hello) and hello.pid > 0
        # The spec went on stdin: no process on the host shows it in its argv.
        mine = [p for p in agents_on(processes) if p.pid not in before]
        assert mine and all("contract-secret-7f3a" not in " ".join(p.cmdline()) for p in mine)
        conn.close_stdin()  # EOF: the agent stops what it runs and exits 0
        assert conn.wait(15) == 0
        assert wait_for(lambda: not [p for p in agents_on(processes) if p.pid not in before], timeout=10)
    finally:
        conn.terminate()
        transport.close()


def test_every_backend_reports_an_agents_exit_status_and_can_terminate_one(agent_host):
    transport, host, processes = agent_host
    before = {p.pid for p in agents_on(processes)}
    bad = transport.start(host)
    bad.send(b"not a spec\n")  # the agent refuses it and exits 2
    assert bad.wait(15) == 2
    assert any("not a launcher message" in line for line in bad.stderr_tail(wait=2))
    stuck = transport.start(host)
    stuck.send(spec("contract-terminate"))
    assert isinstance(protocol.decode(stuck.readline()), protocol.Hello)
    stuck.terminate()  # without the agent's cooperation
    assert wait_for(lambda: not [p for p in agents_on(processes) if p.pid not in before], timeout=15)
    transport.close()
