"""Fuzzed multipart messages at a running rank's side channel, from a process of its own.

Run by tests/test_hostile.py with the rank's port and pid: pyzmq crashed the
pytest process itself once while it sent these ("Fatal Python error"), and a
crash of the client must fail one test, not the session. After each message
it checks that the rank answers a real handshake and stays under its memory
bound; prints one JSON line.

    python tests/support/sidechannel_fuzz.py PORT PID
"""

import json
import sys

import msgspec
import psutil
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.vllm import wire

MEMORY_BOUND = 150 * 2**20


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"


FRAMES = st.lists(
    st.one_of(
        st.binary(max_size=64),
        st.integers(1, 20000).map(_nested),  # nesting, past the size limit too
        st.binary(min_size=4000, max_size=9000),  # around libzmq's frame limit
        st.just(b"get_meta_msg"),
        st.tuples(st.sampled_from([b"get_meta_msg", b"x"]), st.integers(-3, 2**40)).map(lambda t: msgspec.msgpack.encode(list(t))),
    ),
    min_size=1,
    max_size=40,
)


def engine_id(ctx: zmq.Context, port: int) -> str:
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        sock.send(msgspec.msgpack.encode([b"get_meta_msg", 0, 0]))
        payload = msgspec.msgpack.decode(sock.recv_multipart()[0], type=wire.NixlHandshakePayload)
        return msgspec.msgpack.decode(payload.agent_metadata_bytes, type=wire.NixlAgentMetadata).engine_id
    finally:
        sock.close()


def main(port: int, pid: int) -> None:
    ctx, rank = zmq.Context(), psutil.Process(pid)
    seen = {"examples": 0, "answered": 0, "peak_rss": 0}

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(FRAMES)
    def send(frames):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send_multipart(frames)
        sock.close()
        seen["examples"] += 1
        assert engine_id(ctx, port).endswith("-dp0")
        seen["answered"] += 1
        rss = rank.memory_info().rss
        seen["peak_rss"] = max(seen["peak_rss"], rss)
        assert rss < MEMORY_BOUND, rss

    send()
    print(json.dumps(seen), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
