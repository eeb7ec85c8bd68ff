"""The NIXL side-channel handshake over ZMQ, wire-compatible with vLLM (see ``wire``).

``SideChannelListener`` is a ROUTER at ``tcp://{VLLM_NIXL_SIDE_CHANNEL_HOST}:{base + dp_rank}``
that answers every generation of request with the engine's payload. Unlike
vLLM's listener thread, which dies on a request of another generation or an
unknown rank, it answers anything it cannot serve with an error map and
keeps serving, whatever a peer sends:

- a request is decoded only if it is a few bytes, with a schema of scalars
  (no nesting can make the decoder recurse), and anything unexpected in
  ``reply_to`` is answered or dropped, never raised;
- libzmq refuses frames over ``MAX_FRAME_BYTES`` and queues few messages
  (``RCVHWM``); a peer that never finishes ZMTP's handshake is dropped after
  ``HANDSHAKE_MS``;
- libzmq bounds frames, not frames per message, and holds a whole multipart
  message before delivering any of it (2 million empty frames cost ~120 MB),
  so the serve loop watches its process's memory: past ``MEMORY_HEADROOM``
  over what it started with, it drops every connection and hands the freed
  memory back (a new ROUTER on the same listening socket, which the
  listener holds from ``bind`` to ``close``): re-binding the port to drop
  connections once left a window in which another local user took it and
  answered handshakes in the rank's name;
- a peer that completes ZMTP's greeting and then idles would hold its
  descriptor forever (1100 of them held a rank at its open-files limit):
  a connection lives at most ``MAX_CONNECTION_AGE`` (a handshake takes
  milliseconds, and vLLM's client closes its socket after each), and past
  ``MAX_CONNECTIONS`` the oldest are dropped first;
- rejections are logged at most ``LOG_BURST`` a minute, then counted.

``handshake`` is the client: one request, the reply decoded.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from ..netif import url_host, zmq_tcp_path
from ..probe import ProbeError, tcp_connect
from . import wire

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 4096  # per frame, enforced by ZMQ before we see it; a request is a few bytes
RCVHWM = 64  # messages queued per peer before libzmq stops reading from it
HANDSHAKE_MS = 2000  # a connection that has not finished ZMTP's greeting by then is dropped
MEMORY_HEADROOM = 64 * 1024 * 1024  # growth over the listener's start that means a flood
MAX_CONNECTION_AGE = 30.0  # seconds a connection may stay open; vLLM's client closes after each handshake
MAX_CONNECTIONS = 512  # open at once (also at most half the open-files limit); the oldest go first
LOG_BURST = 20  # rejections logged per minute; the rest are counted
DEFAULT_TIMEOUT = 5.0  # vLLM's client RCVTIMEO


class SideChannelBindError(OSError):
    """The listener could not bind; the message names host, address, port and fix."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()  # the message alone, not '[Errno 98] ...'


class HandshakeError(Exception):
    """A handshake that failed; the message is the one-line reason."""


