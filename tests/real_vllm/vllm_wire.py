"""The side-channel wire, both directions, with vLLM's own code (run in the vLLM venv).

    PYTHONPATH=REPO VLLM_PYTHON tests/real_vllm/vllm_wire.py

Prints one JSON object with what happened; tests/test_real_vllm.py asserts on it.

1. launcher's client against vLLM's real listener thread
   (``NixlBaseConnectorScheduler._nixl_handshake_listener``) serving a payload
   built with vLLM's own dataclasses; then a request of the older generation,
   which kills vLLM's listener thread (later requests go unanswered).
2. vLLM's real client (``NixlBaseConnectorWorker._nixl_handshake``, run with a
   small stand-in for ``self``) against launcher's listener serving the
   built-in engine core's payload.
3. vLLM's listener on a port another program holds.
"""

import json
import threading
import types

import msgspec
import zmq
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_scheduler, base_worker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import metadata as vmeta

from launcher import protocol
from launcher.agent import probe_peer
from launcher.engine_core import builtin_payload
from launcher.vllm import wire
from launcher.vllm.sidechannel import HandshakeError, SideChannelListener, handshake

HOST = "127.0.0.1"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def vllm_payload(engine_id: str, compat_hash: str) -> bytes:
    """What a vLLM 0.32 engine core serves, built with vLLM's dataclasses and encoder."""
    meta = vmeta.NixlAgentMetadata(
        engine_id=engine_id,
        agent_metadata=b"nixl-agent-bytes",
        kv_caches_base_addr=[4096, 8192],
        device_id=0,
        num_blocks=10,
        block_lens=[2048, 2048],
        block_strides=[2048, 2048],
        kv_cache_layout="HND",
        block_size=16,
        ssm_sizes=(0, 0),
        attn_backend_name="CPU_ATTN",
        physical_blocks_per_logical_kv_block=1,
        region_names=["layer.0"],
        ple_block_len=None,
    )
    encoder = msgspec.msgpack.Encoder()
    return encoder.encode(vmeta.NixlHandshakePayload(compatibility_hash=compat_hash, agent_metadata_bytes=encoder.encode(meta)))


def launcher_client_against_vllm_listener() -> dict:
    port, engine, compat = free_port(), "vllm-engine_dp0", "ab" * 32
    ready, stop = threading.Event(), threading.Event()
    listener = threading.Thread(
        target=base_scheduler.NixlBaseConnectorScheduler._nixl_handshake_listener,
        args=({(0, 0): vllm_payload(engine, compat)}, ready, stop, HOST, port),
        daemon=True,
    )
    listener.start()
    ready.wait(5)
    out = {}
    reply = handshake(HOST, port, wire.BY_NAME["v2"], timeout=3).reply
    out["v2"] = {
        "engine_id": reply.metadata.engine_id,
        "compat_hash": reply.compat_hash,
        "block_lens": reply.metadata.block_lens,
        "attn_backend_name": reply.metadata.attn_backend_name,
        "remote_time": reply.remote_time is not None,
    }
    me = protocol.Ready(rank=1, address=HOST, port=0, pid=0, rule="", engine_id="")
    probe = probe_peer(me, protocol.Peer(rank=0, address=HOST, ports=[port], wire="v2"), timeout=3)
    out["probe"] = {"ok": probe.ok, "error": probe.error, "engines": [[e.port, e.engine_id, e.compat_hash] for e in probe.engines]}
    # A request of the older generation: vLLM's listener cannot unpack it and its thread dies.
    try:
        handshake(HOST, port, wire.BY_NAME["v1"], timeout=2)
        out["v1"] = "answered"
    except HandshakeError as exc:
        out["v1"] = str(exc)
    listener.join(2)
    out["listener_alive_after_v1"] = listener.is_alive()
    try:
        handshake(HOST, port, wire.BY_NAME["v2"], timeout=2)
        out["v2_after_v1"] = "answered"
    except HandshakeError as exc:
        out["v2_after_v1"] = str(exc)
    stop.set()
    return out


def vllm_listener_on_a_busy_port() -> dict:
    """vLLM's listener thread when its port is taken: it dies before signalling ready, and
    vLLM waits on that signal with no timeout (set_xfer_handshake_metadata): the engine core hangs."""
    import socket

    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        errors = []
        threading.excepthook = lambda args: errors.append(
            f"{type(args.exc_value).__module__}.{type(args.exc_value).__name__}: {args.exc_value}"
        )
        ready, stop = threading.Event(), threading.Event()
        thread = threading.Thread(
            target=base_scheduler.NixlBaseConnectorScheduler._nixl_handshake_listener,
            args=({(0, 0): b""}, ready, stop, HOST, port),
            daemon=True,
        )
        thread.start()
        thread.join(5)
        return {"thread_alive": thread.is_alive(), "ready": ready.wait(1), "error": errors[0] if errors else "", "port": port}


class _Topology:
    def handshake_target_ranks(self, remote_tp_size, remote_dcp_size=1):
        return [0]


def vllm_client_against_launcher_listener() -> dict:
    port, job, engine = free_port(), "job1", "job1-dp3"
    listener = SideChannelListener(HOST, port, {0: builtin_payload(engine, job)})
    listener.bind()
    stop = threading.Event()
    threading.Thread(target=listener.serve, args=(stop,), daemon=True).start()
    added = []
    worker = types.SimpleNamespace(
        _is_csa_linear=False,
        use_host_buffer=True,
        transfer_topo=_Topology(),
        pcp_size=1,
        dcp_size=1,
        compat_hash=wire.compatibility_hash(job),
        enforce_compat_hash=True,
        add_remote_agent=lambda meta, rank, tp, dcp: added.append(meta) or f"agent-{meta.engine_id}",
    )
    worker._validate_remote_parallel_config = types.MethodType(base_worker.NixlBaseConnectorWorker._validate_remote_parallel_config, worker)
    client = types.MethodType(base_worker.NixlBaseConnectorWorker._nixl_handshake, worker)
    out = {}
    agents, _offset = client(HOST, port, 1, engine)
    out["agents"] = {f"{k[0]},{k[1]}": v for k, v in agents.items()}
    out["metadata_type"] = type(added[0]).__module__ + "." + type(added[0]).__name__
    out["metadata"] = {"engine_id": added[0].engine_id, "block_strides": added[0].block_strides, "ssm_sizes": list(added[0].ssm_sizes)}
    for name, kwargs in [("wrong_engine", {"expected_engine_id": "someone-else"}), ("wrong_hash", {})]:
        if name == "wrong_hash":
            worker.compat_hash = "0" * 64
        try:
            client(HOST, port, 1, kwargs.get("expected_engine_id", engine))
            out[name] = "accepted"
        except RuntimeError as exc:
            out[name] = str(exc).split(".")[0]
    out["served"] = listener.requests_served
    stop.set()
    return out


if __name__ == "__main__":
    zmq.Context.instance()
    print(
        json.dumps(
            {
                "launcher_to_vllm": launcher_client_against_vllm_listener(),
                "vllm_to_launcher": vllm_client_against_launcher_listener(),
                "busy_port": vllm_listener_on_a_busy_port(),
            }
        )
    )
