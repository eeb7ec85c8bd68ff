"""vLLM's NIXL side-channel wire, as data: request generations, payload schema, versions.

Pure: encoding and decoding only, no sockets. ``sidechannel`` does the I/O.

A peer sends a REQ request; vLLM's listener (a ROUTER, one per engine core)
answers with the engine's handshake payload. The request changed twice in
vLLM's history, and vLLM's listener thread dies on a request of another
generation, so a client must speak the listener's generation. Each row of
``GENERATIONS`` is one; ``VLLM_RELEASES`` says which vLLM releases speak
which (read off every release's wheel by ``scripts/vllm_wire_history.py``).
A new generation is one row here and one row in the tests.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import msgspec

GET_META_MSG = b"get_meta_msg"
MAX_REQUEST_BYTES = 256  # a real request is under 20 bytes; anything longer is not one


class WireGeneration(msgspec.Struct, frozen=True):
    """One generation of the side-channel request and reply."""

    name: str
    fields: tuple[str, ...] | None  # ranks after GET_META_MSG in the msgpack request; None: the raw bytes alone
    reply_frames: int  # frames a REQ client receives: the payload, then (2) the listener's perf_counter
    wrapped: bool  # payload is a NixlHandshakePayload (hash + metadata bytes), else bare metadata
    vllm: str  # the vLLM releases that speak it

    def describe(self) -> str:
        request = "b'get_meta_msg'" if self.fields is None else "[b'get_meta_msg', " + ", ".join(self.fields) + "]"
        return f"{self.name}: request {request}, {self.reply_frames} reply frame{'s' * (self.reply_frames > 1)} (vLLM {self.vllm})"


GENERATIONS: tuple[WireGeneration, ...] = (
    WireGeneration("v0", None, 1, False, "0.9.0-0.11.0"),
    WireGeneration("v1", ("tp_rank",), 1, True, "0.11.1-0.25.x; bare metadata before 0.13"),
    WireGeneration("v2", ("pp_rank", "tp_rank"), 2, True, "0.26.0 and later"),
)
BY_NAME = {g.name: g for g in GENERATIONS}
CURRENT = BY_NAME["v2"]  # what the built-in engine core's peers speak by default
TCP = "tcp"  # not a generation: a TCP connect only, safe against any listener

# (first release, generation), oldest first; a release at or after LAST_KNOWN is unknown.
VLLM_RELEASES: tuple[tuple[tuple[int, ...], str | None], ...] = (
    ((0, 0, 0), None),  # no NixlConnector side channel before 0.9
    ((0, 9, 0), "v0"),
    ((0, 11, 1), "v1"),
    ((0, 26, 0), "v2"),
)
LAST_KNOWN = (0, 33, 0)  # the newest release whose wheel was read


class WireError(ValueError):
    """A request or reply that is not the vLLM wire; the message says what was wrong."""


def generation(name: str) -> WireGeneration:
    try:
        return BY_NAME[name]
    except KeyError:
        raise WireError(f"unknown wire generation {name!r}; known: {', '.join(BY_NAME)}") from None


# --- which generation a vLLM release speaks ------------------------------------

_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?(?:\.(\d+))?(.*)")


def generation_for_vllm(version: str) -> tuple[WireGeneration | None, str]:
    """The generation a vLLM version's listener speaks, or None with the reason to use TCP."""
    if not version:
        return None, "no vLLM found for its command"
    m = _VERSION.match(version.strip())
    if m is None:
        return None, f"vLLM version {version!r} is not a version launcher can read"
    release = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    pre_release = re.match(r"\.?(rc|a|b|dev)", m.group(5) or "") is not None
    if release > LAST_KNOWN or (release == LAST_KNOWN and pre_release):
        return None, f"vLLM {version} is newer than the releases launcher knows (up to {'.'.join(map(str, LAST_KNOWN))})"
    first, name = [(first, name) for first, name in VLLM_RELEASES if first <= release][-1]
    if name is None:
        return None, f"vLLM {version} has no NIXL side channel"
    if pre_release and release == first:
        return None, f"vLLM {version} is a pre-release of the first {name} release; its wire is not known"
    return BY_NAME[name], f"vLLM {version}"


# --- requests -------------------------------------------------------------------


def encode_request(gen: WireGeneration, *, tp_rank: int = 0, pp_rank: int = 0) -> bytes:
    """A client's request in generation ``gen``."""
    if gen.fields is None:
        return GET_META_MSG
    values = {"tp_rank": tp_rank, "pp_rank": pp_rank}
    return msgspec.msgpack.encode((GET_META_MSG, *(values[f] for f in gen.fields)))


# Scalars only: a nested array or map fails validation at its first byte,
# so no request can make the decoder recurse.
_request_decoder = msgspec.msgpack.Decoder(list[bytes | int])


class Request(msgspec.Struct, frozen=True):
    generation: WireGeneration
    pp_rank: int
    tp_rank: int


