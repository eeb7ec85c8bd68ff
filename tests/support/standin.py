"""The stand-in ``vllm serve`` (tests/standin_vllm.py) and vLLM's side-channel handshake, asked as vLLM asks it."""

import json
import os
import re
import sys

import msgspec
import zmq

from launcher.vllm import wire

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STANDIN = os.path.join(REPO, "tests", "standin_vllm.py")

# A vllm serve's data-parallel flags as the long-form recipe writes them, for the hosts after the first.
VLLM_DP_FLAGS = (
    "--data-parallel-size", "{world_size}", "--data-parallel-size-local", "{local_size}",
    "--data-parallel-start-rank", "{host_first_rank}", "--data-parallel-address", "{head_ip}",
    "--data-parallel-rpc-port", "{rpc_port}",
)  # fmt: skip


def standin(*args):
    """argv of the stand-in `vllm serve` (tests/standin_vllm.py)."""
    return [sys.executable, STANDIN, "serve", "M", *args]


def standin_reports(lines):
    """What each stand-in saw, keyed by the host it ran on (from its `standin:` JSON line)."""
    found = {}
    for line in lines:
        m = re.match(r"^\[r(\d+)(?:-\d+)? (\S+)\] standin: (\{.*)$", line)
        if m:
            found[(int(m.group(1)), m.group(2))] = json.loads(m.group(3))
    return found


def vllm_handshake(address, port):
    """The engine id behind a side channel, asked as vLLM 0.26 and later ask: (msg, pp_rank, tp_rank)."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(f"tcp://{address}:{port}")
    sock.send(msgspec.msgpack.encode([b"get_meta_msg", 0, 0]))
    frames = sock.recv_multipart()
    sock.close()
    payload = msgspec.msgpack.decode(frames[0], type=wire.NixlHandshakePayload)
    return msgspec.msgpack.decode(payload.agent_metadata_bytes, type=wire.NixlAgentMetadata).engine_id
