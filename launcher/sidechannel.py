"""The NIXL side-channel handshake, wire-compatible with vLLM.

A ROUTER listener at ``tcp://{VLLM_NIXL_SIDE_CHANNEL_HOST}:{base + dp_rank}``
answers ``get_meta_msg`` requests with a msgspec-msgpack
``NixlHandshakePayload``. Both request generations are served:

- ``[b"get_meta_msg", tp_rank]`` -> one frame: the payload;
- ``[b"get_meta_msg", pp_rank, tp_rank]`` or
  ``[b"get_meta_msg", pp_rank, pcp_rank, tp_rank]`` -> two frames: the
  payload and the listener's ``time.perf_counter()``.

Unlike vLLM's listener thread, which dies on an unknown rank or a request of
the wrong arity, this one logs, answers with an error map, and keeps serving.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Mapping

import msgspec
import zmq

from .netif import url_host, zmq_tcp_path

log = logging.getLogger(__name__)

GET_META_MSG = b"get_meta_msg"
WIRES = {"v1": 2, "v2": 3, "v3": 4}  # wire generation -> request arity
MAX_MESSAGE_BYTES = 1 << 20  # a handshake request is a few bytes; drop peers sending more
DEFAULT_TIMEOUT = 5.0  # vLLM's client RCVTIMEO


class NixlAgentMetadata(msgspec.Struct):
    engine_id: str
    agent_metadata: bytes
    kv_caches_base_addr: list[int]
    device_id: int
    num_blocks: int
    block_lens: list[int]
    kv_cache_layout: str
    block_size: int


class NixlHandshakePayload(msgspec.Struct):
    compatibility_hash: str
    agent_metadata_bytes: bytes


class SideChannelBindError(OSError):
    """The listener could not bind; the message names host, address, port and fix."""


class HandshakeError(Exception):
    """A handshake that failed; the message is the one-line reason."""


def compatibility_hash(job_id: str) -> str:
    """What our engine cores must agree on to talk (vLLM hashes its config the same way)."""
    return hashlib.sha256(f"launcher-builtin/{job_id}".encode()).hexdigest()


def builtin_payload(engine_id: str, job_id: str, tp_rank: int) -> bytes:
    """The handshake payload of the built-in engine core (no KV cache behind it)."""
    metadata = NixlAgentMetadata(
        engine_id=engine_id,
        agent_metadata=f"launcher-agent:{engine_id}:tp{tp_rank}".encode(),
        kv_caches_base_addr=[],
        device_id=tp_rank,
        num_blocks=0,
        block_lens=[],
        kv_cache_layout="HND",
        block_size=16,
    )
    payload = NixlHandshakePayload(
        compatibility_hash=compatibility_hash(job_id),
        agent_metadata_bytes=msgspec.msgpack.encode(metadata),
    )
    return msgspec.msgpack.encode(payload)


def request_body(wire: str, tp_rank: int = 0, pp_rank: int = 0, pcp_rank: int = 0) -> bytes:
    """The msgpack request of one wire generation (``v1``, ``v2``, ``v3``)."""
    ranks = {2: [tp_rank], 3: [pp_rank, tp_rank], 4: [pp_rank, pcp_rank, tp_rank]}[WIRES[wire]]
    return msgspec.msgpack.encode([GET_META_MSG, *ranks])


class SideChannelListener:
    """A ROUTER that serves handshake payloads by tp_rank; never dies on bad input."""

    def __init__(self, address: str, port: int, payloads: Mapping[int, bytes], *, hostname: str | None = None):
        self.address, self.port = address, port
        self.payloads = dict(payloads)
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
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
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
            self._reject("a message without an envelope", frames)
            return None
        identity = frames[0]
        if len(frames) != 3 or frames[1] != b"":
            self._reject(f"{len(frames) - 1} frames after the identity, expected an empty delimiter and one body", frames)
            return [identity, b"", _error_frame("malformed request: expected a REQ envelope with one body frame")]
        body = frames[2]
        try:
            request = msgspec.msgpack.decode(body)
        except (msgspec.DecodeError, ValueError):
            self._reject("a body that is not msgpack", frames)
            return [identity, b"", _error_frame("body is not msgpack")]
        if not isinstance(request, list) or len(request) not in (2, 3, 4) or request[0] != GET_META_MSG:
            self._reject(f"unknown request {request!r:.80}", frames)
            return [identity, b"", _error_frame("expected [b'get_meta_msg', ..., tp_rank]")]
        tp_rank = request[-1]
        extra = [] if len(request) == 2 else [msgspec.msgpack.encode(time.perf_counter())]
        if not isinstance(tp_rank, int) or isinstance(tp_rank, bool) or tp_rank not in self.payloads:
            self._reject(f"unknown tp_rank {tp_rank!r:.40} (serving {sorted(self.payloads)})", frames)
            return [identity, b"", _error_frame(f"unknown tp_rank {tp_rank!r:.40}"), *extra]
        self.requests_served += 1
        return [identity, b"", self.payloads[tp_rank], *extra]

    def _reject(self, what: str, frames: list[bytes]) -> None:
        self.requests_rejected += 1
        log.warning("side channel %s:%s: ignored %s", self.address, self.port, what)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


def _error_frame(message: str) -> bytes:
    return msgspec.msgpack.encode({"error": message})


@dataclass(frozen=True)
class HandshakeResult:
    payload: NixlHandshakePayload
    metadata: NixlAgentMetadata
    remote_time: float | None
    latency_ms: float


def tcp_probe(address: str, port: int, timeout: float, source: str | None = None) -> float:
    """Plain TCP connect (safe against any listener); returns milliseconds or raises HandshakeError."""
    start = time.perf_counter()
    bare = address.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            if source:
                s.bind((source.strip("[]"), 0))
            s.connect((bare, port))
        except socket.timeout:
            raise HandshakeError(f"{address}:{port}: connect timed out after {timeout:g}s") from None
        except OSError as exc:
            raise HandshakeError(f"{address}:{port}: {exc.strerror or exc}") from None
    return (time.perf_counter() - start) * 1000


def handshake(
    address: str,
    port: int,
    *,
    wire: str = "v2",
    tp_rank: int = 0,
    timeout: float = DEFAULT_TIMEOUT,
    source: str | None = None,
    expect_engine_id: str | None = None,
    expect_hash: str | None = None,
) -> HandshakeResult:
    """One vLLM-style handshake: REQ -> ROUTER, decode and check the payload."""
    tcp_probe(address, port, timeout, source)  # a precise reason (refused, unreachable) before ZMQ's silent retries
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
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
        sock.send(request_body(wire, tp_rank))
        frames = sock.recv_multipart()
    except zmq.Again:
        raise HandshakeError(f"{address}:{port}: no handshake reply within {timeout:g}s") from None
    except zmq.ZMQError as exc:
        raise HandshakeError(f"{address}:{port}: {exc}") from None
    finally:
        sock.close(linger=0)
    latency = (time.perf_counter() - start) * 1000
    return _check_reply(address, port, wire, frames, latency, expect_engine_id, expect_hash)


def _check_reply(address, port, wire, frames, latency, expect_engine_id, expect_hash) -> HandshakeResult:
    where = f"{address}:{port}"
    expected_frames = 1 if WIRES[wire] == 2 else 2
    try:
        payload = msgspec.msgpack.decode(frames[0], type=NixlHandshakePayload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        error = _decode_error_frame(frames[0])
        raise HandshakeError(f"{where}: listener answered an error: {error}" if error else f"{where}: reply is not a NixlHandshakePayload") from None
    if len(frames) != expected_frames:
        raise HandshakeError(f"{where}: {len(frames)} reply frames for a {wire} request, expected {expected_frames}")
    try:
        metadata = msgspec.msgpack.decode(payload.agent_metadata_bytes, type=NixlAgentMetadata)
        remote_time = msgspec.msgpack.decode(frames[1], type=float) if expected_frames == 2 else None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise HandshakeError(f"{where}: malformed handshake payload: {exc}") from None
    if expect_hash is not None and payload.compatibility_hash != expect_hash:
        raise HandshakeError(f"{where}: compatibility hash mismatch (another job's engine is listening there)")
    if expect_engine_id is not None and metadata.engine_id != expect_engine_id:
        raise HandshakeError(f"{where}: engine ID mismatch: expected {expect_engine_id}, got {metadata.engine_id}")
    return HandshakeResult(payload, metadata, remote_time, latency)


def _decode_error_frame(frame: bytes) -> str | None:
    try:
        value = msgspec.msgpack.decode(frame)
    except msgspec.DecodeError:
        return None
    return str(value["error"]) if isinstance(value, dict) and "error" in value else None

