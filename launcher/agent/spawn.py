"""Starting a rank: a built-in core forked from the agent, anything else exec'd; each dies with the agent."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess

import msgspec

from .. import forked, protocol
from ..command import BUILTIN_ENGINE
from .watch import ReadinessWatch

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


class RankProcess(msgspec.Struct):
    """A rank on this host: what it was sent, its process, its pipes, its way to ready."""

    spec: protocol.RankLaunch
    process: subprocess.Popen | forked.ForkedProcess
    control_fd: int
    command: object | None  # a built-in core's command pipe (the transfer check), a binary file
    watch: ReadinessWatch  # its way to ready
    prepared: protocol.Resolved | None = None  # a user command's address, prepared by the agent before it ran
    reported_exit: bool = False
    readers: list = msgspec.field(default_factory=list)  # the threads reading its output and control pipe


class PortTaken(Exception):
    """A port the job needs is held by another process; the message names it and the fix."""


def close_fds(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def die_with_parent(parent: int) -> None:
    """In the child, first: SIGKILL me when the agent dies."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the agent died before prctl took effect
        os._exit(1)


def spawn_rank(launch: protocol.RankLaunch, argv: list[str], env: dict[str, str], pass_fds, in_child):
    """A built-in core is forked from this process (its code is loaded once, here); anything else is exec'd."""
    if tuple(launch.argv) == BUILTIN_ENGINE and forked.same_code(os.environ, env) and forked.supported():
        from .. import engine_core

        return forked.spawn(engine_core.main, argv, env, pass_fds, in_child)
    return subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=pass_fds,
        start_new_session=True,
        preexec_fn=in_child,
    )
