"""A TCP connect, the probe that is safe against any listener (a real vLLM's included)."""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import NamedTuple

# Linux: bind an address now, a port only at connect(), so that a probe
# from a chosen source address does not reserve an ephemeral port per socket.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
# Close with a reset, not a FIN: a probe then leaves no port in TIME_WAIT (60 s on Linux),
# which a check of thousands of pairs would otherwise pile up until the range runs out.
_RESET = struct.pack("ii", 1, 0)


class ProbeError(Exception):
    """A connect that failed; str() is ``address:port: reason``."""


def tcp_connect(address: str, port: int, timeout: float, source: str | None = None) -> float:
    """Connect to ``address:port`` (from ``source``, if given); milliseconds taken, or ProbeError."""
    start = time.perf_counter()
    bare = address.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            if source:
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((source.strip("[]"), 0))
            s.connect((bare, port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        except TimeoutError:
            raise ProbeError(f"{address}:{port}: connect timed out after {timeout:g}s") from None
        except OSError as exc:
            raise ProbeError(f"{address}:{port}: {exc.strerror or exc}") from None
    return (time.perf_counter() - start) * 1000


def port_holder(port: int, address: str | None = None, exclude: frozenset[int] = frozenset()) -> str | None:
    """Who listens on ``port`` here (at ``address`` or a wildcard), other than the pids in ``exclude``.

    'launcher job 1a2b... (rank 3, pid 4242)' for another launcher job's
    process, 'pid 4242: <its command>' for anything else; None when nobody
    listens, or when the kernel will not say who (another user's process).
    """
    import psutil

    bare = address.strip("[]") if address else None
    try:
        listeners = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr]
    except psutil.Error:
        return None
    holders = {c.pid for c in listeners if c.laddr.port == port and (bare is None or c.laddr.ip in (bare, "0.0.0.0", "::"))}
    holders -= exclude
    if not holders or None in holders:
        return None
    pid = min(holders)
    try:
        proc = psutil.Process(pid)
        try:
            env = proc.environ()
        except psutil.Error:
            env = {}
        if "LAUNCHER_JOB_ID" in env:
            rank = f"rank {env['LAUNCHER_RANK']}, " if "LAUNCHER_RANK" in env else ""
            return f"launcher job {env['LAUNCHER_JOB_ID']} ({rank}pid {pid})"
        return f"another process (pid {pid}: {' '.join(proc.cmdline())[:80]})"
    except psutil.Error:
        return f"pid {pid}"


class Listener(NamedTuple):
    """A listening TCP socket of this network namespace, as /proc/net/tcp{,6} shows it to any user."""

    address: str
    port: int
    uid: int
    inode: int


def listeners(port: int | None = None) -> list[Listener]:
    """Every socket listening on ``port`` here (any port: None), with its owner's uid and its inode (no privilege needed)."""
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A: LISTEN
                continue
            hex_address, _, hex_port = fields[1].partition(":")
            if port is not None and int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(hex_address)
            # The kernel prints each 32-bit word in host order (little-endian here).
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            address = socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, packed)
            found.append(Listener(address, int(hex_port, 16), int(fields[7]), int(fields[9])))
    return found


def socket_inodes(pids) -> set[int]:
    """The inodes of the sockets these processes hold open (processes we may not read add nothing)."""
    inodes = set()
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def foreign_listener(address: str, ports, tree) -> str | None:
    """Why a port of ``ports`` that accepts connections at ``address`` is not proven to be held by the
    processes ``tree`` (a rank and its descendants), or None when each one is.

    Proof is a listening socket whose inode one of them holds open: its listener is then theirs. Without
    it (another user's socket, which psutil will not name to a non-root launcher) the port is not the
    rank's, whoever answers on it."""
    mine = socket_inodes(tree)
    wildcards = ("0.0.0.0", "::")
    for port in ports:
        here = [item for item in listeners(port) if item.address in (address.strip("[]"), *wildcards)]
        if any(item.inode in mine for item in here):
            continue
        if not here:
            return f"nothing listens on port {port} at {address}"
        other = here[0]
        who = f"another user (uid {other.uid})" if other.uid != os.getuid() else "another process of this user"
        return f"port {port} at {address} is held by {port_holder(port, address, exclude=frozenset(tree)) or who}"
    return None
