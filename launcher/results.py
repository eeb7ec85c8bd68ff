"""How a launch ended: per-rank results, the failure that ended it, exit codes.

Plain data, shared by the supervisor that fills it in, the CLI that turns
it into an exit code, and the report that renders it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .check import CheckMatrix

# Exit codes of the launcher itself (a failing rank's own code is passed through).
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_HOST_LOST = 3
EXIT_NOT_READY = 4
EXIT_CHECK_FAILED = 5


@dataclass(frozen=True)
class RankResult:
    """How one rank went; times are seconds since the launch began."""

    rank: int
    host: str
    address: str | None
    port: int
    pid: int | None
    state: str
    exit_code: int | None  # negative: killed by that signal
    error: str | None
    started_at: float | None
    ready_at: float | None
    ended_at: float | None
    last_output: str | None = None  # its last line of output, for the summary


@dataclass(frozen=True)
class Failure:
    kind: str  # rank-exited, rank-error, host-lost, transport, not-ready, duplicate-address, unreachable, check, versions, signal
    message: str
    exit_code: int
    rank: int | None = None
    host: str | None = None


@dataclass(frozen=True)
class LaunchResult:
    ranks: tuple[RankResult, ...]
    failure: Failure | None
    check: CheckMatrix | None
    duration: float

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.failure is None else self.failure.exit_code
