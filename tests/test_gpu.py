"""On a machine with an NVIDIA GPU: check --transfer in GPU memory, and --gpus-per-rank against the real nvidia-smi.

Marked ``gpu``: collected everywhere, run only where ``nvidia-smi -L`` lists a
GPU (elsewhere deselected, so a CPU CI run reports nothing skipped). Run on
the lent GPU machine with ``python3 -m pytest -m gpu tests/test_gpu.py``; the
parsing of nvidia-smi's output is also tested without a GPU, from recorded
output, in ``test_recorded_nvidia_smi_output``.
"""

import json
import pathlib

import pytest

from conftest import run_launcher, write_hostfile
from launcher.gpus import parse_nvidia_smi_list

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def test_recorded_nvidia_smi_output():
    """A whole GPU is given by index; a GPU split into MIG instances by its instances' UUIDs."""
    h100 = (FIXTURES / "nvidia-smi-L-h100.txt").read_text()  # recorded on the lent H100 machine
    assert parse_nvidia_smi_list(h100) == ("0",)
    mig = (FIXTURES / "nvidia-smi-L-mig.txt").read_text()  # the format of NVIDIA's MIG user guide
    assert parse_nvidia_smi_list(mig) == ("MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f", "MIG-cba663e8-9bed-5b25-b243-5985ef7c9beb", "1")
    assert parse_nvidia_smi_list("No devices were found\n") == ()


def transfer_check(tmp_path, port_base, *extra, env=None):
    hf = write_hostfile(tmp_path, "localhost slots=2\n")
    done = run_launcher(
        "check", "-H", hf, "--port-base", str(port_base), "--transfer", "--transfer-memory", "gpu", "--json", *extra,
        env={**NVLINK_MULTICAST_OFF, **(env or {})}, timeout=300,
    )  # fmt: skip
    assert done.stdout.strip(), done.stderr[-3000:]
    return json.loads(done.stdout), done


@pytest.mark.gpu
def test_two_ranks_on_one_gpu_read_each_others_gpu_memory_gpu_to_gpu(tmp_path, port_base, no_leaks):
    # UCX turns cuda_ipc reads off where it finds no NVLink (one GPU, or PCIe): this asks for them, as a vLLM
    # deployment on such a host would have to (UCX_ variables reach every rank through the allowlist).
    doc, done = transfer_check(tmp_path, port_base, "--transfer-bytes", "64M", env={"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y"})
    assert doc["ok"] and doc["transfer"]["ok"], done.stderr[-3000:]
    pairs = doc["transfer"]["pairs"]
    assert len(pairs) == 2 and all(p["ok"] for p in pairs)  # every byte verified on the device, both ways
    for p in pairs:
        assert "cuda_ipc" in p["used"] and "staged" not in p["used"], p  # GPU to GPU, not through host memory
        assert p["mbps"] > 1000, p


@pytest.mark.gpu
def test_gpu_memory_staged_through_host_memory_is_marked(tmp_path, port_base, no_leaks):
    # UCX's default here (one GPU, no NVLink): cuda_ipc reads off, GPU memory staged through host memory over TCP.
    doc, done = transfer_check(tmp_path, port_base, "--transfer-bytes", "4M", env={"UCX_TLS": "tcp,cuda_copy"})
    assert doc["transfer"]["ok"], done.stderr[-3000:]
    for p in doc["transfer"]["pairs"]:
        assert p["used"].endswith("[GPU memory staged through host memory]"), p


@pytest.mark.gpu
def test_gpus_per_rank_gives_each_rank_the_real_device_and_the_plan_says_so(tmp_path, port_base, no_leaks):
    hf = write_hostfile(tmp_path, "localhost\n")
    shown = run_launcher(
        "run", "-H", hf, "--port-base", str(port_base), "--gpus-per-rank", "1", "--to-completion", "--",
        "python3", "-c", "import os, torch; print('cuda', os.environ['CUDA_VISIBLE_DEVICES'], torch.cuda.device_count())",
        env=NVLINK_MULTICAST_OFF, timeout=120,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "[r0 localhost] cuda 0 1" in shown.stdout
    (tmp_path / "two").mkdir()
    two = write_hostfile(tmp_path / "two", "localhost slots=2\n")  # beside hf, not over it
    over = run_launcher("run", "-H", two, "--gpus-per-rank", "1", "--to-completion", "--", "true")
    assert over.returncode == 4 and "needs 2 GPUs on localhost, which has 1 (nvidia-smi -L: 0)" in over.stderr
    plan = run_launcher("plan", "-H", hf, "--gpus-per-rank", "1").stdout
    assert "CUDA_VISIBLE_DEVICES=<1 GPUs, chosen on the host>" in plan
    check = run_launcher("check", "-H", hf, "--port-base", str(port_base), timeout=120)
    assert check.returncode == 0 and "all 1 handshakes ok" in check.stdout
