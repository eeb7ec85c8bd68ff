import errno
import threading

import msgspec
import pytest
import zmq

from launcher import sidechannel
from launcher.sidechannel import (
    HandshakeError, NixlAgentMetadata, NixlHandshakePayload, SideChannelBindError, SideChannelListener,
    builtin_payload, compatibility_hash, handshake,
)

from conftest import free_port_base


@pytest.fixture
def listener():
    port = free_port_base(1)
    lst = SideChannelListener("127.0.0.1", port, {0: builtin_payload("job-dp3", "job", 0), 1: builtin_payload("job-dp3", "job", 1)})
    lst.bind()
    stop = threading.Event()
    thread = threading.Thread(target=lst.serve, args=(stop,), kwargs={"poll_ms": 20})
    thread.start()
    yield lst
    stop.set()
    thread.join()
    lst.close()


def vllm_client_request(port, body, timeout_ms=2000):
    """What vLLM's _nixl_handshake does: a REQ socket, one msgpack request, raw reply frames."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        sock.send(msgspec.msgpack.encode(body))
        return sock.recv_multipart()
    finally:
        sock.close()


@pytest.mark.parametrize(
    "body, frames",
    [
        ([b"get_meta_msg", 1], 1),  # older releases: [msg, tp_rank]
        ([b"get_meta_msg", 0, 1], 2),  # [msg, pp_rank, tp_rank]
        ([b"get_meta_msg", 0, 0, 1], 2),  # newest: [msg, pp_rank, pcp_rank, tp_rank]
    ],
)
def test_both_wire_generations_get_vllms_reply_frames(listener, body, frames):
    reply = vllm_client_request(listener.port, body)
    assert len(reply) == frames
    # vLLM decodes with msgspec into its dataclasses: maps keyed by field name.
    payload = msgspec.msgpack.decode(reply[0], type=NixlHandshakePayload)
    assert set(msgspec.msgpack.decode(reply[0])) == {"compatibility_hash", "agent_metadata_bytes"}
    metadata = msgspec.msgpack.decode(payload.agent_metadata_bytes, type=NixlAgentMetadata)
    assert metadata.engine_id == "job-dp3" and metadata.device_id == 1
    assert payload.compatibility_hash == compatibility_hash("job")
    if frames == 2:
        assert isinstance(msgspec.msgpack.decode(reply[1]), float)


@pytest.mark.parametrize("wire", ["v1", "v2", "v3"])
def test_client_checks_engine_id_and_hash(listener, wire):
    result = handshake("127.0.0.1", listener.port, wire=wire, expect_engine_id="job-dp3", expect_hash=compatibility_hash("job"))
    assert result.metadata.engine_id == "job-dp3"
    assert (result.remote_time is None) == (wire == "v1")
    with pytest.raises(HandshakeError, match="engine ID mismatch: expected job-dp9, got job-dp3"):
        handshake("127.0.0.1", listener.port, wire=wire, expect_engine_id="job-dp9")
    with pytest.raises(HandshakeError, match="compatibility hash mismatch"):
        handshake("127.0.0.1", listener.port, wire=wire, expect_hash=compatibility_hash("other-job"))


def test_unknown_rank_and_garbage_are_answered_and_the_listener_keeps_serving(listener):
    reply = vllm_client_request(listener.port, [b"get_meta_msg", 0, 7])
    assert msgspec.msgpack.decode(reply[0]) == {"error": "unknown tp_rank 7"}
    for body in ([b"get_meta_msg", "x"], [b"other", 0], [b"get_meta_msg"], {"a": 1}, 5, [b"get_meta_msg", 0, 0, 0, 0]):
        assert "error" in msgspec.msgpack.decode(vllm_client_request(listener.port, body)[0])
    # Raw frames without a REQ envelope, and a non-msgpack body.
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 2000)
    dealer.connect(f"tcp://127.0.0.1:{listener.port}")
    dealer.send_multipart([b"a", b"b", b"c"])
    assert b"malformed" in dealer.recv_multipart()[-1]
    dealer.send_multipart([b"", b"\xc1\xff"])
    assert b"not msgpack" in dealer.recv_multipart()[-1]
    dealer.close()
    assert handshake("127.0.0.1", listener.port, wire="v2").metadata.engine_id == "job-dp3"
    assert listener.requests_rejected >= 9


def test_client_reports_an_error_reply_clearly(listener):
    with pytest.raises(HandshakeError, match="listener answered an error: unknown tp_rank 5"):
        handshake("127.0.0.1", listener.port, tp_rank=5)


def test_port_in_use_is_a_clear_error_naming_address_port_and_fix(listener):
    second = SideChannelListener("127.0.0.1", listener.port, {}, hostname="h1")
    with pytest.raises(SideChannelBindError) as err:
        second.bind()
    assert err.value.errno == errno.EADDRINUSE
    assert f"side-channel port {listener.port} is already in use at 127.0.0.1:{listener.port} on host h1" in str(err.value)
    assert "--port-base" in str(err.value)


def test_a_non_local_address_fails_to_bind_with_vllms_error_text():
    lst = SideChannelListener("198.18.255.254", free_port_base(1), {})
    with pytest.raises(SideChannelBindError, match="Cannot assign requested address"):
        lst.bind()


def test_refused_connection_is_reported_at_once():
    with pytest.raises(HandshakeError, match="Connection refused"):
        handshake("127.0.0.1", free_port_base(1), timeout=2)


def test_ipv6_loopback_works():
    port = free_port_base(1)
    lst = SideChannelListener("::1", port, {0: builtin_payload("e6", "j", 0)})
    lst.bind()
    stop = threading.Event()
    t = threading.Thread(target=lst.serve, args=(stop,), kwargs={"poll_ms": 20})
    t.start()
    try:
        assert handshake("::1", port, source="::1").metadata.engine_id == "e6"
    finally:
        stop.set()
        t.join()
        lst.close()


def test_request_bodies_match_vllms_arity():
    assert msgspec.msgpack.decode(sidechannel.request_body("v1", tp_rank=2)) == [b"get_meta_msg", 2]
    assert msgspec.msgpack.decode(sidechannel.request_body("v2", tp_rank=2, pp_rank=1)) == [b"get_meta_msg", 1, 2]
    assert msgspec.msgpack.decode(sidechannel.request_body("v3", 2, 1, 3)) == [b"get_meta_msg", 1, 3, 2]


from hypothesis import given, settings, strategies as st  # noqa: E402

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False) | st.binary(max_size=20) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
bodies = st.one_of(
    st.binary(max_size=64),
    msgpack_values.map(msgspec.msgpack.encode),
    st.tuples(st.sampled_from([b"get_meta_msg", b"x"]), st.lists(msgpack_values, max_size=4)).map(
        lambda t: msgspec.msgpack.encode([t[0], *t[1]])
    ),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=16), max_size=3), bodies, st.booleans())
def test_any_frames_get_an_answer_or_are_dropped_never_an_exception(extra, body, envelope):
    lst = SideChannelListener("127.0.0.1", 1, {0: builtin_payload("e", "j", 0)}, hostname="h")
    frames = [b"peer-id", b"", body] if envelope else [b"peer-id", *extra, body]
    reply = lst.reply_to(frames)
    assert reply is None or (reply[0] == b"peer-id" and reply[1] == b"" and 3 <= len(reply) <= 4)
    if reply is not None and reply[2] != lst.payloads[0]:
        assert "error" in msgspec.msgpack.decode(reply[2])
