"""A host as the launcher knows it: one hostfile line, or one node of an allocation.

Pure data; ``hostfile`` and the backends' ``allocation_hosts`` make them,
``plan`` places ranks on them.
"""

from __future__ import annotations

import ipaddress

import msgspec

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class Host(msgspec.Struct, frozen=True):
    """One line of a hostfile (or one node of an allocation)."""

    name: str
    slots: int = 1
    user: str | None = None
    port: int | None = None
    ifname: str | None = None
    cidr: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    python: str | None = None
    cwd: str | None = None
    gpus: str | None = None  # the devices --gpus-per-rank slices: a count or ids (gpus.parse_device_list)
    role: str | None = None  # prefill or decode: a P/D job (disagg.py)
    group: str | None = None  # P/D: hosts of one role sharing a group are one instance (disagg.instances)
    origin: str = ""  # "path:line", for error messages

    @property
    def is_loopback(self) -> bool:
        return is_loopback_name(self.name)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.origin})" if self.origin else self.name


def is_loopback_name(name: str) -> bool:
    """True for ``localhost`` and loopback literals (127.0.0.0/8, ::1)."""
    if name.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False
