"""A TCP connect, the probe that is safe against any listener (a real vLLM's included)."""

from __future__ import annotations

import socket
import struct
import time

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
