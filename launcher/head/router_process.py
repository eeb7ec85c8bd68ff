"""The router process of a P/D job (``run --router``): started on the head, a part of the job like a rank.

It starts once every instance is ready (it is handed their URLs), counts as
serving once its port accepts connections, and its exit while the job
serves fails the job with its exit code, as a rank's would, or with
``--restart`` starts a new one (``api`` decides how, ``Job`` whether). It dies with
the head: through a small exec shim it gets ``PR_SET_PDEATHSIG`` (SIGTERM)
tied to the head's main thread, which spawns it, so even a SIGKILLed head
leaves no router behind; at the end it is stopped by process group, SIGTERM
then SIGKILL after the grace period. Its output goes to ``router.log`` in
``--log-dir`` and its last lines into the failure message.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

from ..netif import url_host

# Run by the head's interpreter in front of the router: die with the head (the parent), then become the router.
_DIE_WITH_HEAD = (
    "import ctypes,os,signal,sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"  # PR_SET_PDEATHSIG
    "os.getppid() == int(sys.argv[1]) or os._exit(1)\n"  # the head died before prctl took effect
    "try:\n os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as e:\n print(f'cannot run {sys.argv[2]}: {e.strerror}', file=sys.stderr); os._exit(127)\n"
)


def free_port(address: str) -> int:
    """A port the kernel has free on ``address`` now (for a router's second listener)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


class RouterProcess:
    """One router command, listening on ``address:port`` once it serves."""

    def __init__(self, argv: Sequence[str], address: str, port: int, log_path: str | None = None):
        self.argv, self.address, self.port, self.log_path = list(argv), address, port, log_path
        self.last_lines: collections.deque[str] = collections.deque(maxlen=20)
        self._process: subprocess.Popen | None = None
        self._closing = False
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def poll(self) -> int | None:
        """Its exit code once it has ended (negative: killed by that signal), else None."""
        return self._process.poll() if self._process is not None else None

    def start(self) -> None:
        """Call from the head's main thread (the one whose end the router's PR_SET_PDEATHSIG follows)."""
        self._process = subprocess.Popen(
            [sys.executable, "-c", _DIE_WITH_HEAD, str(os.getpid()), *self.argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="router-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        log = open(self.log_path, "a", encoding="utf-8", errors="replace") if self.log_path else None
        try:
            for raw in self._process.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.last_lines.append(line)
                if log is not None:
                    log.write(line + "\n")
                    log.flush()
        finally:
            if log is not None:
                log.close()

    def serving(self) -> bool | str:
        """Whether its port accepts connections now; or, once it has exited, why it never will."""
        code = self._process.poll()
        if code is not None:
            return self.exit_message(code)
        target = ("127.0.0.1" if self.address in ("0.0.0.0", "") else "::1" if self.address == "::" else self.address, self.port)
        try:
            with socket.create_connection(target, timeout=0.5):
                return True
        except OSError:
            return False

    def not_serving(self, timeout: float) -> str:
        """Why it is not serving after ``timeout`` seconds."""
        where = f"{url_host(self.address)}:{self.port}"
        return f"the router ({self.argv[0]}) did not listen on {where} within {timeout:g}s (--ready-timeout){self._last()}"

    def watch(self, on_exit: Callable[[str, int], None]) -> None:
        """Call ``on_exit(message, code)`` from a thread if the router ends before ``close``."""

        def wait() -> None:
            code = self._process.wait()
            if self._reader is not None:
                self._reader.join(timeout=1.0)  # its last words, for the message
            if not self._closing:
                on_exit(self.exit_message(code), code)

        threading.Thread(target=wait, name="router-exit", daemon=True).start()

    def exit_message(self, code: int) -> str:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return f"the router ({self.argv[0]}) {how}{self._last()}"

    def _last(self) -> str:
        lines = [line for line in self.last_lines if line.strip()]
        return f"; last output: {lines[-1].strip()}" if lines else ""

    def close(self, grace: float) -> None:
        """Stop its process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
        self._closing = True
        process = self._process
        if process is None:
            return
        for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, signum)
            except (ProcessLookupError, PermissionError):
                break
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(process.pid, signal.SIGKILL)  # what the router left in its group
        except (ProcessLookupError, PermissionError):
            pass
        if self._reader is not None:
            self._reader.join(timeout=2.0)
