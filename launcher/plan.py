"""The launch plan: who runs where, on which port, with which environment.

Pure data and pure functions: nothing here touches the network, the process
table or the clock. ``build`` turns parsed hosts, options and the head's
environment into a frozen ``LaunchPlan`` that the supervisor executes and that
``launcher plan`` prints as a dry run.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from . import envpolicy

DEFAULT_PORT_BASE = 5600  # vLLM's VLLM_NIXL_SIDE_CHANNEL_PORT default
BUILTIN_ENGINE = ("{python}", "-m", "launcher.engine_core")

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class PlanError(ValueError):
    """A launch that cannot be planned; the message names the culprit and the fix."""


@dataclass(frozen=True)
class Host:
    """One line of a hostfile (or one node of an allocation)."""

    name: str
    slots: int = 1
    user: str | None = None
    port: int | None = None
    ifname: str | None = None
    cidr: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    python: str | None = None
    cwd: str | None = None
    origin: str = ""  # "path:line", for error messages

    @property
    def is_loopback(self) -> bool:
        return is_loopback_name(self.name)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.origin})" if self.origin else self.name


def is_loopback_name(name: str) -> bool:
    """True for ``localhost`` and loopback literals (127.0.0.0/8, ::1)."""
    if name.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class LaunchOptions:
    """What the user chose for the whole job (CLI flags or API arguments)."""

    port_base: int | None = None  # None: head's VLLM_NIXL_SIDE_CHANNEL_PORT, else 5600
    env: tuple[tuple[str, str], ...] = ()  # --env K=V, applied to every rank
    env_include: tuple[str, ...] = ()  # --env-include NAME or PREFIX*
    ready_timeout: float = 60.0
    grace: float = 5.0  # SIGTERM -> SIGKILL
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 15.0


@dataclass(frozen=True)
class RankSpec:
    """One engine-core rank: its identity, port, command and environment."""

    rank: int  # global rank == data-parallel rank
    local_rank: int
    host_index: int
    host: str
    world_size: int
    local_size: int
    port: int  # side-channel port: base + rank, as vLLM binds it
    engine_id: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(hash=False)
    env_report: envpolicy.EnvReport = field(hash=False)


@dataclass(frozen=True)
class HostPlan:
    host: Host
    index: int
    ranks: tuple[RankSpec, ...]


@dataclass(frozen=True)
class LaunchPlan:
    job_id: str
    hosts: tuple[HostPlan, ...]
    options: LaunchOptions
    port_base: int
    warnings: tuple[str, ...] = ()

    @property
    def ranks(self) -> tuple[RankSpec, ...]:
        return tuple(r for h in self.hosts for r in h.ranks)

    @property
    def world_size(self) -> int:
        return sum(len(h.ranks) for h in self.hosts)


def build(
    hosts: Sequence[Host],
    options: LaunchOptions,
    head_env: Mapping[str, str],
    job_id: str,
) -> LaunchPlan:
    """Assign ranks to hosts in hostfile order and compute every rank's env."""
    if not hosts:
        raise PlanError("no hosts to launch on: the hostfile lists none; add a line such as 'localhost slots=2'")
    _check_job_env(options.env)
    for host in hosts:
        _check_host_env(host)
    port_base = _port_base(options, head_env)
    world_size = sum(h.slots for h in hosts)
    last_port = port_base + world_size - 1
    if last_port > 65535:
        raise PlanError(
            f"side-channel ports {port_base}..{last_port} run past 65535 for {world_size} ranks; "
            f"choose a lower --port-base"
        )
    argv = BUILTIN_ENGINE
    policy = envpolicy.EnvPolicy(include=tuple(options.env_include))

    host_plans, rank = [], 0
    for index, host in enumerate(hosts):
        ranks = []
        for local_rank in range(host.slots):
            rank_vars = {
                "VLLM_NIXL_SIDE_CHANNEL_PORT": str(port_base),  # one value per job; vLLM adds the DP index
                "LAUNCHER_JOB_ID": job_id,
                "LAUNCHER_RANK": str(rank),
                "LAUNCHER_LOCAL_RANK": str(local_rank),
                "LAUNCHER_WORLD_SIZE": str(world_size),
                "LAUNCHER_LOCAL_SIZE": str(host.slots),
                "LAUNCHER_HOST": host.name,
                "LAUNCHER_ENGINE_ID": f"{job_id}-dp{rank}",
            }
            if host.ifname:
                rank_vars["LAUNCHER_BIND_IFNAME"] = host.ifname
            if host.cidr:
                rank_vars["LAUNCHER_BIND_CIDR"] = host.cidr
            report = envpolicy.rank_environment(
                head_env, policy, job_env=options.env, host_env=host.env, rank_env=rank_vars
            )
            ranks.append(
                RankSpec(
                    rank=rank,
                    local_rank=local_rank,
                    host_index=index,
                    host=host.name,
                    world_size=world_size,
                    local_size=host.slots,
                    port=port_base + rank,
                    engine_id=rank_vars["LAUNCHER_ENGINE_ID"],
                    argv=argv,
                    env=report.env,
                    env_report=report,
                )
            )
            rank += 1
        host_plans.append(HostPlan(host=host, index=index, ranks=tuple(ranks)))

    return LaunchPlan(
        job_id=job_id,
        hosts=tuple(host_plans),
        options=options,
        port_base=port_base,
        warnings=tuple(_compile_hash_warnings(hosts)),
    )


