"""A rank's environment contract: every LAUNCHER_* name, declared once.

The plan writes a ``RankIdentity`` into each rank's environment (``to_env``);
the agent adds ``HostFacts``, what only the host side knows; the rank (the
built-in engine core, or the bootstrap in front of a user command) reads
both back (``from_env``). Nothing else spells a LAUNCHER_* name. Pure.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import ClassVar

import msgspec

PREFIX = "LAUNCHER_"
PORT_VAR = "VLLM_NIXL_SIDE_CHANNEL_PORT"  # vLLM's own name: the job's side-channel base, one value per job


class RankEnvError(ValueError):
    """A rank's environment lacks what the launcher puts there; the message names the variable."""


def _read(env: Mapping[str, str], name: str, convert=str, optional: bool = False):
    raw = env.get(name)
    if raw is None or raw == "":
        if optional:
            return None
        raise RankEnvError(f"{name} is not set: this process runs as a rank only under launcher's agent")
    try:
        return convert(raw)
    except ValueError:
        raise RankEnvError(f"{name}={raw!r} is not {'a whole number' if convert is int else 'valid'}") from None


class RankIdentity(msgspec.Struct, frozen=True):
    """Who a rank is, as the head planned it."""

    job_id: str
    rank: int  # global DP rank (the first, for a process serving several)
    local_rank: int
    local_size: int
    world_size: int
    host: str
    host_index: int
    engine_id: str
    port_base: int  # VLLM_NIXL_SIDE_CHANNEL_PORT: vLLM adds the DP index
    ifname: str | None = None  # bind-address selectors from the hostfile or --ifname/--cidr
    cidr: str | None = None
    transfer_bytes: int | None = None  # the built-in core's NIXL buffer, when the check moves bytes (--transfer)
    transfer_memory: str | None = None  # where that buffer lives: host, gpu or auto (--transfer-memory)
    gpus_per_rank: int | None = None  # --gpus-per-rank: the agent gives the process its CUDA_VISIBLE_DEVICES slice
    host_gpus: str | None = None  # the hostfile's gpus= for its host

    NAMES: ClassVar[Mapping[str, str]] = {
        "job_id": "LAUNCHER_JOB_ID",
        "rank": "LAUNCHER_RANK",
        "local_rank": "LAUNCHER_LOCAL_RANK",
        "local_size": "LAUNCHER_LOCAL_SIZE",
        "world_size": "LAUNCHER_WORLD_SIZE",
        "host": "LAUNCHER_HOST",
        "host_index": "LAUNCHER_HOST_INDEX",
        "engine_id": "LAUNCHER_ENGINE_ID",
        "port_base": PORT_VAR,
        "ifname": "LAUNCHER_BIND_IFNAME",
        "cidr": "LAUNCHER_BIND_CIDR",
        "transfer_bytes": "LAUNCHER_TRANSFER_BYTES",
        "transfer_memory": "LAUNCHER_TRANSFER_MEMORY",
        "gpus_per_rank": "LAUNCHER_GPUS_PER_RANK",
        "host_gpus": "LAUNCHER_HOST_GPUS",
    }

    @property
    def port(self) -> int:
        """Its side-channel port, as vLLM computes it: base + DP index."""
        return self.port_base + self.rank

    def to_env(self) -> dict[str, str]:
        return {self.NAMES[name]: str(value) for name in self.__struct_fields__ if (value := getattr(self, name)) is not None}

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RankIdentity:
        values = {}
        for f in msgspec.structs.fields(cls):
            optional = f.default is None
            values[f.name] = _read(env, cls.NAMES[f.name], int if int in (f.type, *typing.get_args(f.type)) else str, optional)
        return cls(**values)


class HostFacts(msgspec.Struct, frozen=True):
    """What the agent knows about the rank's host and adds to its environment."""

    host_is_loopback: bool = False
    reached_address: str | None = None  # the host-local address the head reached it on
    head_ip: str | None = None  # the first host's own address, for {head_ip}
    control_fd: int | None = None  # the agent's pipe for Ready/RankError
    command_fd: int | None = None  # the agent's pipe to a built-in core (the transfer check)

    NAMES: ClassVar[Mapping[str, str]] = {
        "host_is_loopback": "LAUNCHER_HOST_IS_LOOPBACK",
        "reached_address": "LAUNCHER_REACHED_ADDRESS",
        "head_ip": "LAUNCHER_HEAD_IP",
        "control_fd": "LAUNCHER_CONTROL_FD",
        "command_fd": "LAUNCHER_COMMAND_FD",
    }

    def to_env(self) -> dict[str, str]:
        env = {self.NAMES["host_is_loopback"]: "1" if self.host_is_loopback else "0"}
        for name in ("reached_address", "head_ip", "control_fd", "command_fd"):
            if getattr(self, name) is not None:
                env[self.NAMES[name]] = str(getattr(self, name))
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HostFacts:
        return cls(
            host_is_loopback=env.get(cls.NAMES["host_is_loopback"]) == "1",
            reached_address=_read(env, cls.NAMES["reached_address"], optional=True),
            head_ip=_read(env, cls.NAMES["head_ip"], optional=True),
            control_fd=_read(env, cls.NAMES["control_fd"], int, optional=True),
            command_fd=_read(env, cls.NAMES["command_fd"], int, optional=True),
        )


CONTROL_FD_VAR = HostFacts.NAMES["control_fd"]
JOB_ID_VAR = RankIdentity.NAMES["job_id"]
