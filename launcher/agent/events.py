"""The agent's one writer to the head: control messages ahead of rank output, rank output bounded."""

from __future__ import annotations

import collections
import os
import re
import threading
import time

from .. import protocol
from .threads import Worker

LINE_LIMIT = 64 * 1024  # a rank's output line is cut here: a line without end never costs more
OUTPUT_BUDGET = 4 * 1024 * 1024  # bytes of rank output queued for the head before the ranks wait
_LINE_END = re.compile(rb"\r\n|\r|\n")  # \r too: a progress bar's redraws arrive as they happen


class EventWriter:
    """The agent's one writer to the head: control messages ahead of rank output.

    Control messages (hello, ready, exits, heartbeats, check results) are few
    and go first, in order. Rank output is bounded (``OUTPUT_BUDGET``): when
    the link to the head cannot keep up, the reader of that rank's output
    waits, so the rank waits on its stdout as it would under ssh, and no line
    is lost on the way to the head's --log-dir (the head's terminal may drop
    lines; its log never does). A heartbeat waits behind at most the one line
    being written, whatever a rank prints. Messages queue until ``start``:
    ranks are forked from a process with no other thread.
    """

    def __init__(self, stream, on_broken):
        self._stream, self._on_broken = stream, on_broken
        self._control: collections.deque = collections.deque()
        self._output: collections.deque = collections.deque()
        self._output_bytes = 0
        self._ready = threading.Condition()
        self._broken = False

    def send(self, message, after_output: bool = False) -> None:
        """Queue a control message: ahead of rank output, or (``after_output``) behind what is queued of it,
        as a rank's exit must follow its last lines (the head quotes them when the exit is a failure)."""
        data = protocol.encode(message)
        with self._ready:
            if after_output and self._output:
                self._output.append(data)
                self._output_bytes += len(data)
            else:
                self._control.append(data)
            self._ready.notify()

    def output(self, rank: int, stream: str, line: str) -> None:
        """Queue a line of a rank's output; waits while the budget is spent (the rank then waits on its stdout)."""
        data = protocol.encode(protocol.Output(rank=rank, stream=stream, line=line))
        with self._ready:
            while self._output_bytes and self._output_bytes + len(data) > OUTPUT_BUDGET and not self._broken:
                self._ready.wait(0.5)
            if self._broken:
                return
            self._output.append(data)
            self._output_bytes += len(data)
            self._ready.notify()

    def start(self) -> None:
        Worker(self._write)

    def close(self, timeout: float = 2.0) -> None:
        """Until what is queued is written (control first), or ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while (self._control or self._output) and not self._broken and time.monotonic() < deadline:
                self._ready.wait(0.05)

    def _next(self) -> bytes:
        with self._ready:
            while True:
                if self._control:
                    return self._control.popleft()
                if self._output:
                    data = self._output.popleft()
                    self._output_bytes -= len(data)
                    self._ready.notify_all()  # a rank's reader may be waiting for room
                    return data
                self._ready.notify_all()  # close() may be waiting for an empty queue
                self._ready.wait()

    def _write(self) -> None:
        while True:
            data = self._next()
            try:
                self._stream.write(data)
                self._stream.flush()
            except (BrokenPipeError, OSError, ValueError):
                with self._ready:
                    self._broken = True
                    self._ready.notify_all()
                self._on_broken("the head's connection is closed")
                return


def read_lines(stream, emit) -> None:
    """Read a rank's stream in chunks and ``emit`` each line: lines end at \\n, \\r\\n or \\r, and are cut at
    LINE_LIMIT (a line without end never costs more); the stream is closed at its end."""
    fd, pending = stream.fileno(), b""
    while True:
        try:
            chunk = os.read(fd, LINE_LIMIT)
        except OSError:
            chunk = b""
        if not chunk:
            break
        pending += chunk
        start = 0
        for end in _LINE_END.finditer(pending):
            emit(pending[start : end.start()])
            start = end.end()
        pending = pending[start:]
        while len(pending) >= LINE_LIMIT:
            emit(pending[:LINE_LIMIT])
            pending = pending[LINE_LIMIT:]
    if pending:
        emit(pending)
    stream.close()
