"""One rank's way to ready, as data: what the agent has seen of it, and whether that makes it ready now.

A built-in core says it is ready itself (``reported``). A user command is
ready once its address is known (its bootstrap's ``Resolved``, prepared by
the agent) and its readiness rule holds: a polled rule's probe, or a log
line, which may come before or after the address, on another thread. Each
method takes one thing seen and answers what follows; the rank is declared
ready exactly once, whatever the order. Pure but for its lock.
"""

from __future__ import annotations

import enum
import threading

from .. import protocol, readiness


class Next(enum.Enum):
    """What the agent does once a rank's address is known."""

    READY = "ready"  # declare it now
    POLL = "poll"  # probe its rule until it holds
    WAIT = "wait"  # for its log line


class ReadinessWatch:
    def __init__(self, rule: readiness.Readiness):
        self.rule = rule
        self.resolved: protocol.Resolved | None = None
        self.ready: protocol.Ready | None = None  # once declared, what was said
        self._line_seen = False
        self._declared = False
        self._lock = threading.Lock()

    def resolve(self, resolved: protocol.Resolved) -> Next:
        """Its address is known."""
        with self._lock:
            self.resolved = resolved
            if self.rule.polled:
                return Next.POLL
            return Next.READY if self._claim() else Next.WAIT

    def line(self, text: str) -> bool:
        """A line of its output: True when it makes the rank ready now (a log rule's line, its address known)."""
        if not isinstance(self.rule, readiness.Log) or self._line_seen or not self.rule.matches(text):
            return False
        with self._lock:
            self._line_seen = True
            return self._claim()

    def probe_held(self) -> bool:
        """Its polled rule held (and its ports are its own): True the first time."""
        with self._lock:
            return self._claim()

    def declared(self, ready: protocol.Ready) -> None:
        """What the agent said (or a built-in core reported): peers are probed from its address."""
        with self._lock:
            self._declared = True
            self.ready = ready

    def _claim(self) -> bool:
        waiting_for_line = isinstance(self.rule, readiness.Log) and not self._line_seen
        if self._declared or self.resolved is None or waiting_for_line:
            return False
        self._declared = True
        return True
