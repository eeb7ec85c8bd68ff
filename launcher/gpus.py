"""GPUs per rank (``--gpus-per-rank N``): which devices a host has, and each rank's slice of them.

Each rank gets its own ``CUDA_VISIBLE_DEVICES``: the devices its host offers,
split in order, ``N`` per rank (``N`` x its DP ranks for a ``--per-host``
process). A host's devices are, first found wins: the hostfile's ``gpus=``
(a list, ``gpus=0,1,4,5``, or a count, ``gpus=8``); the host's own
``CUDA_VISIBLE_DEVICES`` (Slurm sets it for a step with GPUs); Slurm's
per-node list (``SLURM_STEP_GPUS``, ``SLURM_JOB_GPUS``); ``nvidia-smi -L``.
An explicit setting wins over discovery, as every other per-host option does.
Asking for more than a host has is an error before any rank starts.

Pure but for ``nvidia_smi_devices``, the one probe.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Mapping

import msgspec

_NVIDIA_SMI_LINE = re.compile(r"^GPU (\d+):", re.M)
_NVIDIA_SMI_MIG = re.compile(r"^\s+MIG .*\(UUID: (MIG-[A-Za-z0-9/_.:-]{1,80})\)\s*$", re.M)
_DEVICE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # an index, a UUID (GPU-...), a MIG id (MIG-...)


class GpuError(ValueError):
    """Devices that cannot be given out; the message names the host, what was found where, and the fix."""


class Devices(msgspec.Struct, frozen=True):
    ids: tuple[str, ...]
    source: str  # where they were found, for messages: "gpus= in the hostfile", "nvidia-smi -L", ...


MAX_DEVICES = 1024  # devices one host may offer; a count from input is checked before anything is built for it


def parse_device_list(text: str) -> tuple[str, ...]:
    """'0,1,4' or 'GPU-uuid,...' -> its items; a bare count '8' -> '0'..'7'. Raises ValueError naming the bad item."""
    text = text.strip()
    if text.isascii() and text.isdigit():
        if int(text[:12]) > MAX_DEVICES or len(text) > 12:
            raise ValueError(f"{text[:20]}{'…' if len(text) > 20 else ''} devices is more than a host has (at most {MAX_DEVICES})")
        return tuple(str(i) for i in range(int(text)))
    if text.count(",") >= MAX_DEVICES:
        raise ValueError(f"{text.count(',') + 1} devices is more than a host has (at most {MAX_DEVICES})")
    items = tuple(t.strip() for t in text.split(","))
    for item in items:
        if not _DEVICE.fullmatch(item):
            raise ValueError(f"{item!r} is not a device index or id")
    if len(set(items)) != len(items):
        raise ValueError("a device is listed twice")
    return items


def discover(host_gpus: str | None, env: Mapping[str, str], nvidia_smi: Callable[[], tuple[str, ...] | None]) -> Devices | None:
    """The devices this host offers, first found wins (module docstring); None when nothing says."""
    if host_gpus:
        return _devices(host_gpus, "gpus= in the hostfile")
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible != "NoDevFiles":
        where = "Slurm's CUDA_VISIBLE_DEVICES for this step" if "SLURM_STEP_ID" in env else "CUDA_VISIBLE_DEVICES on the host"
        return _devices(visible, where)
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if env.get(name, "").strip():
            return _devices(env[name], f"{name} (Slurm)")
    found = nvidia_smi()
    if found is not None:
        return Devices(found, "nvidia-smi -L")
    return None


def _devices(text: str, source: str) -> Devices:
    try:
        return Devices(parse_device_list(text), source)
    except ValueError as exc:  # a host's own variable is input too: one line naming it, never a crash of its agent
        raise GpuError(f"{source}: {exc}; fix it, or give this host gpus=N in the hostfile") from None


def slice_for(devices: Devices | None, *, host: str, local_rank: int, served: int, per_rank: int, slots: int) -> str:
    """CUDA_VISIBLE_DEVICES for the process at ``local_rank`` serving ``served`` DP ranks of its host's ``slots``."""
    if devices is None:
        raise GpuError(
            f"--gpus-per-rank {per_rank}: no GPUs found on {host} (no gpus= in the hostfile, no CUDA_VISIBLE_DEVICES, "
            f"no SLURM_STEP_GPUS/SLURM_JOB_GPUS, no nvidia-smi); set gpus=N or gpus=0,1,... for this host"
        )
    need = per_rank * slots
    if need > len(devices.ids):
        raise GpuError(
            f"--gpus-per-rank {per_rank} x {slots} ranks needs {need} GPUs on {host}, which has {len(devices.ids)} "
            f"({devices.source}: {','.join(devices.ids)}); lower --gpus-per-rank or slots= for this host"
        )
    start = local_rank * per_rank
    return ",".join(devices.ids[start : start + per_rank * served])


def nvidia_smi_devices(timeout: float = 10.0) -> tuple[str, ...] | None:
    """Indices of the GPUs ``nvidia-smi -L`` lists; None without nvidia-smi or when it fails."""
    path = shutil.which("nvidia-smi")
    if path is None:
        return None
    try:
        done = subprocess.run([path, "-L"], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return parse_nvidia_smi_list(done.stdout)


def parse_nvidia_smi_list(text: str) -> tuple[str, ...]:
    """``nvidia-smi -L`` -> the devices a rank can be given: each GPU's index, or, for a GPU split into MIG
    instances, each instance's UUID (CUDA addresses MIG instances by UUID only)."""
    found: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        gpu = _NVIDIA_SMI_LINE.match(line)
        if not gpu:
            continue
        migs = []
        for after in lines[i + 1 :]:
            if _NVIDIA_SMI_LINE.match(after):
                break
            if m := _NVIDIA_SMI_MIG.match(after):
                migs.append(m.group(1))
        found += migs or [gpu.group(1)]
    return tuple(found)


def planned_slice(host_gpus: str | None, *, local_rank: int, served: int, per_rank: int, slots: int) -> str | None:
    """What the dry run can tell: the slice when the hostfile lists the devices, else None (found on the host)."""
    if not host_gpus:
        return None
    devices = Devices(parse_device_list(host_gpus), "gpus= in the hostfile")
    return slice_for(devices, host="", local_rank=local_rank, served=served, per_rank=per_rank, slots=slots)


def check_hostfile_gpus(text: str, slots: int, per_rank: int | None, host: str) -> None:
    """At plan time, for a host whose line says gpus=: the same oversubscription error, before anything starts."""
    if per_rank:
        slice_for(
            Devices(parse_device_list(text), "gpus= in the hostfile"), host=host, local_rank=0, served=1, per_rank=per_rank, slots=slots
        )
