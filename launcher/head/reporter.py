"""What the head tells a person while a job runs: one interface, the console its first implementation.

The supervisor calls these as things happen; ``output.console.ConsoleReporter``
prints them, an embedder may collect them. The default tells nobody.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..check import CheckMatrix
    from .job import RankState


class Reporter:
    """What the supervisor tells a person; the default tells nobody."""

    def progress(self, text: str) -> None: ...

    def output(self, rank: RankState, stream: str, line: str) -> None: ...

    def ready(self, ranks: list[RankState]) -> None: ...

    def checked(self, matrix: CheckMatrix) -> None: ...

    def new_attempt(self, rank: RankState, attempt: int) -> None:
        """A rank restarted (--restart): its output from now on is its attempt ``attempt``'s."""
