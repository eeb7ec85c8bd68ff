"""A stand-in for `vllm serve` on the points the launcher must get right.

vLLM cannot run here (no GPU, no model), so tests launch this instead. It is
written from vLLM's documented behaviour, not from launcher's code (it imports
nothing of launcher), so a test passing means launcher drives *vLLM's* rules:

- data parallelism from the CLI (``--data-parallel-size``, ``-size-local``,
  ``-start-rank``, ``-rank``, ``--headless``); with no DP on the CLI,
  ``VLLM_DP_RANK``/``VLLM_DP_SIZE`` are applied silently, as vLLM does;
- vLLM 0.32's load-balancing rules: a start rank on a host that is not
  headless means hybrid load balancing (external when its local size is 1,
  which a non-MoE model refuses), and then the API server refuses headless
  peers, which say hello on ``--data-parallel-address:--data-parallel-rpc-port``
  (``RuntimeError: Remote engine N must not use --headless in external or
  hybrid dp lb mode``); in the default (internal) mode it refuses peers that
  are not headless;
- one NIXL side-channel ROUTER per local DP rank at
  ``tcp://{VLLM_NIXL_SIDE_CHANNEL_HOST or localhost}:{VLLM_NIXL_SIDE_CHANNEL_PORT or 5600 + dp_index}``;
- a bind that fails (an address that is not local, a port another program
  holds) prints vLLM's error (``zmq.error.ZMQError: Cannot assign requested
  address``) and then hangs, as vLLM 0.32 does: its listener thread dies
  before signalling ready, and the engine core waits for the signal forever;
- the listener serves the v2 wire (``[b"get_meta_msg", pp_rank, tp_rank]``
  -> payload, time) and, as vLLM's does, its thread dies on a request of another
  arity, so later handshakes to it time out;
- without ``--headless`` it serves the API server's ``GET /health`` on ``--port``.

It prints one ``standin:`` line of JSON with what it saw (argv and env), for
tests to assert on, and exits 0 on SIGTERM. ``STANDIN_EXIT=N`` makes it exit
with N after binding (only the process serving DP rank ``STANDIN_EXIT_DP``, if
given); ``STANDIN_DELAY=S`` delays binding (a slow start).
"""

from __future__ import annotations

import argparse
import http.server
import itertools
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid

import msgspec
import zmq


def parse(argv):
    p = argparse.ArgumentParser(prog="vllm")
    p.add_argument("subcommand", choices=["serve"])
    p.add_argument("model")
    p.add_argument("--data-parallel-size", "-dp", type=int)
    p.add_argument("--data-parallel-size-local", "-dpl", type=int)
    p.add_argument("--data-parallel-start-rank", "-dpr", type=int)
    p.add_argument("--data-parallel-rank", "-dpn", type=int)
    p.add_argument("--data-parallel-address")
    p.add_argument("--data-parallel-rpc-port", type=int, default=29550)
    p.add_argument("--headless", action="store_true")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--kv-transfer-config")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--data-parallel-backend", "-dpb", default="mp")
    p.add_argument("--nnodes", "-n", type=int, default=1)
    p.add_argument("--node-rank", "-r", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29501)
    p.add_argument("--tag", action="append", default=[], help="free text, echoed back (quoting tests)")
    return p.parse_args(argv)


def dp_ranks(args, env):
    if args.data_parallel_size is None:  # vLLM: env applies only when the CLI sets no DP
        size = int(env.get("VLLM_DP_SIZE", "1"))
        return size, [int(env.get("VLLM_DP_RANK", "0"))]
    if args.data_parallel_rank is not None:
        return args.data_parallel_size, [args.data_parallel_rank]
    local = args.data_parallel_size_local or args.data_parallel_size
    start = args.data_parallel_start_rank or 0
    return args.data_parallel_size, list(range(start, start + local))


def lb_mode(args) -> str:
    """vLLM 0.32's choice (EngineArgs.create_engine_config): internal, hybrid or external load balancing."""
    size = args.data_parallel_size or 1
    local = args.data_parallel_size_local
    if args.data_parallel_rank is not None:
        return "external"
    if local is not None and args.data_parallel_start_rank is not None and not args.headless and local < size:
        return "external" if local == 1 else "hybrid"
    return "internal"


