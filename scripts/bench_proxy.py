#!/usr/bin/env python3
"""The P/D proxy under load: requests/s and latency through it against direct requests, 64 clients at once.

    python scripts/bench_proxy.py [--clients 64] [--requests 2000] [--repeat 3]

Two stand-in vLLM instances (tests/standin_vllm.py: vLLM's P/D HTTP protocol,
and a decoder that pulls from the prefill's side channel over ZMQ as vLLM's
does) on loopback, 127.0.0.1 the prefill and 127.0.0.2 the decode. In this
process, alternating so every contender sees the same machine, ``--clients``
threads with keep-alive connections send ``--requests`` completions in all:

- direct, one instance: each request once to the decode instance (no KV pull):
  the least a request costs here;
- direct, P then D: what a client does by hand without a proxy: the prefill
  request, then the decode request with its kv_transfer_params (one pull);
- proxy: the same request to launcher's proxy (a process of its own, as the
  head is), which does the two steps.

It prints requests/s, median and p99 latency, failures, and the proxy's ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
from launcher.output.console import format_table  # noqa: E402
from launcher.vllm import disagg  # noqa: E402

STANDIN = os.path.join(REPO, "tests", "standin_vllm.py")
BODY = {"model": "m", "prompt": "the quick brown fox " * 20, "max_tokens": 8}


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def start_instance(address: str, api: int, side: int) -> subprocess.Popen:
    env = {**os.environ, "VLLM_NIXL_SIDE_CHANNEL_HOST": address, "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side)}
    argv = [sys.executable, STANDIN, "serve", "m", "--port", str(api)]  # its API server binds the side-channel host
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_proxy(prefill: str, decode: str, port: int) -> subprocess.Popen:
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from launcher.head.pd_proxy import PdProxy;"
        "p = PdProxy([sys.argv[2]], [sys.argv[3]], '127.0.0.1', int(sys.argv[4])); p.start(); print('up', flush=True); time.sleep(1e9)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, REPO, prefill, decode, str(port)], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    return proc


def wait_healthy(address: str, timeout: float = 30.0) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{address} did not answer /health")


class Client:
    """One keep-alive connection per upstream address."""

    def __init__(self):
        self.conns: dict[str, http.client.HTTPConnection] = {}

    def post(self, address: str, body: dict) -> dict:
        conn = self.conns.get(address)
        if conn is None:
            host, port = address.rsplit(":", 1)
            conn = self.conns[address] = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        data = reply.read()
        if reply.status != 200:
            raise OSError(f"HTTP {reply.status}: {data[:200]!r}")
        return json.loads(data)


def load(clients: int, requests: int, one) -> tuple[float, list[float], int]:
    """(wall seconds, latencies, failures) of ``requests`` calls of ``one(client)`` over ``clients`` threads."""
    latencies: list[float] = []
    failures = [0]
    left = [requests]
    lock = threading.Lock()

    def worker():
        client = Client()
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            start = time.perf_counter()
            try:
                one(client)
            except (OSError, http.client.HTTPException):
                with lock:
                    failures[0] += 1
                client.conns.clear()
                continue
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies, failures[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    prefill = f"127.0.0.1:{free_port('127.0.0.1')}"
    decode = f"127.0.0.2:{free_port('127.0.0.2')}"
    proxy = f"127.0.0.1:{free_port('127.0.0.1')}"
    procs = [
        start_instance("127.0.0.1", int(prefill.rsplit(":", 1)[1]), free_port("127.0.0.1")),
        start_instance("127.0.0.2", int(decode.rsplit(":", 1)[1]), free_port("127.0.0.2")),
    ]
    try:
        wait_healthy(prefill)
        wait_healthy(decode)
        procs.append(start_proxy(prefill, decode, int(proxy.rsplit(":", 1)[1])))

        def by_hand(client: Client) -> None:
            answer = client.post(prefill, disagg.prefill_request(BODY))
            client.post(decode, disagg.decode_request(BODY, answer))

        contenders = {
            "direct, one instance": lambda client: client.post(decode, BODY),
            "direct, P then D": by_hand,
            "proxy": lambda client: client.post(proxy, BODY),
        }
        runs: dict[str, list[tuple[float, list[float], int]]] = {name: [] for name in contenders}
        for _ in range(args.repeat):
            for name, one in contenders.items():
                runs[name].append(load(args.clients, args.requests, one))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()

    rows, rates = [], {}
    for name, results in runs.items():
        wall = statistics.median(r[0] for r in results)
        lat = sorted(x for r in results for x in r[1])
        failed = sum(r[2] for r in results)
        rates[name] = args.requests / wall
        p99 = lat[int(0.99 * (len(lat) - 1))] if lat else float("nan")
        rows.append((name, f"{rates[name]:.0f}", f"{statistics.median(lat) * 1000:.1f}", f"{p99 * 1000:.1f}", str(failed)))
    print(f"{args.clients} clients, {args.requests} requests a run, median of {args.repeat} runs (p99 over all)")
    print(format_table([("contender", "requests/s", "median ms", "p99 ms", "failed"), *rows]))
    for base in ("direct, one instance", "direct, P then D"):
        print(f"proxy requests/s vs {base}: {rates['proxy'] / rates[base]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
