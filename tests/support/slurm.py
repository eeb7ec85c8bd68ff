"""A real Slurm cluster on this machine: slurmctld on the head, one slurmd per namespace host.

The library behind the tests and ``scripts/slurm_cluster.py`` (``up 3`` / ``down``).
Builds on ``support.netns``: node hN is namespace host hN (198.18.0.1N), so
each node has its own address, as on real machines. Debian's Slurm 22.05
(``slurmctld``, ``slurmd``, ``slurm-client``) with ``auth/none`` (no munged
needed), ``proctrack/pgid`` and ``task/none``; every file lives in the work
directory. slurmd runs under ``nsenter --net`` (``ip netns exec`` makes it
fail at start-up) in a private mount namespace whose ``/etc/hosts`` names the
nodes, so the machine's own ``/etc/hosts`` is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time

from tests.support.netns import NET, PREFIX, SUBNET, NetnsCluster, _sh

CTLD_PORT, SLURMD_PORT = 16817 + 2 * SUBNET, 16818 + 2 * SUBNET  # slurmctld listens on every address: one pair per prefix
STATE_DIR = os.path.join("/tmp", f"{PREFIX}-slurm-cluster")
TOOLS = ("slurmctld", "slurmd", "srun", "sbatch", "scontrol", "scancel", "squeue", "nsenter")


class SlurmCluster:
    """Netns hosts plus Slurm daemons; ``env`` is what a Slurm client needs (SLURM_CONF)."""

    def __init__(self, count: int = 3, workdir: str = STATE_DIR, cpus: int = 4, hosts: NetnsCluster | None = None):
        """Build on ``hosts`` (a running NetnsCluster, left running at ``down``), or on hosts of its own."""
        self.workdir, self.cpus = workdir, cpus
        self.own_hosts = hosts is None
        self.hosts = hosts or NetnsCluster(count, workdir=os.path.join(workdir, "netns"))
        self.conf = os.path.join(workdir, "slurm.conf")
        self.env = {"SLURM_CONF": self.conf}
        self.daemons: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> SlurmCluster:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    @property
    def nodes(self) -> list[str]:
        return [h.name for h in self.hosts.hosts]

    # --- up ------------------------------------------------------------------

    def up(self) -> SlurmCluster:
        missing = missing_tools()
        if missing:
            raise RuntimeError(f"cannot build the Slurm cluster: missing {', '.join(missing)}")
        sweep()
        shutil.rmtree(self.workdir, ignore_errors=True)
        os.makedirs(os.path.join(self.workdir, "state"))
        try:
            if self.own_hosts:
                self.hosts.up()
            self._write_config()
            self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
            for host in self.hosts.hosts:
                self._start_slurmd(host)
            self.wait_idle()
        except BaseException:
            self.down()
            raise
        return self

    def _write_config(self) -> None:
        controller = socket.gethostname().split(".")[0]  # slurmctld insists on being the named controller
        d = self.workdir
        nodes = "".join(
            f"NodeName={h.name} NodeHostname={h.name} NodeAddr={h.address} CPUs={self.cpus} RealMemory=1000 State=UNKNOWN\n"
            for h in self.hosts.hosts
        )
        with open(self.conf, "w") as f:
            f.write(
                f"ClusterName={PREFIX}\nSlurmctldHost={controller}({NET}.1)\n"
                f"SlurmctldPort={CTLD_PORT}\nSlurmdPort={SLURMD_PORT}\n"
                "AuthType=auth/none\nCredType=cred/none\nSlurmUser=root\nSlurmdUser=root\n"
                f"StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool-%n\n"
                f"SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd-%n.pid\n"
                f"SlurmctldLogFile={d}/slurmctld.log\nSlurmdLogFile={d}/slurmd-%n.log\n"
                "ProctrackType=proctrack/pgid\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n"
                "AccountingStorageType=accounting_storage/none\nSwitchType=switch/none\nMpiDefault=none\n"
                "SelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\nSlurmdParameters=config_overrides\n"
                "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0\nMailProg=/bin/true\n"
                "ReturnToService=2\nKillWait=5\nMinJobAge=300\nInactiveLimit=0\nSlurmctldDebug=info\nSlurmdDebug=info\n"
                + nodes
                + f"PartitionName={PREFIX} Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
            )
        with open(os.path.join(d, "hosts"), "w") as f:
            f.write("127.0.0.1 localhost\n" + f"{NET}.1 {controller}\n" + "".join(f"{h.address} {h.name}\n" for h in self.hosts.hosts))

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(os.path.join(self.workdir, f"{name}.out"), "wb")
        self.daemons[name] = proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **self.env},
        )
        self.hosts.daemon_pids.add(proc.pid)  # nsenter, unshare and sh all exec: this pid becomes slurmd

    def _start_slurmd(self, host) -> None:
        script = 'mount --bind "$1" /etc/hosts && hostname "$2" && exec slurmd -D -N "$2" -f "$3"'
        self._start(
            f"slurmd-{host.name}",
            [
                "nsenter",
                f"--net=/run/netns/{host.netns}",
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
                os.path.join(self.workdir, "hosts"),
                host.name,
                self.conf,
            ],
        )

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until every node is IDLE (a finished job's nodes pass through COMPLETING first)."""
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited at start-up: {self._tail(name)}")
            out = self.scontrol("show", "nodes", "-o", check=False).stdout
            states = re.findall(r"NodeName=(\S+) .*?State=(\S+)", out)
            if len(states) == len(self.nodes) and all(s.startswith("IDLE") for _, s in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm nodes not idle after {timeout:g}s: {states}; slurmctld: {self._tail('slurmctld')}")
            time.sleep(0.2)

    def _tail(self, name: str) -> str:
        try:
            with open(os.path.join(self.workdir, f"{name}.out")) as f:
                return " | ".join(f.read().strip().splitlines()[-3:]) or "no output"
        except OSError:
            return "no output"

    # --- use -----------------------------------------------------------------

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _sh("scontrol", *args, check=check, env={**os.environ, **self.env})

    # --- down ----------------------------------------------------------------

    def down(self) -> None:
        # SIGTERM first: slurmctld then reaps its own slurmscriptd, which SIGKILL
        # would leave a zombie under an init that may never reap it.
        for proc in self.daemons.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.daemons.values():
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.hosts.daemon_pids.discard(proc.pid)
        self.daemons.clear()
        sweep()
        if self.own_hosts:
            self.hosts.down()
        shutil.rmtree(self.workdir, ignore_errors=True)


def sweep() -> list[int]:
    """Kill Slurm daemons and job steps a crashed run of ours left (found by our config path)."""
    killed = []
    marker = f"{PREFIX}-slurm".encode()
    mine = {os.getpid(), os.getppid()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read()
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if marker in argv or (b"SLURM_CONF=" in environ and marker in environ):
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except ProcessLookupError:
                pass
    return killed


def missing_tools() -> list[str]:
    """What this machine lacks to run the Slurm cluster (empty when it can)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        missing = [f"{', '.join(missing)} (apt-get install slurmctld slurmd slurm-client)"]
    return missing
