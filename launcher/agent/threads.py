"""Threads of the agent: daemon threads whose start does not wait for them to run."""

from __future__ import annotations

import _thread
import threading


class Worker:
    """A daemon thread whose start does not wait for it to run.

    ``threading.Thread.start`` waits for the new thread's first time slice:
    about 4 ms each on a host whose CPUs are busy starting its ranks, and
    the agent starts three threads a rank (20 ms at two ranks, before it
    watched its first exit). The agent ends with ``os._exit``, so nothing
    needs threading's registry of threads.
    """

    def __init__(self, target, *args):
        self._done = threading.Event()
        _thread.start_new_thread(self._run, (target, args))

    def _run(self, target, args) -> None:
        try:
            target(*args)
        finally:
            self._done.set()

    def join(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)
