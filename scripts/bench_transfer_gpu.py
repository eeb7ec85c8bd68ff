#!/usr/bin/env python3
"""GPU-to-GPU bandwidth of `check --transfer --transfer-memory gpu` against a raw NIXL script doing the same READs
(the floor for launcher's overhead) and a device-to-device copy of the same size (the physical limit), in one run.

    python3 scripts/bench_transfer_gpu.py --bytes 64M      # on a machine with an NVIDIA GPU, NIXL built with CUDA

Two ranks on one GPU: launcher's check, each rank READing the other's buffer
(best of two warm reads, as the check reports); the raw script: two
processes that each serve a registered VRAM buffer and READ the other's with
NIXL the same way and at the same time (UCX_TLS as launcher sets it), and
once with one reader alone; the copy: torch's device-to-device copy of a
buffer of that size on the same GPU, bytes counted once, as a read counts
them.
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


def _rank(me: int, nbytes: int, mine, theirs, start, done, out, reads: bool) -> None:
    """One of two processes: serve a VRAM buffer, and READ the other's, at the same moments as the other reads
    this one's (launcher's check runs every rank's reads at once, each rank its peers in turn)."""
    import torch
    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(f"raw-{me}", nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    served = torch.full((nbytes,), 7 + me, dtype=torch.uint8, device="cuda")
    scratch = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    for tensor in (served, scratch):
        agent.register_memory(agent.get_reg_descs([(tensor.data_ptr(), nbytes, 0, "")], "VRAM"))
    mine.send((agent.get_agent_metadata(), served.data_ptr()))
    metadata, address = theirs.recv()
    name = agent.add_remote_agent(metadata)
    local = agent.get_xfer_descs([(scratch.data_ptr(), nbytes, 0)], "VRAM")
    remote = agent.get_xfer_descs([(address, nbytes, 0)], "VRAM")
    start.wait()
    if not reads:  # serve: UCX's connection set-up needs this side's progress too
        while not done.is_set():
            agent.get_new_notifs()
            time.sleep(0.0002)
        return
    times = []
    for _ in range(3):
        scratch.zero_()
        torch.cuda.synchronize()
        begin = time.perf_counter()
        handle = agent.initialize_xfer("READ", local, remote, name)
        state = agent.transfer(handle)
        while state not in ("DONE", "ERR"):
            state = agent.check_xfer_state(handle)
        times.append(time.perf_counter() - begin)
        agent.release_xfer_handle(handle)
        if state != "DONE" or not bool((scratch == 8 - me).all()):
            raise RuntimeError(f"raw read {state}")
    out.send(nbytes / min(times[1:]) / 1e6)
    while not done.is_set():  # serve until the other has read too
        agent.get_new_notifs()
        time.sleep(0.0002)


def raw_nixl(nbytes: int, both: bool = True) -> float:
    """MB/s (the better of the two readers) of raw NIXL READs between two processes on this GPU: both reading at
    once, as in launcher's check, or (``both`` off) one reading while the other only serves."""
    os.environ.setdefault("UCX_TLS", UCX_TLS)
    ctx = mp.get_context("spawn")
    start, done = ctx.Event(), ctx.Event()
    a_out, b_in = ctx.Pipe()
    b_out, a_in = ctx.Pipe()
    results = [ctx.Pipe() for _ in range(2)]
    procs = [
        ctx.Process(target=_rank, args=(0, nbytes, a_out, a_in, start, done, results[0][1], True)),
        ctx.Process(target=_rank, args=(1, nbytes, b_out, b_in, start, done, results[1][1], both)),
    ]
    for p in procs:
        p.start()
    time.sleep(0.5)
    start.set()
    if not both:
        mbps = results[0][0].recv()
        done.set()
    else:
        mbps = max(results[0][0].recv(), results[1][0].recv())
        done.set()
    for p in procs:
        p.join(30)
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
    runs = [
        (launcher_check(args.bytes), raw_nixl(args.bytes), raw_nixl(args.bytes, both=False), device_copy(args.bytes))
        for _ in range(args.rounds)
    ]
    import statistics

    ours, used = statistics.median(r[0][0] for r in runs), runs[-1][0][1]
    raw, alone, copy = (statistics.median(r[i] for r in runs) for i in (1, 2, 3))
    print(f"medians of {args.rounds} alternating runs", file=sys.stderr)
    print(f"{args.bytes >> 20} MiB, one GPU, two ranks; UCX used: {used}")
    print(format_table([
        ("WHAT", "GB/s", "vs raw NIXL", "vs device copy"),
        ("launcher check --transfer", f"{ours / 1000:.1f}", f"{ours / raw:.2f}x", f"{ours / copy:.2f}x"),
        ("raw NIXL READ, both ranks at once", f"{raw / 1000:.1f}", "1.00x", f"{raw / copy:.2f}x"),
        ("raw NIXL READ, one reader", f"{alone / 1000:.1f}", f"{alone / raw:.2f}x", f"{alone / copy:.2f}x"),
        ("torch device-to-device copy", f"{copy / 1000:.1f}", f"{copy / raw:.2f}x", "1.00x"),
    ]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
