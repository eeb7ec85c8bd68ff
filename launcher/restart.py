"""Restart by failure group: which ranks come back together, after how long, and when to give up.

vLLM cannot rejoin a data-parallel group piecemeal: its engines meet once,
at start, through the DP coordinator. So the unit that restarts is every
rank of a DP group (a plain ``run`` job, ``--vllm-dp``), while each
prefill/decode instance of a P/D job is a unit of its own (LeaderWorkerSet's
RecreateGroupOnPodRestart, torchrun's whole-group restart). A unit that never
became ready does not restart at all (LWS's RecreateGroupAfterStart: a slow
or broken first start must not loop); a unit restarts at most
``max_restarts`` times in any ``window`` seconds, after an exponential,
jittered backoff. Pure: the head's ``Job`` keeps the records.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

MODES = ("never", "on-failure")


class RestartPolicy(msgspec.Struct, frozen=True):
    """``--restart``, ``--max-restarts``, ``--restart-window``, ``--restart-backoff``, ``--restart-peers``."""

    mode: str = "never"
    max_restarts: int = 5
    window: float = 3600.0
    backoff_min: float = 1.0
    backoff_max: float = 60.0
    peers: bool = False  # a replaced prefill also restarts every decode instance, once it is ready again

    @property
    def on(self) -> bool:
        return self.mode == "on-failure"


class Unit(msgspec.Struct, frozen=True):
    """A failure group: hosts whose ranks stop and start together."""

    name: str
    hosts: tuple[int, ...]
    role: str | None = None


class RestartRecord(msgspec.Struct, frozen=True):
    """One restart of a unit: why, when (seconds since the launch), after which backoff, and how long to ready."""

    unit: str
    attempt: int  # 1 for the unit's first restart
    cause: str
    at: float
    backoff: float
    ready_after: float | None = None  # seconds from the failure to every rank of the unit ready again


def units_of(instances: Sequence, host_count: int) -> tuple[Unit, ...]:
    """A job's failure groups: each P/D instance (``disagg.Instance``: one host, or a group of hosts whose
    engines are one DP group) is its own; any other job is one DP group, one unit."""
    if instances:
        return tuple(Unit(f"{i.role} instance {i.name}", i.hosts, i.role) for i in instances)
    return (Unit("the job", tuple(range(host_count))),)


def backoff(attempt: int, policy: RestartPolicy, draw: float) -> float:
    """Seconds before restart ``attempt`` (1, 2, ...): ``min * 2**(attempt-1)`` capped at ``max``, plus up to as
    much again by ``draw`` in [0, 1) (jitter, so units that failed together do not restart in step). Never
    under the minimum."""
    base = min(policy.backoff_max, policy.backoff_min * 2 ** min(attempt - 1, 32))
    return min(policy.backoff_max, base * (1.0 + draw)) if base < policy.backoff_max else base


def within_window(records: Sequence[RestartRecord], unit: str, now: float, window: float) -> int:
    """How many of ``unit``'s restarts began in the last ``window`` seconds."""
    return sum(1 for r in records if r.unit == unit and now - r.at < window)


def parse_backoff(text: str) -> tuple[float, float]:
    """``MIN,MAX`` in seconds (``1,60``); ValueError naming the fix."""
    low, sep, high = text.partition(",")
    try:
        values = (float(low), float(high)) if sep else (float(low), max(60.0, float(low)))
    except ValueError:
        raise ValueError(f"--restart-backoff {text!r}: give MIN,MAX in seconds, such as 1,60") from None
    if not 0 <= values[0] <= values[1] <= 7 * 86400:
        raise ValueError(f"--restart-backoff {text!r}: give 0 <= MIN <= MAX <= one week (seconds), such as 1,60")
    return values


def describe_seconds(seconds: float) -> str:
    """3600 -> '1h', 90 -> '90s', 5400 -> '90m'."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
