"""A cluster of SSH hosts on this machine: one network namespace per host.

The library the tests, the benchmarks and ``scripts/netns_cluster.py`` (its
command line: ``up 4`` / ``down``) build hosts with.

Host hN is namespace ``lnch-hN`` with ``eth0`` = 198.18.0.(10+N)/24 on a bridge
whose head side is 198.18.0.1. Host h1 also has ``eth1`` = 198.19.0.11/24 on a
second bridge (head side 198.19.0.1), so interface selection is tested for
real. Another ``LAUNCHER_NETNS_PREFIX`` (up to 8 letters and digits) gets
namespaces, links and /24s of its own (198.18.S.0 and 198.19.S.0, S derived
from the prefix, or ``LAUNCHER_NETNS_SUBNET``), so two clusters, and two test
runs, can live on one machine at once. Without one, a run takes the first of
lnch, lnch1 ... lnch9 that no live run holds (a lock in /tmp), and ``up``
refuses hosts whose prefix another live process holds. Each host runs its own OpenSSH sshd (own ed25519 host key, own hostname
via ``unshare --uts``). Only 198.18.0.0/15 addresses are used, and no
namespace has a default route, so nothing leaves this machine.

``up`` first sweeps whatever an earlier crashed run left (namespaces, bridges,
their processes), so it always starts clean; ``down`` removes everything.

The kernel keeps one ARP table for all namespaces, 1024 entries by default:
N hosts that all talk to each other need about N^2, so from 32 hosts on
connections fail ("neighbor table overflow" in dmesg). ``up`` raises the
limits for its size and ``down`` (or the next sweep) restores them.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass


def _lock(prefix: str) -> int | None:
    """Hold the lock that says a live process owns the test hosts of ``prefix``; None while another holds it.

    An flock: the kernel lets it go with its holder, so a crashed run holds nothing."""
    fd = os.open(f"/tmp/launcher-netns-{prefix}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _holder(prefix: str) -> str:
    try:
        with open(f"/tmp/launcher-netns-{prefix}.lock") as f:
            return f"pid {f.read().strip() or '?'}"
    except OSError:
        return "another process"


_HELD: dict[str, int] = {}  # prefix -> the lock's fd, kept open for this process's life


def _choose_prefix() -> str:
    """LAUNCHER_NETNS_PREFIX, else the first of lnch, lnch1 ... lnch9 that no live run holds.

    Two runs of the README's test command at once then build hosts of their own instead of
    sweeping each other's; the choice is exported, so this run's child processes share it."""
    named = os.environ.get("LAUNCHER_NETNS_PREFIX")
    if named:
        return named
    for candidate in ("lnch", *(f"lnch{i}" for i in range(1, 10))):
        fd = _lock(candidate)
        if fd is not None:
            _HELD[candidate] = fd
            os.environ["LAUNCHER_NETNS_PREFIX"] = candidate
            return candidate
    raise SystemExit("ten test runs already hold the prefixes lnch..lnch9: wait for one, or set LAUNCHER_NETNS_PREFIX")


PREFIX = _choose_prefix()
if not (PREFIX.isascii() and PREFIX.isalnum() and len(PREFIX) <= 8):  # link names have 15 bytes: 'PREFIX-v200'
    raise SystemExit(f"LAUNCHER_NETNS_PREFIX={PREFIX!r}: use up to 8 ASCII letters and digits")
SUBNET = int(os.environ.get("LAUNCHER_NETNS_SUBNET", 0 if PREFIX == "lnch" else zlib.crc32(PREFIX.encode()) % 254 + 1))
if not 0 <= SUBNET <= 255:
    raise SystemExit(f"LAUNCHER_NETNS_SUBNET={SUBNET}: use 0..255")
NET = f"198.18.{SUBNET}"
NET2 = f"198.19.{SUBNET}"
MAX_HOSTS = 200  # NET.11 up to NET.210 on one /24 bridge
STATE_DIR = os.path.join(tempfile.gettempdir(), f"{PREFIX}-netns-cluster")
NEIGH = "/proc/sys/net/ipv4/neigh/default/gc_thresh{}"
NEIGH_SAVED = os.path.join(tempfile.gettempdir(), f"{PREFIX}-neigh-thresholds")  # the values before up raised them


@dataclass(frozen=True)
class NetnsHost:
    index: int
    netns: str
    name: str
    address: str
    address2: str | None  # on the second network, for the two-interface host

    def run(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return _sh("ip", "netns", "exec", self.netns, *argv, **kw)

    def pids(self) -> list[int]:
        out = _sh("ip", "netns", "pids", self.netns, check=False).stdout
        return [int(p) for p in out.split()]


class NetnsCluster:
    """Build with ``up()``, remove with ``down()``; also a context manager."""

    def __init__(self, count: int = 3, workdir: str = STATE_DIR, python: str = sys.executable):
        if not 1 <= count <= MAX_HOSTS:
            raise ValueError(f"host count must be 1..{MAX_HOSTS}, got {count}")
        self.count, self.workdir, self.python = count, workdir, python
        self.hosts = [
            NetnsHost(i, f"{PREFIX}-h{i}", f"h{i}", f"{NET}.{10 + i}", f"{NET2}.{10 + i}" if i == 1 else None) for i in range(1, count + 1)
        ]
        self.bridge, self.bridge2 = f"{PREFIX}-br0", f"{PREFIX}-br1"
        self.client_key = os.path.join(workdir, "id_ed25519")
        self.known_hosts = os.path.join(workdir, "known_hosts")
        self.ssh_config = os.path.join(workdir, "ssh_config")
        self.sshd: dict[str, subprocess.Popen] = {}
        self.daemon_pids: set[int] = set()  # other daemons living on the hosts (slurmd), not strays

    def __enter__(self) -> NetnsCluster:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # --- up ------------------------------------------------------------------

    def up(self) -> NetnsCluster:
        _require_tools()
        if PREFIX not in _HELD:
            fd = _lock(PREFIX)
            if fd is None:  # sweeping now would pull another live run's hosts from under it
                raise RuntimeError(
                    f"the test hosts {PREFIX}-h* belong to a run that is still going ({_holder(PREFIX)}): wait for it, or give "
                    f"this run hosts of its own with LAUNCHER_NETNS_PREFIX=<up to 8 letters and digits>"
                )
            _HELD[PREFIX] = fd
        sweep()
        shutil.rmtree(self.workdir, ignore_errors=True)
        os.makedirs(self.workdir, mode=0o700)
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
        try:
            _make_neighbour_room(len(self.hosts))
            self._network()
            _keygen(self.client_key)
            self._write_client_files()
            for host in self.hosts:
                self._start_sshd(host)
            self._wait_for_sshd()
        except BaseException:
            self.down()
            raise
        return self

    def _network(self) -> None:
        for bridge, net in ((self.bridge, NET), (self.bridge2, NET2)):
            _sh("ip", "link", "add", bridge, "type", "bridge")
            _sh("ip", "addr", "add", f"{net}.1/24", "dev", bridge)
            _sh("ip", "link", "set", bridge, "up")
        for host in self.hosts:
            _sh("ip", "netns", "add", host.netns)
            _sh("ip", "-n", host.netns, "link", "set", "lo", "up")
            self._veth(host, f"{PREFIX}-v{host.index}", "eth0", self.bridge, host.address)
            if host.address2:
                self._veth(host, f"{PREFIX}-w{host.index}", "eth1", self.bridge2, host.address2)

    def _veth(self, host: NetnsHost, outside: str, inside: str, bridge: str, address: str) -> None:
        _sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside, "netns", host.netns)
        _sh("ip", "link", "set", outside, "master", bridge, "up")
        _sh("ip", "-n", host.netns, "addr", "add", f"{address}/24", "dev", inside)
        _sh("ip", "-n", host.netns, "link", "set", inside, "up")

    def _write_client_files(self) -> None:
        with open(self.ssh_config, "w") as f:
            for host in self.hosts:
                f.write(
                    f"Host {host.name}\n  HostName {host.address}\n  User root\n  IdentityFile {self.client_key}\n"
                    f"  UserKnownHostsFile {self.known_hosts}\n\n"
                )
        open(self.known_hosts, "w").close()
        os.chmod(self.known_hosts, 0o600)

    def _start_sshd(self, host: NetnsHost) -> None:
        hostdir = os.path.join(self.workdir, host.name)
        os.makedirs(hostdir)
        host_key = os.path.join(hostdir, "ssh_host_ed25519_key")
        _keygen(host_key)
        with open(host_key + ".pub") as f:
            kind, blob = f.read().split()[:2]
        with open(self.known_hosts, "a") as f:
            f.write(f"{host.address} {kind} {blob}\n")
        config = os.path.join(hostdir, "sshd_config")
        with open(config, "w") as f:
            f.write(
                f"ListenAddress {host.address}\nPort 22\nHostKey {host_key}\nPidFile {hostdir}/sshd.pid\n"
                f"AuthorizedKeysFile {self.client_key}.pub\nPermitRootLogin prohibit-password\n"
                "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "UsePAM no\nStrictModes no\nPrintMotd no\nUseDNS no\nMaxStartups 100:30:200\nMaxSessions 100\n"
                "LogLevel ERROR\n"
            )
        log = open(os.path.join(hostdir, "sshd.log"), "wb")
        self.sshd[host.name] = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                host.netns,
                "unshare",
                "--uts",
                "sh",
                "-c",
                f'hostname {host.name} && exec /usr/sbin/sshd -D -e -f "$0"',
                config,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _wait_for_sshd(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for host in self.hosts:
            while True:
                try:
                    socket.create_connection((host.address, 22), timeout=0.5).close()
                    break
                except OSError:
                    if self.sshd[host.name].poll() is not None or time.monotonic() > deadline:
                        log = open(os.path.join(self.workdir, host.name, "sshd.log")).read().strip()
                        raise RuntimeError(f"sshd on {host.name} ({host.netns}) did not start: {log or 'no output'}") from None
                    time.sleep(0.02)

    # --- use -----------------------------------------------------------------

    def hostfile(self, slots: int = 2, extra: dict[str, str] | None = None) -> str:
        """Hostfile text naming every host (their addresses come from the ssh config)."""
        extra = extra or {}
        return "".join(f"{h.name} slots={slots} {extra.get(h.name, '')}".rstrip() + "\n" for h in self.hosts)

    def ssh_args(self) -> list[str]:
        return ["--transport", "ssh", "--ssh-config", self.ssh_config, "--known-hosts", self.known_hosts]

    def host(self, name: str) -> NetnsHost:
        return next(h for h in self.hosts if h.name == name)

    def stray_pids(self) -> dict[str, list[int]]:
        """Per host, the processes that are not its daemons (sshd, and slurmd if any)."""
        stray = {}
        for host in self.hosts:
            daemon = self.sshd.get(host.name)
            pids = [p for p in host.pids() if (daemon is None or p != daemon.pid) and p not in self.daemon_pids]
            if pids:
                stray[host.name] = pids
        return stray

    def stop_sshd(self, name: str) -> None:
        proc = self.sshd.pop(name)
        proc.kill()
        proc.wait()

    # --- down ----------------------------------------------------------------

    def down(self) -> None:
        for proc in self.sshd.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.sshd.clear()
        sweep()
        shutil.rmtree(self.workdir, ignore_errors=True)


def sweep() -> list[str]:
    """Remove every namespace, bridge and process of a cluster with this prefix."""
    removed = []
    for line in _sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(f"{PREFIX}-h"):
            continue
        for pid in _sh("ip", "netns", "pids", name, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        _sh("ip", "netns", "del", name, check=False)
        removed.append(name)
    _restore_neighbour_limits()
    # Every link of ours, bridges and head-side veths alike: a namespace that
    # something still references outlives 'ip netns del', and so does its veth.
    for line in _sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        link = line.split(":")[1].strip().split("@")[0] if line.count(":") >= 2 else ""
        if link.startswith(f"{PREFIX}-"):
            _sh("ip", "link", "del", link, check=False)
            removed.append(link)
    return removed


def missing_tools() -> list[str]:
    """What this machine lacks to build the cluster (empty when it can)."""
    missing = [t for t in ("ip", "unshare", "ssh-keygen") if shutil.which(t) is None]
    if not os.path.exists("/usr/sbin/sshd"):
        missing.append("/usr/sbin/sshd (apt-get install openssh-server)")
    if os.geteuid() != 0:
        missing.append("root (network namespaces need it)")
    return missing


def _require_tools() -> None:
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"cannot build the netns cluster: missing {', '.join(missing)}")


def _keygen(path: str) -> None:
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", os.path.basename(path), "-f", path)


def _make_neighbour_room(hosts: int) -> None:
    """Room in the kernel's one ARP table for every host's entry for every other host, and the head's."""
    wanted = {2: hosts * (hosts + 1) + 512, 3: 2 * hosts * (hosts + 1) + 1024}
    current = {n: int(open(NEIGH.format(n)).read()) for n in wanted}
    if all(current[n] >= wanted[n] for n in wanted):
        return
    if not os.path.exists(NEIGH_SAVED):
        with open(NEIGH_SAVED, "w") as f:
            f.write(" ".join(f"{n}={v}" for n, v in current.items()))
    for n in (3, 2):  # the hard limit first: the kernel wants thresh2 <= thresh3
        with open(NEIGH.format(n), "w") as f:
            f.write(str(max(current[n], wanted[n])))


def _restore_neighbour_limits() -> None:
    try:
        saved = dict(item.split("=") for item in open(NEIGH_SAVED).read().split())
    except (OSError, ValueError):
        return
    for n in ("2", "3"):  # thresh2 first, while thresh3 is still high
        if n in saved:
            with open(NEIGH.format(n), "w") as f:
                f.write(saved[n])
    os.remove(NEIGH_SAVED)


def _sh(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done