class SideChannelListener:
    """A ROUTER that serves handshake payloads by tp_rank; never dies on bad input."""

    def __init__(self, address: str, port: int, payloads: Mapping[int, bytes], *, hostname: str | None = None):
        self.address, self.port = address, port
        self.payloads = dict(payloads)  # tp_rank -> wrapped payload (wire.encode_payload)
        self.hostname = hostname or socket.gethostname()
        self.requests_served = 0
        self.requests_rejected = 0
        self.resets = 0  # times every connection was dropped for a flood
        self._cap = min(MAX_CONNECTIONS, _open_files_limit() // 2)
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._listening: socket.socket | None = None  # the port, held from bind to close
        self._monitor: zmq.Socket | None = None
        self._open: dict[int, _Connection] = {}  # fd -> an accepted connection open now, from the monitor's events
        self._logged: list[float] = []  # times of the rejections logged this minute
        self._unlogged = 0

    @property
    def endpoint(self) -> str:
        return zmq_tcp_path(self.address, self.port)

    def bind(self) -> None:
        """Bind the port (once: it is held until ``close``) and put a ROUTER on it."""
        if self._listening is None:
            self._listening = self._listen()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        # The ROUTER listens on a copy of our own listening socket (libzmq closes the copy with the ROUTER):
        # a new ROUTER after a flood takes over the same socket, and the port is never free for another.
        sock.setsockopt(zmq.USE_FD, os.dup(self._listening.fileno()))
        if ":" in self.address:
            sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise self._bind_error(exc) from None
        self._sock = sock
        # Connections come and go as events: with none open, nothing can flood, and the watchdog may rest.
        self._monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._open = {}

    def _listen(self) -> socket.socket:
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                self.address.strip("[]"), self.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )[0]
        except socket.gaierror as exc:
            raise SideChannelBindError(errno.EADDRNOTAVAIL, f"cannot bind the side channel at {self.address}: {exc}") from None
        listening = socket.socket(family, kind, proto)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq's own listeners
        try:
            listening.bind(address)
            listening.listen(100)  # libzmq's own default (ZMQ_BACKLOG)
        except OSError as exc:
            listening.close()
            raise self._bind_error(exc) from None
        listening.setblocking(False)
        return listening

    def _bind_error(self, exc: OSError) -> SideChannelBindError:
        where = f"{self.address}:{self.port} on host {self.hostname}"
        if exc.errno == errno.EADDRINUSE:
            from ..probe import port_holder

            holder = port_holder(self.port, self.address) or f"another process (ss -ltnp 'sport = :{self.port}' names it)"
            return SideChannelBindError(
                exc.errno,
                f"side-channel port {self.port} is already in use at {where}, held by {holder}; stop it or move this "
                f"job's ports with --port-base (two jobs or vLLM instances on one host, such as prefill and decode, need "
                f"side-channel bases at least their DP size apart)",
            )
        if exc.errno == errno.EADDRNOTAVAIL:
            return SideChannelBindError(exc.errno, f"cannot bind {where}: Cannot assign requested address (not this host's address)")
        return SideChannelBindError(exc.errno, f"cannot bind the side channel at {where}: {exc.strerror or exc}")

    def serve(self, stop: threading.Event, poll_ms: int = 50, on_idle=None, wake_fd: int | None = None, idle_ms: int | None = None) -> None:
        """Answer requests until ``stop`` is set.

        While a connection is open the loop looks at ``stop`` and at its memory
        (a flood arrives as one multipart message, which poll reports only once
        complete) every ``poll_ms``; with none open, every ``idle_ms`` (default
        ``poll_ms``). ``wake_fd`` readable (a rank's signal wake-up pipe) wakes
        it at once. ``on_idle`` runs between polls (NIXL's progress, with
        --transfer) and returns how many milliseconds the next may wait.
        """
        assert self._sock is not None, "bind() first"
        baseline, next_look = _rss(), 0.0
        while not stop.is_set():
            self._count_connections()  # what the monitor said since the last turn: the open connections
            now = time.monotonic()
            if now >= next_look:  # on its clock, not at every message: an all-pairs check sends thousands
                next_look = now + poll_ms / 1000
                if _rss() > baseline + MEMORY_HEADROOM:
                    self._reset()
                    baseline = max(baseline, _rss())  # what the reset could not give back is not counted twice
                    continue
                self._drop_old(now)
            resting = on_idle is None and idle_ms is not None and not self._open
            wait = on_idle() if on_idle is not None else idle_ms if resting else poll_ms
            # A connection's events wake the loop only while it rests: otherwise it looks every poll_ms
            # anyway, and an all-pairs check opens thousands of connections (two more wake-ups each).
            items = [(self._sock, zmq.POLLIN)] + ([(self._monitor, zmq.POLLIN)] if resting else [])
            ready = dict(zmq.zmq_poll(items + ([(wake_fd, zmq.POLLIN)] if wake_fd is not None else []), wait))
            if wake_fd in ready:
                _drain(wake_fd)
            if self._sock not in ready:
                continue
            frames = self._receive(baseline)
            if frames is None:
                continue
            reply = self.reply_to(frames)
            if reply is not None:
                try:
                    self._sock.send_multipart(reply, flags=zmq.NOBLOCK)
                except zmq.ZMQError as exc:  # peer gone or HWM: drop the reply, keep serving
                    self._reject(f"a reply that could not go ({exc})")

    def _receive(self, baseline: int) -> list[bytes] | None:
        """One message, frame by frame: a request has 3 (identity, delimiter, body); past that, frames are
        counted and dropped as they are read, so a message of millions costs no Python objects (None: reset)."""
        frames: list[bytes] = []
        extra = 0
        while True:
            frame = self._sock.recv(copy=False)
            if len(frames) < 4:
                frames.append(frame.bytes)
            else:
                extra += 1
                if extra % 65536 == 0 and _rss() > baseline + MEMORY_HEADROOM:
                    self._reset()
                    return None
            if not frame.more:
                break
        if extra:
            frames.append(b"<%d more frames>" % extra)
        return frames

    def _reset(self) -> None:
        """Drop every connection and what they queued: a new ROUTER on the same listening socket (the port
        is held throughout); libzmq's buffers go back to the system."""
        self.resets += 1
        log.warning(
            "side channel %s:%s: memory grew past %d MiB: a peer is flooding; dropping every connection",
            self.address,
            self.port,
            MEMORY_HEADROOM >> 20,
        )
        self._close_router()
        time.sleep(0.05)  # the I/O thread tears the old pipes down
        _trim()
        self.bind()

    def _drop_old(self, now: float) -> None:
        """Connections past MAX_CONNECTION_AGE, and the oldest past the cap (``_open`` as last counted)."""
        by_age = sorted(self._open, key=lambda fd: self._open[fd].since)
        over = max(0, len(by_age) - self._cap)
        self._drop([fd for i, fd in enumerate(by_age) if i < over or now - self._open[fd].since > MAX_CONNECTION_AGE])

    def _drop(self, fds: list[int]) -> None:
        """Shut these connections down (libzmq then closes them itself), each checked to still be the one accepted:
        a descriptor number is reused once libzmq has closed it."""
        for fd in fds:
            conn = self._open.pop(fd, None)
            if conn is not None:
                conn.shut_down(self.port)

    def reply_to(self, frames: list[bytes]) -> list[bytes] | None:
        """The frames to send back for one received ROUTER message (None: no reply possible)."""
        if len(frames) < 2:
            self._reject("a message without an envelope")
            return None
        identity = frames[0]
        if len(frames) != 3 or frames[1] != b"":
            self._reject(f"{len(frames) - 1} frames after the identity, expected an empty delimiter and one body")
            return [identity, b"", wire.error_reply("malformed request: expected a REQ envelope with one body frame")]
        try:
            request = wire.parse_request(frames[2])
        except wire.WireError as exc:
            self._reject(str(exc))
            return [identity, b"", wire.error_reply(f"not a handshake request: {exc}")]
        gen = request.generation
        stamp = [msgspec.msgpack.encode(time.perf_counter())] if gen.reply_frames == 2 else []
        payload = self.payloads.get(request.tp_rank) if request.pp_rank == 0 else None
        if payload is None:
            self._reject(f"a request for pp_rank {request.pp_rank}, tp_rank {request.tp_rank} (serving tp_rank {sorted(self.payloads)})")
            return [identity, b"", wire.error_reply(f"unknown rank pp {request.pp_rank} tp {request.tp_rank}"), *stamp]
        self.requests_served += 1
        return [identity, b"", payload if gen.wrapped else wire.bare_metadata(payload), *stamp]

    def _reject(self, what: str) -> None:
        """Count a rejection; log it unless LOG_BURST were logged in the last minute (then say how many were not)."""
        self.requests_rejected += 1
        now = time.monotonic()
        self._logged = [t for t in self._logged if now - t < 60]
        if len(self._logged) >= LOG_BURST:
            self._unlogged += 1
            return
        self._logged.append(now)
        more = f" (and {self._unlogged} more not logged)" if self._unlogged else ""
        self._unlogged = 0
        log.warning("side channel %s:%s: ignored %s%s", self.address, self.port, what, more)

    def _count_connections(self) -> None:
        while self._monitor.get(zmq.EVENTS) & zmq.POLLIN:  # asked, not tried: zmq.Again at every look costs more
            event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            fd = event["value"]  # the connection's descriptor, for both events
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._open[fd] = _Connection.accepted(fd)
            else:
                self._open.pop(fd, None)

    def close(self) -> None:
        self._close_router()
        if self._listening is not None:
            self._listening.close()
            self._listening = None

    def _close_router(self) -> None:
        if self._sock is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close(linger=0)
            self._sock = None