def parse_request(body: bytes) -> Request:
    """What a listener received; raises WireError for anything that is not a request of a known generation."""
    if body == GET_META_MSG:
        return Request(BY_NAME["v0"], 0, 0)
    if len(body) > MAX_REQUEST_BYTES:
        raise WireError(f"a {len(body)}-byte body; requests are under {MAX_REQUEST_BYTES} bytes")
    try:
        items = _request_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise WireError("a body that is not a msgpack array of a message name and ranks") from None
    for gen in GENERATIONS:
        if gen.fields is not None and len(items) == 1 + len(gen.fields):
            break
    else:
        raise WireError(f"an array of {len(items)} items; known requests have 2 or 3")
    if items[0] != GET_META_MSG:
        raise WireError(f"message {items[0]!r:.40}, expected {GET_META_MSG!r}")
    ranks = dict(zip(gen.fields, items[1:], strict=True))
    if not all(isinstance(v, int) and v >= 0 for v in ranks.values()):
        raise WireError(f"ranks {list(ranks.values())!r:.60} are not non-negative integers")
    return Request(gen, ranks.get("pp_rank", 0), ranks["tp_rank"])


# --- the payload ------------------------------------------------------------------


class NixlAgentMetadata(msgspec.Struct, kw_only=True):
    """vLLM's ``NixlAgentMetadata`` (0.32's fields), encoded as a map keyed by field name.

    Encoding fills every field vLLM 0.32 requires, so vLLM's own client
    decodes it. Decoding needs only ``engine_id`` and ``agent_metadata``:
    older releases lack later fields (they get these defaults) and fields
    added after 0.32 are ignored.
    """

    engine_id: str
    agent_metadata: bytes
    kv_caches_base_addr: list[int] = []
    device_id: int = 0
    num_blocks: int = 0
    block_lens: list[int] = []
    block_strides: list[int] = []
    kv_cache_layout: str = "HND"
    block_size: int = 16
    ssm_sizes: tuple[int, int] = (0, 0)
    attn_backend_name: str = ""
    physical_blocks_per_logical_kv_block: int = 1
    dcp_size: int = 1
    pcp_size: int = 1


class NixlHandshakePayload(msgspec.Struct):
    """vLLM's wrapper (0.13 and later): the compatibility hash first, so a peer can refuse before decoding the rest."""

    compatibility_hash: str
    agent_metadata_bytes: bytes


def encode_payload(metadata: NixlAgentMetadata, compat_hash: str) -> bytes:
    return msgspec.msgpack.encode(NixlHandshakePayload(compat_hash, msgspec.msgpack.encode(metadata)))


def bare_metadata(payload: bytes) -> bytes:
    """What a v0 listener sends for this payload: the metadata without the wrapper."""
    return msgspec.msgpack.decode(payload, type=NixlHandshakePayload).agent_metadata_bytes


def compatibility_hash(job_id: str) -> str:
    """What the built-in engine cores of one job agree on (vLLM hashes its config the same way: sha256 hex)."""
    import hashlib  # here: a user command's job never needs it, and its head and agents would load OpenSSL

    return hashlib.sha256(f"launcher-builtin/{job_id}".encode()).hexdigest()


def error_reply(message: str) -> bytes:
    """Our listener's answer to a bad request (vLLM's would die instead)."""
    return msgspec.msgpack.encode({"error": message})


class Reply(msgspec.Struct, frozen=True):
    metadata: NixlAgentMetadata
    compat_hash: str | None  # None: a bare-metadata reply (vLLM before 0.13)
    remote_time: float | None


def parse_reply(gen: WireGeneration, frames: Sequence[bytes]) -> Reply:
    """Decode a listener's reply to a ``gen`` request; raises WireError saying what was wrong."""
    if not frames:
        raise WireError("an empty reply")
    error = _error_text(frames[0])
    if error is not None:
        raise WireError(f"the listener answered an error: {error}")
    if len(frames) != gen.reply_frames:
        raise WireError(f"{len(frames)} reply frames for a {gen.name} request, expected {gen.reply_frames}")
    try:
        payload = msgspec.msgpack.decode(frames[0], type=NixlHandshakePayload)
        compat_hash, body = payload.compatibility_hash, payload.agent_metadata_bytes
    except (msgspec.DecodeError, msgspec.ValidationError):
        compat_hash, body = None, frames[0]
    try:
        metadata = msgspec.msgpack.decode(body, type=NixlAgentMetadata)
        remote_time = msgspec.msgpack.decode(frames[1], type=float) if gen.reply_frames == 2 else None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WireError(f"not a NIXL handshake payload ({exc})") from None
    return Reply(metadata, compat_hash, remote_time)


def _error_text(frame: bytes) -> str | None:
    try:
        value = msgspec.msgpack.decode(frame, type=dict[str, str])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return value.get("error")
