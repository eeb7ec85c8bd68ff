"""A rank's end of its control pipe to the agent: say it is ready, resolved, or why it cannot go on.

The built-in engine core and the bootstrap write here; the agent reads the
other end (``LAUNCHER_CONTROL_FD``). Messages are ``protocol``'s.
"""

from __future__ import annotations

import os
import sys

from .protocol import Message, RankError, encode
from .rankenv import CONTROL_FD_VAR


def rank_failed(rank: int, message: str, code: int) -> int:
    """From a rank: say why it cannot go on, on its stderr and to its agent; returns ``code`` to exit with."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    report_to_agent(RankError(rank=rank, message=message))
    return code


def report_to_agent(message: Message) -> None:
    """From a rank: write one message to the agent's control pipe, if there is one."""
    fd = os.environ.get(CONTROL_FD_VAR)  # HostFacts.control_fd, read raw: a rank may report before anything else
    if fd is None:
        return
    try:
        os.write(int(fd), encode(message))
    except OSError:
        pass  # the agent is gone; the rank is about to be stopped anyway
