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
