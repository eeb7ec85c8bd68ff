import errno
import threading

import msgspec
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import free_port_base
from launcher import protocol
from launcher.agent import probe_peer
from launcher.engine_core import builtin_payload
from launcher.vllm import wire
from launcher.vllm.sidechannel import HandshakeError, SideChannelBindError, SideChannelListener, handshake
from launcher.vllm.wire import NixlAgentMetadata, NixlHandshakePayload, compatibility_hash


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
    """What vLLM's _nixl_handshake does: a REQ socket, one request (msgpack, or raw bytes as vLLM 0.9-0.11 sent), raw reply frames."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        sock.send(body if isinstance(body, bytes) else msgspec.msgpack.encode(body))
        return sock.recv_multipart()
    finally:
        sock.close()


# What each generation's client sends and decodes, written out from vLLM's code (see wire.VLLM_RELEASES).
@pytest.mark.parametrize(
    "body, frames, wrapped",
    [
        (b"get_meta_msg", 1, False),  # 0.9-0.11.0: raw bytes; the reply is the bare NixlAgentMetadata
        ([b"get_meta_msg", 1], 1, True),  # 0.11.1-0.25: (msg, tp_rank)
        ([b"get_meta_msg", 0, 1], 2, True),  # 0.26 and later: (msg, pp_rank, tp_rank) -> payload, perf_counter
    ],
)
def test_every_wire_generation_gets_vllms_reply_frames(listener, body, frames, wrapped):
    reply = vllm_client_request(listener.port, body)
    assert len(reply) == frames
    # vLLM decodes with msgspec into its dataclasses: maps keyed by field name.
    if wrapped:
        assert set(msgspec.msgpack.decode(reply[0])) == {"compatibility_hash", "agent_metadata_bytes"}
        payload = msgspec.msgpack.decode(reply[0], type=NixlHandshakePayload)
        assert payload.compatibility_hash == compatibility_hash("job")
        body_bytes = payload.agent_metadata_bytes
    else:
        body_bytes = reply[0]
    metadata = msgspec.msgpack.decode(body_bytes, type=NixlAgentMetadata)
    assert metadata.engine_id == "job-dp3" and metadata.device_id == (1 if wrapped else 0)
    if frames == 2:
        assert isinstance(msgspec.msgpack.decode(reply[1]), float)


@pytest.mark.parametrize("gen", wire.GENERATIONS, ids=lambda g: g.name)
def test_a_check_probe_verifies_engine_id_and_hash(listener, gen):
    def probe(**expect):
        peer = protocol.Peer(rank=3, address="127.0.0.1", ports=[listener.port], wire=gen.name, **expect)
        mine = protocol.Ready(rank=0, address="127.0.0.1", port=0, pid=0, rule="", engine_id="")
        return probe_peer(mine, peer, timeout=2.0)

    done = probe(expect_engine_id="job-dp3", expect_hash=compatibility_hash("job"))
    assert done.ok, done.error
    assert [(e.port, e.engine_id) for e in done.engines] == [(listener.port, "job-dp3")]
    assert done.engines[0].compat_hash == (compatibility_hash("job") if gen.wrapped else "")
    assert "engine ID mismatch: expected job-dp9, got job-dp3" in probe(expect_engine_id="job-dp9").error
    if gen.wrapped:
        assert "compatibility hash mismatch" in probe(expect_hash=compatibility_hash("other-job")).error


def test_unknown_rank_and_garbage_are_answered_and_the_listener_keeps_serving(listener):
    reply = vllm_client_request(listener.port, [b"get_meta_msg", 0, 7])
    assert msgspec.msgpack.decode(reply[0]) == {"error": "unknown rank pp 0 tp 7"}
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
    assert b"not a handshake request" in dealer.recv_multipart()[-1]
    dealer.close()
    assert handshake("127.0.0.1", listener.port).reply.metadata.engine_id == "job-dp3"
    assert listener.requests_rejected >= 9


def test_client_reports_an_error_reply_clearly(listener):
    with pytest.raises(HandshakeError, match="listener answered an error: unknown rank pp 0 tp 5"):
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
        assert handshake("::1", port, source="::1").reply.metadata.engine_id == "e6"
    finally:
        stop.set()
        t.join()
        lst.close()


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.binary(max_size=20)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
bodies = st.one_of(
    st.just(b"get_meta_msg"),
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
    if reply is not None and reply[2] not in (lst.payloads[0], wire.bare_metadata(lst.payloads[0])):
        assert "error" in msgspec.msgpack.decode(reply[2])
