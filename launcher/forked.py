"""Ranks forked from the agent: no interpreter start and no imports per rank.

A built-in engine core is code the agent can load once, so the agent forks
each one from its main thread (before any other thread exists) instead of
starting an interpreter that imports it all again: about 60 ms of CPU per
rank on a small host, most of a launch with 8 ranks a host.

A forked process keeps the command line and environment that /proc shows
for its parent: the kernel reads them from the memory that the last exec set
up. That would mislead everyone who reads them: ``ps``, a user checking
``/proc/PID/environ`` for the head's address, and the sweep and port-holder
lookup that find a job's processes by ``LAUNCHER_JOB_ID``. So the child
points the kernel at its own command line and environment with
``prctl(PR_SET_MM_MAP)``, which needs no privilege on kernels built with
checkpoint/restore (Debian's and most distributions'). Where the kernel
refuses it, ``supported()`` is false and the agent starts ranks the ordinary way.

A fork also keeps what was loaded: a rank whose environment would load other
code (another ``PYTHONPATH``, an ``LD_PRELOAD``) is exec'd (``same_code``).
"""

from __future__ import annotations

import ctypes
import functools
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping

_PR_SET_MM = 35
_PR_SET_MM_MAP = 14
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sbrk.restype = ctypes.c_void_p
_libc.sbrk.argtypes = [ctypes.c_long]


class _MmMap(ctypes.Structure):
    """``struct prctl_mm_map`` (linux/prctl.h)."""

    _fields_ = [
        *(
            (name, ctypes.c_uint64)
            for name in (
                "start_code",
                "end_code",
                "start_data",
                "end_data",
                "start_brk",
                "brk",
                "start_stack",
                "arg_start",
                "arg_end",
                "env_start",
                "env_end",
            )
        ),
        ("auxv", ctypes.c_void_p),
        ("auxv_size", ctypes.c_uint32),
        ("exe_fd", ctypes.c_uint32),
    ]


_shown: list[ctypes.Array] = []  # what /proc reads for this process must outlive the call
_parents_streams: list = []


def show_as(argv: bytes, environ: bytes) -> None:
    """Make /proc/self/cmdline and /proc/self/environ read ``argv`` and ``environ`` (NUL-separated).

    Raises OSError when the kernel refuses.
    """
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()  # from field 3 on: the name may hold spaces

    def field(n: int) -> int:
        return int(fields[n - 3])

    args = ctypes.create_string_buffer(argv, len(argv))
    env = ctypes.create_string_buffer(environ, len(environ))
    mm = _MmMap(
        start_code=field(26),
        end_code=field(27),
        start_stack=field(28),
        start_data=field(45),
        end_data=field(46),
        start_brk=field(47),
        brk=_libc.sbrk(0),
        arg_start=ctypes.addressof(args),
        arg_end=ctypes.addressof(args) + len(argv),
        env_start=ctypes.addressof(env),
        env_end=ctypes.addressof(env) + len(environ),
        auxv=None,
        auxv_size=0,
        exe_fd=0xFFFFFFFF,  # keep /proc/self/exe: changing it is the one part that needs privilege
    )
    if _libc.prctl(_PR_SET_MM, _PR_SET_MM_MAP, ctypes.byref(mm), ctypes.sizeof(mm), 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    _shown[:] = [args, env]


@functools.cache
def supported() -> bool:
    """Whether this kernel lets a process show its own command line and environment (tried on this one)."""
    try:
        with open("/proc/self/cmdline", "rb") as cmdline, open("/proc/self/environ", "rb") as environ:
            show_as(cmdline.read(), environ.read())
    except (OSError, ValueError, AttributeError):
        return False
    return True


# Read when a process starts, and deciding which code it runs: a fork cannot take a new value.
_LOADS_CODE = re.compile(r"PYTHON(PATH|HOME|USERBASE|NOUSERSITE|SAFEPATH|PLATLIBDIR)|LD_\w+")


def same_code(parent_env: Mapping[str, str], env: Mapping[str, str]) -> bool:
    """Whether a child forked from a process started with ``parent_env`` runs the code it would exec'd with ``env``."""
    return all(parent_env.get(name) == env.get(name) for name in parent_env.keys() | env.keys() if _LOADS_CODE.fullmatch(name))


def encode_argv(argv: Iterable[str]) -> bytes:
    return b"".join(os.fsencode(a) + b"\0" for a in argv)


def encode_environ(env: dict[str, str]) -> bytes:
    return b"".join(os.fsencode(f"{k}={v}") + b"\0" for k, v in env.items())


class ForkedProcess:
    """A forked child, with the part of ``subprocess.Popen`` that agents and transports use."""

    def __init__(self, pid: int, stdout, stderr, stdin=None):
        self.pid, self.stdout, self.stderr, self.stdin = pid, stdout, stderr, stdin
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def poll(self) -> int | None:
        if self.returncode is None and self._lock.acquire(blocking=False):
            try:
                self._collect(os.WNOHANG)
            finally:
                self._lock.release()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired([str(self.pid)], timeout)
            time.sleep(0.005)
        return self.returncode

    def _collect(self, flags: int) -> None:
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # reaped elsewhere: the status is lost, as subprocess assumes
            self.returncode = 0
            return
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)