class _Connection(msgspec.Struct):
    """An accepted connection, as it was at accept: its peer says whether a descriptor is still it."""

    fd: int
    peer: object
    since: float

    @classmethod
    def accepted(cls, fd: int) -> _Connection:
        return cls(fd, _peer(fd), time.monotonic())

    def shut_down(self, port: int) -> None:
        """shutdown(2) the connection, if its descriptor is still this one (our port, the same peer)."""
        try:
            sock = socket.socket(fileno=os.dup(self.fd))
        except OSError:
            return
        try:
            if sock.getsockname()[1] != port or sock.getpeername() != self.peer:
                return
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return
        finally:
            sock.close()


def _peer(fd: int):
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        return sock.getpeername()
    except OSError:
        return None
    finally:
        sock.close()


def _open_files_limit() -> int:
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _drain(fd: int) -> None:
    try:
        os.read(fd, 4096)
    except BlockingIOError:
        pass


def _rss() -> int:
    """This process's resident memory, from /proc (no psutil: the rank stays light)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _trim() -> None:
    """Give freed heap back to the system (glibc keeps it otherwise, and the watchdog would see a flood forever)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class HandshakeResult(msgspec.Struct, frozen=True):
    reply: wire.Reply
    latency_ms: float


def handshake(
    address: str,
    port: int,
    gen: wire.WireGeneration = wire.CURRENT,
    *,
    tp_rank: int = 0,
    timeout: float = DEFAULT_TIMEOUT,
    source: str | None = None,
) -> HandshakeResult:
    """One vLLM handshake of generation ``gen``: REQ -> ROUTER, the reply decoded; raises HandshakeError."""
    try:
        tcp_connect(address, port, timeout, source)  # a precise reason (refused, unreachable) before ZMQ's silent retries
    except ProbeError as exc:
        raise HandshakeError(str(exc)) from None
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
    if ":" in address:
        sock.setsockopt(zmq.IPV6, 1)
    endpoint = zmq_tcp_path(address, port)
    if source:
        endpoint = endpoint.replace("tcp://", f"tcp://{url_host(source)}:0;", 1)
    start = time.perf_counter()
    try:
        sock.connect(endpoint)
        sock.send(wire.encode_request(gen, tp_rank=tp_rank))
        frames = sock.recv_multipart()
    except zmq.Again:
        raise HandshakeError(f"{address}:{port}: no handshake reply within {timeout:g}s") from None
    except zmq.ZMQError as exc:
        raise HandshakeError(f"{address}:{port}: {exc}") from None
    finally:
        sock.close(linger=0)
    latency = (time.perf_counter() - start) * 1000
    try:
        return HandshakeResult(wire.parse_reply(gen, frames), latency)
    except wire.WireError as exc:
        raise HandshakeError(f"{address}:{port}: {exc}") from None