def coordinate(args, mode: str, first_rank: int, engines: list) -> None:
    """The DP handshake on the RPC port, reduced to the rule that refuses mixed modes. Headless engines tell
    the API server where their side channels are: in the internal mode it balances requests over them too."""
    address, port = args.data_parallel_address or "127.0.0.1", args.data_parallel_rpc_port
    if not args.headless and first_rank == 0:
        server = socket.create_server((address, port), reuse_port=False)

        def accept():
            while True:
                conn, _ = server.accept()
                hello = json.loads(conn.makefile().readline() or "{}")
                headless = hello.get("headless")
                if headless is not None and headless != (mode == "internal"):
                    need = "must not use" if headless else "must use"
                    why = "in external or hybrid dp lb mode" if headless else "unless in external or hybrid dp lb mode"
                    print(f"RuntimeError: Remote engine {hello.get('rank')} {need} --headless {why}", file=sys.stderr, flush=True)
                    os._exit(1)
                if headless:
                    Health.engines.extend(tuple(e) for e in hello.get("engines", ()))
                conn.close()

        threading.Thread(target=accept, daemon=True).start()
    elif args.headless or first_rank > 0:

        def hello():
            for _ in range(600):
                try:
                    with socket.create_connection((address, port), timeout=1) as conn:
                        said = {"rank": first_rank, "headless": args.headless, "engines": engines}
                        conn.sendall(json.dumps(said).encode() + b"\n")
                        return
                except OSError:
                    time.sleep(0.1)

        threading.Thread(target=hello, daemon=True).start()


def check_nodes(args) -> str | None:
    """vLLM 0.32's checks of multi-node flags (EngineArgs.create_engine_config), its words; None when they pass."""
    world = (args.data_parallel_size or 1) * args.pipeline_parallel_size * args.tensor_parallel_size
    if args.nnodes > 1 and args.data_parallel_backend != "mp":
        return f"`--nnodes {args.nnodes}` requires `--data-parallel-backend mp`"
    if args.nnodes > 1 and world % args.nnodes:
        return f"`--nnodes {args.nnodes}` must evenly divide the total world size ({world})"
    if not 0 <= args.node_rank < args.nnodes:
        return f"`--node-rank` must be between 0 and {args.nnodes - 1}; got `--node-rank {args.node_rank}`"
    return None


def join_nodes(args) -> None:
    """The multiprocessing executor's rendezvous, reduced: node 0 listens on the master port, the others connect."""
    if args.nnodes <= 1:
        return
    if args.node_rank == 0:
        server = socket.create_server((args.master_addr, args.master_port))
        threading.Thread(target=lambda: [server.accept() for _ in range(args.nnodes - 1)], daemon=True).start()
        return

    def hello():
        for _ in range(600):
            try:
                with socket.create_connection((args.master_addr, args.master_port), timeout=1):
                    print(f"standin: node {args.node_rank} joined {args.master_addr}:{args.master_port}", flush=True)
                    return
            except OSError:
                time.sleep(0.1)

    threading.Thread(target=hello, daemon=True).start()


def payload(engine_id: str) -> bytes:
    metadata = msgspec.msgpack.encode(
        {
            "engine_id": engine_id,
            "agent_metadata": b"standin",
            "kv_caches_base_addr": [0],
            "device_id": 0,
            "num_blocks": 1,
            "block_lens": [16],
            "kv_cache_layout": "HND",
            "block_size": 16,
        }
    )
    compat = os.environ.get("STANDIN_COMPAT_HASH", "standin")  # vLLM: a hash of its version, model and config
    return msgspec.msgpack.encode({"compatibility_hash": compat, "agent_metadata_bytes": metadata})


def serve_side_channel(sock, engine_id: str) -> None:
    """vLLM's listener loop: any request it does not expect ends the thread."""
    while True:
        try:
            identity, _, body = sock.recv_multipart()
        except zmq.ZMQError:
            return
        request = msgspec.msgpack.decode(body)
        if not (isinstance(request, list) and len(request) == 3 and request[0] == b"get_meta_msg" and request[2] == 0):
            print(f"standin: listener for {engine_id} died on request {request!r}", file=sys.stderr, flush=True)
            return
        sock.send_multipart([identity, b"", payload(engine_id), msgspec.msgpack.encode(time.perf_counter())])


class UvicornLikeServer(http.server.ThreadingHTTPServer):
    """vLLM's API server is uvicorn, whose accept queue holds 2048 (the standard library's holds 5)."""

    request_queue_size = 2048
    daemon_threads = True