def _port_base(options: LaunchOptions, head_env: Mapping[str, str]) -> int:
    if options.port_base is not None:
        base, source = options.port_base, "--port-base"
    elif "VLLM_NIXL_SIDE_CHANNEL_PORT" in head_env:
        raw, source = head_env["VLLM_NIXL_SIDE_CHANNEL_PORT"], "VLLM_NIXL_SIDE_CHANNEL_PORT in the environment"
        try:
            base = int(raw)
        except ValueError:
            raise PlanError(f"{source} is {raw!r}, not a port number; unset it or pass --port-base") from None
    else:
        return DEFAULT_PORT_BASE
    if not 1 <= base <= 65535:
        raise PlanError(f"side-channel port base {base} (from {source}) is not a port; use 1024..65535")
    return base


def _check_job_env(job_env: Sequence[tuple[str, str]]) -> None:
    for name, _ in job_env:
        if name in envpolicy.WORKER_SPECIFIC:
            raise PlanError(
                f"--env {name}=... would give every host the same value, but {name} is worker-specific "
                f"({envpolicy.WORKER_SPECIFIC[name]}); set it per host in the hostfile ('HOST env:{name}=VALUE') "
                f"or leave it to the launcher"
            )
        _check_not_reserved(name, "--env")


def _check_host_env(host: Host) -> None:
    for name, _ in host.env:
        if name == "VLLM_NIXL_SIDE_CHANNEL_PORT":
            raise PlanError(
                f"{host.label}: env:VLLM_NIXL_SIDE_CHANNEL_PORT must be one value for the whole job "
                f"(vLLM adds each rank's DP index, and the value is part of its compile-cache hash); use --port-base"
            )
        _check_not_reserved(name, f"{host.label}: env:")


def _check_not_reserved(name: str, where: str) -> None:
    if name.startswith(envpolicy.LAUNCHER_PREFIX):
        raise PlanError(f"{where}{name} uses the reserved LAUNCHER_ prefix, which the launcher sets itself; rename it")


def _compile_hash_warnings(hosts: Sequence[Host]) -> list[str]:
    """Per-host VLLM_* values that vLLM hashes make hosts compile separately."""
    names = sorted({name for h in hosts for name, _ in h.env if envpolicy.in_compile_hash(name)})
    return [
        f"{name} differs between hosts and is part of vLLM's compile-cache hash: each distinct value compiles separately"
        for name in names
        if len({dict(h.env).get(name) for h in hosts}) > 1
    ]


def render_argv(argv: Sequence[str], python: str) -> str:
    """The command as a shell would show it, with ``{python}`` filled in."""
    return shlex.join(python if a == "{python}" else a for a in argv)
