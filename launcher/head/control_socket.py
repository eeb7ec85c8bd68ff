"""The running head's control socket: ``launcher status`` and ``launcher stop`` ask it, one JSON line each way.

A Unix socket in the job's private directory (``jobdir``), 0600, and each
peer's uid checked with ``SO_PEERCRED`` as well: only the job's own user
may ask. A request is one line of at most 4 KiB, read within 5 s; anything
else is answered with an error and closed, and the head serves on. The
serving thread also touches the job's ``alive`` file, so a head that was
killed is known to be lost, and since when.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import struct
import threading
from collections.abc import Callable

MAX_REQUEST = 4096
READ_SECONDS = 5.0
AT_ONCE = 16  # connections served at once; more wait in the backlog


class ControlError(Exception):
    """The head could not be asked; str() is one line."""


class ControlServer:
    def __init__(self, path: str, answer: Callable[[dict], dict], alive: Callable[[], None], every: float = 2.0):
        self.path, self.answer, self.alive, self.every = path, answer, alive, every
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600: no moment when another user could connect
        try:
            with socket_address(path) as address:
                self._listener.bind(address)
        finally:
            os.umask(old)
        self._listener.listen(64)
        self._slots = threading.BoundedSemaphore(AT_ONCE)
        self._closed = threading.Event()

    def start(self) -> None:
        """Serve, from a thread: called once the agents are started (a thread before that keeps the local transport
        from forking its agents); until then an asker waits in the socket's backlog."""
        threading.Thread(target=self._serve, daemon=True, name="control-socket").start()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                self.alive()
            except OSError:
                pass
            try:
                readable, _, _ = select.select([self._listener], [], [], self.every)
                if not readable:
                    continue
                conn, _ = self._listener.accept()
            except (OSError, ValueError):
                return  # closed
            self._slots.acquire()
            threading.Thread(target=self._one, args=(conn,), daemon=True, name="control-request").start()

    def _one(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(READ_SECONDS)
                pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
                if uid != os.getuid():
                    return _reply(conn, {"ok": False, "error": f"uid {uid} (pid {pid}) may not control another user's job"})
                request = _read_request(conn)
                if isinstance(request, str):
                    return _reply(conn, {"ok": False, "error": request})
                try:
                    answer = self.answer(request)
                except Exception as exc:  # a bug of ours answers the asker; it never ends the job
                    answer = {"ok": False, "error": f"the head failed to answer: {type(exc).__name__}: {exc}"}
                _reply(conn, answer)
        except OSError:
            pass
        finally:
            self._slots.release()


@contextlib.contextmanager
def socket_address(path: str):
    """``path`` as a socket address: a Unix socket's path is at most 107 bytes, and a state directory under a long
    HOME or XDG_STATE_HOME is longer; through the directory's descriptor in /proc it is always short."""
    folder, name = os.path.split(path)
    fd = os.open(folder or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def _read_request(conn: socket.socket) -> dict | str:
    """The request object, or why there is none."""
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(MAX_REQUEST + 1 - len(data))
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            return f"a request is one JSON line of at most {MAX_REQUEST} bytes"
    try:
        request = json.loads(data.partition(b"\n")[0])
    except ValueError:
        return 'a request is one JSON object, such as {"op": "status"}'
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        return 'a request is one JSON object with an "op", such as {"op": "status"}'
    return request


def _reply(conn: socket.socket, answer: dict) -> None:
    conn.sendall(json.dumps(answer).encode() + b"\n")


def ask(path: str, request: dict, timeout: float = 10.0) -> dict:
    """Send ``request`` to the head listening at ``path``; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            with socket_address(path) as address:
                sock.connect(address)
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise ControlError(f"cannot reach the job's head at {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(data)
    except ValueError:
        raise ControlError(f"the job's head at {path} answered no JSON") from None