def single_threaded() -> bool:
    """Whether this process has one thread, the only state in which a forked child may run Python safely
    (counted by the kernel: a C library's threads, ZMQ's say, count too)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def spawn(
    main: Callable[[], int],
    argv: list[str],
    env: dict[str, str],
    pass_fds: Iterable[int] = (),
    in_child: Callable[[], None] = lambda: None,
    stdin_pipe: bool = False,
) -> ForkedProcess:
    """Fork a child that runs ``main()`` as if it were ``argv`` exec'd with ``env``; its stdout/stderr are pipes.

    The child gets a session of its own, /dev/null as stdin (or a pipe whose
    writing end is the result's ``stdin``), only ``pass_fds`` besides its
    standard streams, the signal handling of a fresh interpreter, and ``env``
    as its environment; ``in_child`` runs first (e.g. to die with the
    parent). Call it from a process with no other thread, or whose other
    threads hold no lock the child needs: the child makes its own standard
    streams and (pyzmq, after a fork) its own ZMQ context, and the agent's
    threads, when it restarts ranks, wait in reads and writes of their own.
    """
    pass_fds = tuple(pass_fds)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if stdin_pipe else (os.open(os.devnull, os.O_RDONLY), None)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # nothing buffered here is written twice
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12 warns of any fork with threads about
            pid = os.fork()
    except OSError:
        for fd in (out_r, out_w, err_r, err_w, in_r, in_w):
            if fd is not None:
                os.close(fd)
        raise
    if pid == 0:
        _run_child(main, argv, env, in_r, out_w, err_w, pass_fds, in_child)  # never returns
    for fd in (out_w, err_w, in_r):
        os.close(fd)
    stdin = os.fdopen(in_w, "wb") if in_w is not None else None
    return ForkedProcess(pid, os.fdopen(out_r, "rb"), os.fdopen(err_r, "rb"), stdin)


def _run_child(main, argv, env, in_r, out_w, err_w, pass_fds, in_child) -> None:
    code = 1
    try:
        os.setsid()
        in_child()
        os.dup2(in_r, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        _close_all_but({0, 1, 2, *pass_fds})
        for fd in pass_fds:
            os.set_inheritable(fd, True)  # as subprocess's pass_fds: the rank may start children that want it
        _reset_signals()
        os.environ.clear()
        os.environ.update(env)
        show_as(encode_argv(argv), encode_environ(env))
        # The parent's stream objects are kept alive: freed, they would close the descriptors just set up.
        _parents_streams.extend((sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__))
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")
        sys.stdout = sys.__stdout__ = _text_stream(1)
        sys.stderr = sys.__stderr__ = _text_stream(2)
        code = main()
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        # No interpreter shutdown: it belongs to the agent (its atexit hooks, its buffered streams).
        os._exit(code if isinstance(code, int) else 1)


def _text_stream(fd: int) -> io.TextIOWrapper:
    raw = io.BufferedWriter(io.FileIO(fd, "w", closefd=False))  # buffered: a write to a pipe is never cut short
    return io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace", line_buffering=True)


def _exit_code(exc: SystemExit) -> int:
    """What the interpreter would exit with for this SystemExit."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def _close_all_but(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep):
        if low < fd:  # an empty range is not always a no-op: closerange(0, 0) closes every fd above 0 (CPython 3.11)
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _reset_signals() -> None:
    """A fresh interpreter's handlers: the agent's own are not the rank's; what was ignored stays ignored."""
    for signum in signal.valid_signals():
        try:
            handler = signal.getsignal(signum)
        except (OSError, ValueError):
            continue
        if callable(handler) and handler is not signal.default_int_handler:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
