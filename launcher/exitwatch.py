"""Sleep until a child process exits or someone asks: no polling clock between an exit and its report.

The agent used to look at its ranks every 50 ms: on average 25 ms between a
rank's exit and the head hearing of it, and most of a short loopback job's
end. A pidfd (Linux 5.3+) becomes readable when its process exits, so one
``poll`` waits on every rank at once, plus a self-pipe that any thread (or
a signal handler) writes to wake it. Where pidfds are missing (an older
kernel), ``precise`` is false and callers keep a short clock.
"""

from __future__ import annotations

import os
import select


class ExitWatch:
    """Wakes ``wait`` when a watched process exits (once per exit) or when ``wake`` is called."""

    def __init__(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._wake_r, select.POLLIN)
        self._pidfds: set[int] = set()
        self.precise = True  # every process given to ``watch`` has a pidfd

    def watch(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfd_open (kernel < 5.3, or not Linux), or already reaped
            self.precise = False
            return
        os.set_inheritable(fd, False)
        self._pidfds.add(fd)
        self._poll.register(fd, select.POLLIN)

    def wake(self) -> None:
        """From any thread or a signal handler: the next (or current) ``wait`` returns at once."""
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):  # full: a wake is pending already; closed: nobody waits
            pass

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds; an exit wakes it once (its pidfd is then forgotten), the caller
        polls its processes to learn which."""
        try:
            ready = self._poll.poll(max(0, int(timeout * 1000)))
        except InterruptedError:  # PEP 475 retries, but a handler that raised ends up here
            return
        for fd, _events in ready:
            if fd == self._wake_r:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except (BlockingIOError, OSError):
                    pass
            elif fd in self._pidfds:
                self._pidfds.remove(fd)
                self._poll.unregister(fd)
                os.close(fd)
