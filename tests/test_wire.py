"""The side-channel wire as data: generations, the release table, requests and replies."""

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.engine_core import builtin_payload
from launcher.vllm import wire


@pytest.mark.parametrize(
    "version, generation",
    [
        ("0.8.5", None),
        ("0.9.0.1", "v0"),
        ("0.11.0", "v0"),
        ("0.11.1", "v1"),
        ("0.13.0", "v1"),
        ("0.25.1", "v1"),
        ("0.26.0", "v2"),
        ("0.32.0+cpu", "v2"),
        ("0.33.0", "v2"),
        # Unknown: newer than the table, a pre-release of a boundary, no vLLM, not a version.
        ("0.33.1", None),
        ("0.34.0.dev12+g1234", None),
        ("0.26.0rc1", None),
        ("", None),
        ("main", None),
    ],
)
def test_each_vllm_release_maps_to_the_generation_its_wheel_speaks(version, generation):
    gen, why = wire.generation_for_vllm(version)
    assert (gen.name if gen else None) == generation
    assert why  # always a reason to show


def test_every_generations_request_parses_back():
    for gen in wire.GENERATIONS:
        request = wire.parse_request(wire.encode_request(gen, tp_rank=2, pp_rank=0))
        assert request.generation is gen and request.tp_rank == (0 if gen.fields is None else 2)
    assert wire.encode_request(wire.BY_NAME["v1"], tp_rank=2) == msgspec.msgpack.encode((b"get_meta_msg", 2))
    assert wire.encode_request(wire.BY_NAME["v2"], tp_rank=2, pp_rank=1) == msgspec.msgpack.encode((b"get_meta_msg", 1, 2))


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"\x91" * 200 + b"\xc0", "not a msgpack array"),  # deep nesting: refused at the first level, no recursion
        (b"\x91" * 1000 + b"\xc0", "1001-byte body"),
        (msgspec.msgpack.encode([b"get_meta_msg", 0, 0, 0]), "array of 4 items"),
        (msgspec.msgpack.encode([b"other", 0]), "message b'other'"),
        (msgspec.msgpack.encode([b"get_meta_msg", -1]), "non-negative"),
        (msgspec.msgpack.encode([b"get_meta_msg", True]), "not a msgpack array"),
        (msgspec.msgpack.encode({"a": 1}), "not a msgpack array"),
    ],
)
def test_anything_else_is_a_wire_error_that_says_what(body, reason):
    with pytest.raises(wire.WireError, match=reason):
        wire.parse_request(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_body_parses_or_is_refused_never_raises_otherwise(body):
    try:
        wire.parse_request(body)
    except wire.WireError:
        pass


def test_replies_decode_wrapped_bare_and_errors():
    payload = builtin_payload("e1", "job")
    stamp = msgspec.msgpack.encode(1.5)
    v2 = wire.parse_reply(wire.BY_NAME["v2"], [payload, stamp])
    assert (v2.metadata.engine_id, v2.compat_hash, v2.remote_time) == ("e1", wire.compatibility_hash("job"), 1.5)
    v0 = wire.parse_reply(wire.BY_NAME["v0"], [wire.bare_metadata(payload)])
    assert (v0.metadata.engine_id, v0.compat_hash) == ("e1", None)
    # An older release's metadata lacks later fields; a newer one has more: both decode.
    old = msgspec.msgpack.encode({"engine_id": "old", "agent_metadata": b"x", "block_len": 4096, "attn_backend_name": "FLASH"})
    assert wire.parse_reply(wire.BY_NAME["v0"], [old]).metadata.engine_id == "old"
    new = msgspec.msgpack.encode({"engine_id": "new", "agent_metadata": b"x", "future_field": [1, 2]})
    assert (
        wire.parse_reply(wire.BY_NAME["v1"], [msgspec.msgpack.encode({"compatibility_hash": "h", "agent_metadata_bytes": new})]).compat_hash
        == "h"
    )
    with pytest.raises(wire.WireError, match="answered an error: unknown rank"):
        wire.parse_reply(wire.BY_NAME["v2"], [wire.error_reply("unknown rank"), stamp])
    with pytest.raises(wire.WireError, match="1 reply frames for a v2 request, expected 2"):
        wire.parse_reply(wire.BY_NAME["v2"], [payload])
    with pytest.raises(wire.WireError, match="not a NIXL handshake payload"):
        wire.parse_reply(wire.BY_NAME["v1"], [b"\x01"])


def test_the_builtin_payload_carries_every_field_vllm_032_requires():
    required = {
        "engine_id",
        "agent_metadata",
        "kv_caches_base_addr",
        "device_id",
        "num_blocks",
        "block_lens",
        "block_strides",
        "kv_cache_layout",
        "block_size",
        "ssm_sizes",
        "attn_backend_name",
        "physical_blocks_per_logical_kv_block",
    }
    payload = msgspec.msgpack.decode(builtin_payload("e1", "job"))
    assert set(payload) == {"compatibility_hash", "agent_metadata_bytes"}
    assert required <= set(msgspec.msgpack.decode(payload["agent_metadata_bytes"]))
