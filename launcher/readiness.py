"""When a rank counts as ready: one tagged variant per rule.

Each variant says what it means (``describe``), how the agent tests it on
the rank's host (``probe``, for the rules that are polled), and which port,
if any, peers should then be able to reach (``reachable_port``). The plan
chooses one, the agent applies it, the head only reads ``reachable_port``;
a new rule is one class here and its tests. Data for the plan and the wire;
the probes import their I/O when the agent calls them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar, Union

import msgspec

from .command import render_template
from .netif import url_host


class _Rule(msgspec.Struct, frozen=True, tag_field="kind", kw_only=True):
    polled: ClassVar[bool] = False  # the agent polls ``probe`` until it holds

    @property
    def owns_ports(self) -> bool:
        """The rule connects to the rank's side-channel ports: the agent then checks they are the rank's own."""
        return False

    @property
    def opens_side_channel(self) -> bool:
        """Whether the rank may serve a side channel once ready: a check probes it (a headless vLLM node opens none)."""
        return True

    def describe(self) -> str:
        raise NotImplementedError

    def reachable_port(self, rank_port: int) -> int | None:
        """The port peers must reach once the rank is ready (None: nothing known to listen)."""
        return None

    def probe(self, address: str, *, ports: Sequence[int], port: int, rank: int) -> bool:
        """From the rank's host: does the rule hold now?"""
        return False


class Report(_Rule, tag="report"):
    """The built-in engine core says so itself, once its listener is bound."""

    def describe(self) -> str:
        return "the engine core reports it"

    def reachable_port(self, rank_port: int) -> int | None:
        return rank_port


class Ports(_Rule, tag="ports"):
    """A TCP connect to each of its side-channel ports on its own address succeeds (never a handshake,
    which a real vLLM listener of another generation dies of); the agent also checks who holds them."""

    polled: ClassVar[bool] = True

    def describe(self) -> str:
        return "its side-channel ports accept TCP connections"

    @property
    def owns_ports(self) -> bool:
        return True

    def reachable_port(self, rank_port: int) -> int | None:
        return rank_port

    def probe(self, address: str, *, ports: Sequence[int], port: int, rank: int) -> bool:
        return all(_connects(address, p) for p in ports)


class Port(_Rule, tag="port"):
    port: int
    polled: ClassVar[bool] = True

    def describe(self) -> str:
        return f"port {self.port} accepts TCP connections"

    def reachable_port(self, rank_port: int) -> int | None:
        return self.port

    def probe(self, address: str, *, ports: Sequence[int], port: int, rank: int) -> bool:
        return _connects(address, self.port)


class Url(_Rule, tag="url"):
    url: str  # {host_ip} {port} {rank} filled in on the host
    ports: bool = False  # its side-channel ports must accept connections too (--vllm-dp with a NIXL connector)
    polled: ClassVar[bool] = True

    def describe(self) -> str:
        also = " and its side-channel ports accept TCP connections" if self.ports else ""
        return f"GET {self.url} answers 2xx{also}"

    @property
    def owns_ports(self) -> bool:
        return self.ports

    def reachable_port(self, rank_port: int) -> int | None:
        return rank_port if self.ports else None

    def probe(self, address: str, *, ports: Sequence[int], port: int, rank: int) -> bool:
        if self.ports and not all(_connects(address, p) for p in ports):
            return False
        import urllib.error
        import urllib.request

        url = render_template([self.url], {"host_ip": url_host(address), "port": str(port), "rank": str(rank)}, strict=False)[0]
        try:
            with urllib.request.urlopen(url, timeout=2.0) as reply:
                return 200 <= reply.status < 300
        except (urllib.error.URLError, OSError, ValueError):
            return False


class Log(_Rule, tag="log"):
    pattern: str

    def describe(self) -> str:
        return f"an output line matches {self.pattern!r}"

    def matches(self, line: str) -> bool:
        return re.search(self.pattern, line) is not None


class WithHead(_Rule, tag="with-head"):
    """A headless vLLM host without a side channel: nothing of its own to probe; its engines are up once the
    API server on the first host answers, which vLLM's front end does only when every engine has joined."""

    polled: ClassVar[bool] = True

    @property
    def opens_side_channel(self) -> bool:
        return False

    def describe(self) -> str:
        return "it runs (a headless host: the first host's API server answers only once every engine has joined)"

    def probe(self, address: str, *, ports: Sequence[int], port: int, rank: int) -> bool:
        return True


Readiness = Union[Report, Ports, Port, Url, Log, WithHead]


def _connects(address: str, port: int) -> bool:
    from .probe import ProbeError, tcp_connect

    try:
        tcp_connect(address, port, timeout=1.0)
    except ProbeError:
        return False
    return True
