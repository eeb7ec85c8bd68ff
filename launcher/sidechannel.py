"""The NIXL side-channel handshake over ZMQ, wire-compatible with vLLM (see ``wire``).

``SideChannelListener`` is a ROUTER at ``tcp://{VLLM_NIXL_SIDE_CHANNEL_HOST}:{base + dp_rank}``
that answers every generation of request with the engine's payload. Unlike
vLLM's listener thread, which dies on a request of another generation or an
unknown rank, it answers anything it cannot serve with an error map and
keeps serving. ``handshake`` is the client: one request, the reply decoded.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec
import zmq

from . import wire
from .netif import url_host, zmq_tcp_path
from .probe import ProbeError, tcp_connect

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 4096  # per frame, enforced by ZMQ before we see it; a request is a few bytes
DEFAULT_TIMEOUT = 5.0  # vLLM's client RCVTIMEO


class SideChannelBindError(OSError):
    """The listener could not bind; the message names host, address, port and fix."""


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
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    @property
    def endpoint(self) -> str:
        return zmq_tcp_path(self.address, self.port)

    def bind(self) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        if ":" in self.address:
            sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise self._bind_error(exc) from None
        self._sock = sock

    def _bind_error(self, exc: zmq.ZMQError) -> SideChannelBindError:
        where = f"{self.address}:{self.port} on host {self.hostname}"
        if exc.errno == errno.EADDRINUSE:
            return SideChannelBindError(
                exc.errno,
                f"side-channel port {self.port} is already in use at {where}; "
                f"stop what holds it (ss -ltnp 'sport = :{self.port}') or move the ports with --port-base "
                f"(two vLLM instances on one host, such as prefill and decode, need side-channel bases at least their DP size apart)",
            )
        if exc.errno == errno.EADDRNOTAVAIL:
            return SideChannelBindError(exc.errno, f"cannot bind {where}: Cannot assign requested address (not this host's address)")
        return SideChannelBindError(exc.errno, f"cannot bind the side channel at {where}: {exc}")

    def serve(self, stop: threading.Event, poll_ms: int = 200) -> None:
        """Answer requests until ``stop`` is set."""
        assert self._sock is not None, "bind() first"
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not stop.is_set():
            if not dict(poller.poll(poll_ms)):
                continue
            frames = self._sock.recv_multipart()
            reply = self.reply_to(frames)
            if reply is not None:
                try:
                    self._sock.send_multipart(reply, flags=zmq.NOBLOCK)
                except zmq.ZMQError as exc:  # peer gone or HWM: drop the reply, keep serving
                    log.warning("side channel: reply dropped: %s", exc)

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
        self.requests_rejected += 1
        log.warning("side channel %s:%s: ignored %s", self.address, self.port, what)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


@dataclass(frozen=True)
class HandshakeResult:
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
