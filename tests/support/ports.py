"""Free ports for a test: outside the kernel's ephemeral range, and another program holding one."""

import contextlib
import random
import socket


def _ephemeral_ports() -> range:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port_base(count: int = 8) -> int:
    """A base with ``count`` consecutive free TCP ports on loopback, outside the kernel's ephemeral range.

    In that range the kernel hands ports to outgoing connections, and a burst of them (a benchmark, a
    chaos run) leaves tens of thousands in TIME_WAIT for a minute: a run right after one found no free
    range at all. Below it, only our own listeners take ports."""
    ephemeral = _ephemeral_ports()
    for _ in range(500):
        base = random.randrange(10000, 65536 - count)
        if base in ephemeral or base + count - 1 in ephemeral:
            continue
        ok = True
        for port in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range")


@contextlib.contextmanager
def port_taken(port: int, address: str = "127.0.0.1"):
    """Another program listening on ``address:port`` while the block runs."""
    with socket.socket() as s:
        s.bind((address, port))
        s.listen()
        yield
