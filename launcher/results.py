"""How a launch ended: per-rank results, the failure that ended it, exit codes.

Plain data, shared by the supervisor that fills it in, the CLI that turns
it into an exit code, and the report that renders it.
"""

from __future__ import annotations

import enum

import msgspec

from . import exitcodes
from .check import CheckMatrix
from .restart import RestartRecord

# The launcher's exit codes (the table, with the ranks' own, is exitcodes.py).
EXIT_OK = exitcodes.OK
EXIT_USAGE = exitcodes.USAGE
EXIT_HOST_LOST = exitcodes.HOST_LOST
EXIT_NOT_READY = exitcodes.NOT_READY
EXIT_CHECK_FAILED = exitcodes.CHECK_FAILED
EXIT_STDOUT_CLOSED = exitcodes.STDOUT_CLOSED


class Phase(str, enum.Enum):
    """Where a rank is: pending -> started -> ready -> exited, or lost with its host; restarting -> started
    again when its failure group restarts (--restart)."""

    PENDING = "pending"
    STARTED = "started"
    READY = "ready"
    EXITED = "exited"
    LOST = "lost"
    RESTARTING = "restarting"

    def __str__(self) -> str:
        return self.value


class FailureKind(str, enum.Enum):
    """What ended a job; each kind has its exit code (``exit_code_for``)."""

    RANK_EXITED = "rank-exited"  # a rank exited (its own code is passed through)
    RANK_ERROR = "rank-error"  # a rank said why it cannot go on, then exited
    NOT_READY = "not-ready"  # ranks not ready in time, or one that never can be
    HOST_LOST = "host-lost"  # an agent ended or went silent
    TRANSPORT = "transport"  # an agent could not be started (or the head failed talking to it)
    DUPLICATE_ADDRESS = "duplicate-address"  # two hosts report one address
    UNREACHABLE = "unreachable"  # the head cannot reach a ready rank
    CHECK = "check"  # the all-pairs check failed
    VERSIONS = "versions"  # hosts run different software (preflight)
    SIGNAL = "signal"  # a signal on a host's side (scancel): a stop, not a fault
    PROXY = "proxy"  # the P/D proxy cannot listen (its port is taken)
    ROUTER = "router"  # the P/D router (--router) exited: its code is passed through, as a rank's

    def __str__(self) -> str:
        return self.value


def exit_code_for(kind: FailureKind, rank_code: int | None = None, signum: int | None = None) -> int:
    """The launcher's exit code: a rank's own (128+N if killed by signal N), 128+N for a signal, else by kind."""
    if kind is FailureKind.SIGNAL:
        return 128 + (signum or 15)
    if kind in (FailureKind.RANK_EXITED, FailureKind.RANK_ERROR, FailureKind.ROUTER) and rank_code is not None:
        return rank_code if rank_code > 0 else (128 - rank_code if rank_code < 0 else 1)
    return {
        FailureKind.NOT_READY: EXIT_NOT_READY,
        FailureKind.CHECK: EXIT_CHECK_FAILED,
        FailureKind.VERSIONS: EXIT_CHECK_FAILED,
        FailureKind.PROXY: EXIT_USAGE,
    }.get(kind, EXIT_HOST_LOST)


class RankResult(msgspec.Struct, frozen=True):
    """How one rank went; times are seconds since the launch began."""

    rank: int
    host: str
    address: str | None
    port: int
    pid: int | None
    state: Phase
    exit_code: int | None  # negative: killed by that signal
    error: str | None
    started_at: float | None
    ready_at: float | None
    ended_at: float | None
    last_output: str | None = None  # its last line of output, for the summary
    rule: str | None = None  # the rule that chose its address (netif.BIND_RULES)


class Failure(msgspec.Struct, frozen=True):
    kind: FailureKind
    message: str
    exit_code: int
    rank: int | None = None
    host: str | None = None


class LaunchResult(msgspec.Struct, frozen=True):
    ranks: tuple[RankResult, ...]
    failure: Failure | None
    check: CheckMatrix | None
    duration: float
    transfer: CheckMatrix | None = None  # check --transfer: the NIXL reads
    job_id: str = ""  # the job's id: every process of it carries it (LAUNCHER_JOB_ID), and the head printed it first
    restarts: tuple[RestartRecord, ...] = ()  # --restart: each failure group's restarts, in order

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.failure is None else self.failure.exit_code
