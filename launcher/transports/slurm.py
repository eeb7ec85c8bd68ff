"""Agents through ``srun``, inside a Slurm allocation (sbatch or salloc).

One job step per node: ``srun --nodes=1 --ntasks=1 --nodelist=NODE --overlap
python -m launcher.agent``, its stdin and stdout being the agent's, exactly as
an SSH channel is. One step per node rather than one step for all keeps one
agent per connection (no demultiplexing of a shared stdout, a lost node is
that node's failure), and each step is visible in ``squeue -s`` as
``launcher-agent``. ``--overlap`` lets the steps share CPUs with the batch
step and with each other; the ranks themselves are the agent's children.

Slurm's own guarantees and where they stop: ``scancel`` signals every step
(SIGTERM, then SIGKILL after KillWait) and the agent stops its ranks on
SIGTERM; ranks run in their own session, so proctrack/pgid would miss them,
which is why they also die with the agent (PR_SET_PDEATHSIG). SIGTERM to
``srun`` SIGKILLs its task, so the head ends an agent by closing its stdin,
and signals srun only as a last resort. srun hides a task's exit code
(``--kill-on-bad-exit`` returns 143): the agent reports each rank's own code.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence

import hostlist

from .. import envpolicy, netif
from ..host import Host
from .base import AgentConnection, AllocationError, Capabilities, Transport, TransportError
from .local import ProcessConnection

NODELIST_VARS = ("SLURM_JOB_NODELIST", "SLURM_NODELIST")


def in_allocation(env: Mapping[str, str]) -> bool:
    return any(env.get(name) for name in NODELIST_VARS)


def allocation_hosts(env: Mapping[str, str], slots: int | None = None) -> list[Host]:
    """The allocation's nodes, in Slurm's order, with its tasks per node as slots.

    ``SLURM_JOB_NODELIST`` (``node[01-04,07]``) is expanded with python-hostlist,
    which keeps Slurm's order, so host index N is SLURM_NODEID N. Slots come
    from ``SLURM_TASKS_PER_NODE`` (``2(x3),1``) unless ``slots`` is given.
    """
    var = next((name for name in NODELIST_VARS if env.get(name)), None)
    if var is None:
        raise AllocationError(
            "not inside a Slurm allocation (SLURM_JOB_NODELIST is not set); run under sbatch or salloc, or pass --hostfile"
        )
    try:
        nodes = hostlist.expand_hostlist(env[var])
    except hostlist.BadHostlist as exc:
        raise AllocationError(f"{var}={env[var]!r} is not a Slurm hostlist ({exc})") from None
    if slots is not None:
        counts = [slots] * len(nodes)
    else:
        raw = env.get("SLURM_TASKS_PER_NODE", "")
        try:
            counts = hostlist.parse_slurm_tasks_per_node(raw) if raw else [1] * len(nodes)
        except (ValueError, hostlist.BadHostlist):
            raise AllocationError(f"SLURM_TASKS_PER_NODE={raw!r} is not Slurm's format (such as '2(x3),1'); pass --slots N") from None
        if len(counts) != len(nodes):
            raise AllocationError(f"SLURM_TASKS_PER_NODE={raw!r} gives {len(counts)} nodes but {var} lists {len(nodes)}; pass --slots N")
    return [Host(name=node, slots=count, origin=f"{var}[{i}]") for i, (node, count) in enumerate(zip(nodes, counts, strict=True))]


class SrunConnection(ProcessConnection):
    """An agent behind srun; slurmstepd says on its stderr when Slurm cancelled the step."""

    def stop_reason(self) -> str | None:
        for line in self.stderr_tail(wait=0):
            found = re.search(r"\*\*\* (.* CANCELLED AT .*?) \*\*\*", line)  # slurmstepd: error: *** STEP 12.3 ON n2 CANCELLED AT ... ***
            if found:
                return f"Slurm cancelled its step ({found.group(1)})"
        return None


class SlurmTransport(Transport):
    name = "slurm"
    capabilities = Capabilities(terminate_kills_agent=False)  # srun killed, Slurm ends the whole step: every process in its cgroup

    @classmethod
    def claims(cls, hosts: Sequence[Host], env: Mapping[str, str]) -> bool:
        """Inside an allocation (SLURM_JOB_ID) that holds every host."""
        if not (in_allocation(env) and env.get("SLURM_JOB_ID")):
            return False
        try:
            nodes = {h.name for h in allocation_hosts(env, slots=1)}
        except AllocationError:
            return False
        return all(h.name in nodes for h in hosts)

    @classmethod
    def allocation_hosts(cls, env: Mapping[str, str], slots: int | None) -> list[Host] | None:
        return allocation_hosts(env, slots) if in_allocation(env) else None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("slurm")
        group.add_argument(
            "--srun-arg",
            action="append",
            default=[],
            metavar="ARG",
            help="extra srun option for the agents' steps, e.g. --srun-arg=--gpus-per-node=8 (repeatable)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str]) -> SlurmTransport:
        return cls(env=env, extra_args=tuple(args.srun_arg))

    def __init__(self, env=None, srun: str = "srun", extra_args: tuple[str, ...] = ()):
        self.env = dict(os.environ if env is None else env)
        if not self.env.get("SLURM_JOB_ID"):
            raise TransportError("the slurm transport runs inside an allocation (sbatch or salloc): SLURM_JOB_ID is not set")
        self.srun = shutil.which(srun, path=self.env.get("PATH"))
        if self.srun is None:
            raise TransportError(f"{srun!r} is not on PATH; load Slurm's client tools (module load slurm?) or use --transport ssh")
        self.extra_args = tuple(extra_args)
        self._addresses: dict[str, str] | None = None
        self._lock = threading.Lock()  # agents start in parallel: ask scontrol once

    def command(self, host: Host) -> list[str]:
        """The srun command line that starts ``host``'s agent (no job data in it: that goes on stdin)."""
        python = host.python or sys.executable
        return [
            self.srun,
            "--nodes=1",
            "--ntasks=1",
            f"--nodelist={host.name}",
            "--overlap",
            "--kill-on-bad-exit=1",
            "--job-name=launcher-agent",
            "--quiet",
            *([f"--chdir={host.cwd}"] if host.cwd else []),
            self.export(),
            *self.extra_args,
            python,
            "-m",
            "launcher.agent",
        ]

    def export(self) -> str:
        """What the step gets of the head's environment: a login's worth (PATH, HOME, LANG, ...), as sshd gives.

        Slurm's default, --export=ALL, would hand a rank the whole head
        environment, past the allowlist; with names, Slurm exports those plus
        its own SLURM_* values, and the CUDA_VISIBLE_DEVICES it sets for a step
        holding GPUs (``--srun-arg=--gpus-per-node=8``) is still the node's own.
        """
        names = sorted(envpolicy.login_environment(self.env))
        return f"--export={','.join(names)}" if names else "--export=NONE"

    def srun_environment(self) -> dict[str, str]:
        """srun's own environment (SLURM_CONF, the job's SLURM_* ...), without the head's worker-specific values
        (``--export=NAME=`` does not unset a name inside a batch job)."""
        return envpolicy.without_worker_specific(self.env)

    def start(self, host: Host) -> AgentConnection:
        try:
            popen = subprocess.Popen(
                self.command(host),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.srun_environment(),
                start_new_session=True,
            )
        except OSError as exc:
            raise TransportError(f"{host.label}: cannot run srun: {exc.strerror or exc}") from None
        return SrunConnection(host, popen)

    def reached_address(self, host: Host) -> str | None:
        """The node's NodeAddr in Slurm's config (resolved), which its ranks then verify is local."""
        with self._lock:
            if self._addresses is None:
                self._addresses = self._node_addresses()
        return self._addresses.get(host.name)

    def _node_addresses(self) -> dict[str, str]:
        try:
            out = subprocess.run(
                ["scontrol", "show", "nodes", "--oneliner"],
                capture_output=True,
                text=True,
                env=self.env,
                timeout=10,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return {}
        found = {}
        for name, addr in re.findall(r"NodeName=(\S+).*?\bNodeAddr=(\S+)", out):
            found[name] = netif.resolve(addr)
        return {k: v for k, v in found.items() if v}