class Health(http.server.BaseHTTPRequestHandler):
    """The API server: /health, and completions that speak vLLM's P/D protocol with the NixlConnector."""

    protocol_version = "HTTP/1.1"  # as uvicorn: a streamed answer is chunked
    engines: list = []  # (engine id, side-channel host, port) of every engine of the DP group, the headless ones' too
    turn = itertools.count()
    host = ""

    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        kv = body.get("kv_transfer_params") or {}
        answer = {"id": "standin", "choices": [{"index": 0, "text": "x" * body.get("max_tokens", 16)}]}
        if kv.get("do_remote_decode"):  # a prefill: keep the KV on the engine that ran it, tell the decoder where
            engine, host, port = self.engines[next(self.turn) % len(self.engines)]
            answer["kv_transfer_params"] = {
                "do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [1, 2],
                "remote_engine_id": engine, "remote_host": host, "remote_port": port,
            }  # fmt: skip
        elif kv.get("remote_host"):  # a decode: pull from the prefill engine, over its side channel
            try:
                seen = pull(kv["remote_host"], kv["remote_port"])
            except Exception as exc:  # any failure is the request's
                return self.reply(500, {"error": {"message": f"pull from {kv['remote_host']}:{kv['remote_port']} failed: {exc}"}})
            if seen != kv.get("remote_engine_id"):
                return self.reply(500, {"error": {"message": f"engine ID mismatch: {seen} is not {kv.get('remote_engine_id')}"}})
            answer["pulled_from"] = f"{kv['remote_host']}:{kv['remote_port']}"
        answer["usage"] = {"completion_tokens": body.get("max_tokens", 16)}
        answer["served_by"] = self.host
        answer["kv_seen"] = kv
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in (json.dumps(answer), "[DONE]"):
                data = f"data: {event}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.write(b"0\r\n\r\n")
            return
        self.reply(200, answer)

    def reply(self, status, document):
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def pull(host: str, port: int) -> str:
    """What a vLLM decoder does first with a prefill's kv_transfer_params: the v2 handshake; the engine id it got."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        sock.connect(f"tcp://{'[' + host + ']' if ':' in host else host}:{port}")
        sock.send(msgspec.msgpack.encode([b"get_meta_msg", 0, 0]))
        payload = msgspec.msgpack.decode(sock.recv_multipart()[0])
        return msgspec.msgpack.decode(payload["agent_metadata_bytes"])["engine_id"]
    finally:
        sock.close()


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    env = os.environ
    size, ranks = dp_ranks(args, env)
    mode = lb_mode(args)
    if mode == "external" and size > 1 and "moe" not in args.model.lower():
        print("ValueError: Non-MoE models do not support external data parallel mode.", file=sys.stderr, flush=True)
        return 1
    refused = check_nodes(args)
    if refused:
        print(f"ValueError: Invalid data-parallel launch options: {refused}", file=sys.stderr, flush=True)
        return 1
    host = env.get("VLLM_NIXL_SIDE_CHANNEL_HOST", "localhost")
    base = int(env.get("VLLM_NIXL_SIDE_CHANNEL_PORT", "5600"))
    config = json.loads(args.kv_transfer_config) if args.kv_transfer_config else {}
    engine = config.get("engine_id") or uuid.uuid4().hex[:8]
    seen = {
        "argv": sys.argv[1:] if argv is None else argv,
        "dp_size": size,
        "dp_ranks": ranks,
        "lb_mode": mode,
        "side_channel_host": host,
        "side_channel_port": base,
        "vllm_host_ip": env.get("VLLM_HOST_IP"),
        "headless": args.headless,
        "nodes": {"nnodes": args.nnodes, "node_rank": args.node_rank, "master": f"{args.master_addr}:{args.master_port}"},
        "tags": args.tag,
        "launcher_vars": sorted(k for k in env if k.startswith("LAUNCHER_")),
        "env": {k: v for k, v in env.items() if k.startswith(("VLLM_", "STANDIN_", "HF_", "CUDA_", "GLOO_"))},
    }
    print("standin: " + json.dumps(seen), flush=True)
    time.sleep(float(env.get("STANDIN_DELAY", "0")))

    join_nodes(args)
    ctx = zmq.Context()
    for dp in [] if args.nnodes > 1 and args.headless else ranks:  # a headless node's workers serve no side channel
        sock = ctx.socket(zmq.ROUTER)
        endpoint = f"tcp://{host}:{base + dp}"
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            print(f"zmq.error.ZMQError: {exc}", file=sys.stderr, flush=True)  # the last line of vLLM's traceback
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            threading.Event().wait()  # vLLM: ready_event.wait() with no timeout
        threading.Thread(target=serve_side_channel, args=(sock, f"{engine}_dp{dp}"), daemon=True).start()
        print(f"standin: side channel for DP rank {dp} at {endpoint}", flush=True)
    engines = [(f"{engine}_dp{dp}", host, base + dp) for dp in ranks]
    Health.engines, Health.host = list(engines), host
    if size > 1:
        coordinate(args, mode, ranks[0], engines)
    if not args.headless:
        server = UvicornLikeServer((host, args.port), Health)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print(f"standin: API server at http://{host}:{args.port}", flush=True)
        print("INFO:     Application startup complete.", flush=True)  # uvicorn's line, as vLLM's API server prints it

    if "STANDIN_EXIT" in env and int(env.get("STANDIN_EXIT_DP", ranks[0])) in ranks:
        time.sleep(0.3)
        print("standin: exiting as asked", file=sys.stderr, flush=True)
        return int(env["STANDIN_EXIT"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
