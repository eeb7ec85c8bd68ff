#!/usr/bin/env python3
"""GPU-to-GPU bandwidth of `check --transfer --transfer-memory gpu` against a raw NIXL script doing the same READs
(the floor for launcher's overhead) and a device-to-device copy of the same size (the physical limit), in one run.

    python3 scripts/bench_transfer_gpu.py --bytes 64M      # on a machine with an NVIDIA GPU, NIXL built with CUDA

Two ranks on one GPU: launcher's check, each rank READing the other's buffer
(best of two warm reads, as the check reports); the raw script: two
processes, one serving a registered VRAM buffer, the other READing it with
NIXL the same way (UCX_TLS as launcher sets it); the copy: torch's
device-to-device copy of a buffer of that size on the same GPU, bytes counted
once, as a read counts them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from launcher.argtypes import size  # noqa: E402
from launcher.output.table import format_table  # noqa: E402

UCX_TLS = "tcp,cuda_copy,cuda_ipc"
# UCX turns cuda_ipc reads off without NVLink (one GPU, or PCIe); both sides of the comparison ask for them.
os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")


def launcher_check(nbytes: int) -> tuple[float, str]:
    """(best MB/s over the two pairs, what UCX used) of launcher's own check."""
    with tempfile.TemporaryDirectory() as folder:
        hostfile = os.path.join(folder, "hosts")
        with open(hostfile, "w") as f:
            f.write("localhost slots=2\n")
        done = subprocess.run(
            [sys.executable, "-m", "launcher.cli", "check", "-H", hostfile, "--transfer", "--transfer-memory", "gpu",
             "--transfer-bytes", str(nbytes), "--json", "--port-base", "17600"],
            capture_output=True, text=True, timeout=300, cwd=REPO,
        )  # fmt: skip
    doc = json.loads(done.stdout)
    if not doc["transfer"] or not doc["transfer"]["ok"]:
        raise RuntimeError(done.stderr[-3000:])
    pairs = doc["transfer"]["pairs"]
    return max(p["mbps"] for p in pairs), pairs[0]["used"]


def _serve(nbytes: int, out, stop) -> None:
    import torch
    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent("raw-server", nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    buffer = torch.full((nbytes,), 7, dtype=torch.uint8, device="cuda")
    agent.register_memory(agent.get_reg_descs([(buffer.data_ptr(), nbytes, 0, "")], "VRAM"))
    out.send((agent.get_agent_metadata(), buffer.data_ptr()))
    while not stop.is_set():
        agent.get_new_notifs()
        time.sleep(0.0005)


def _read(nbytes: int, metadata: bytes, address: int, out) -> None:
    import torch
    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent("raw-client", nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    scratch = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    agent.register_memory(agent.get_reg_descs([(scratch.data_ptr(), nbytes, 0, "")], "VRAM"))
    name = agent.add_remote_agent(metadata)
    local = agent.get_xfer_descs([(scratch.data_ptr(), nbytes, 0)], "VRAM")
    remote = agent.get_xfer_descs([(address, nbytes, 0)], "VRAM")
    times = []
    for _ in range(3):
        scratch.zero_()
        torch.cuda.synchronize()
        start = time.perf_counter()
        handle = agent.initialize_xfer("READ", local, remote, name)
        state = agent.transfer(handle)
        while state not in ("DONE", "ERR"):
            state = agent.check_xfer_state(handle)
        times.append(time.perf_counter() - start)
        agent.release_xfer_handle(handle)
        if state != "DONE" or not bool((scratch == 7).all()):
            raise RuntimeError(f"raw read {state}")
    out.send(nbytes / min(times[1:]) / 1e6)


def raw_nixl(nbytes: int) -> float:
    """MB/s of the best of two warm raw NIXL READs between two processes on this GPU."""
    os.environ.setdefault("UCX_TLS", UCX_TLS)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    served, wanted = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(nbytes, wanted, stop))
    server.start()
    metadata, address = served.recv()
    got, sent = ctx.Pipe()
    client = ctx.Process(target=_read, args=(nbytes, metadata, address, sent))
    client.start()
    mbps = got.recv()
    client.join()
    stop.set()
    server.join()
    return mbps


def device_copy(nbytes: int) -> float:
    import torch

    source = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        target.copy_(source)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=size, default=64 << 20)
    parser.add_argument("--rounds", type=int, default=5, help="alternating runs of each; the medians are shown")
    args = parser.parse_args()
    runs = [(launcher_check(args.bytes), raw_nixl(args.bytes), device_copy(args.bytes)) for _ in range(args.rounds)]
    import statistics

    ours, used = statistics.median(r[0][0] for r in runs), runs[-1][0][1]
    raw, copy = statistics.median(r[1] for r in runs), statistics.median(r[2] for r in runs)
    print(f"medians of {args.rounds} alternating runs", file=sys.stderr)
    print(f"{args.bytes >> 20} MiB, one GPU, two ranks; UCX used: {used}")
    print(format_table([
        ("WHAT", "GB/s", "vs raw NIXL", "vs device copy"),
        ("launcher check --transfer", f"{ours / 1000:.1f}", f"{ours / raw:.2f}x", f"{ours / copy:.2f}x"),
        ("raw NIXL READ", f"{raw / 1000:.1f}", "1.00x", f"{raw / copy:.2f}x"),
        ("torch device-to-device copy", f"{copy / 1000:.1f}", f"{copy / raw:.2f}x", "1.00x"),
    ]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
