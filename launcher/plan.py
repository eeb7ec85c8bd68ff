"""The launch plan: who runs where, on which port, with which environment.

Pure data and pure functions: nothing here touches the network, the process
table or the clock. ``build`` turns parsed hosts, options and the head's
environment into a frozen ``LaunchPlan`` that the supervisor executes and that
``launcher plan`` prints as a dry run.

A rank's life in types, one record per place it is known:
``RankSpec`` (planned, here; its ``RankIdentity`` is who it is) ->
``protocol.RankLaunch`` (sent to its agent: the identity, its command, the
plan's environment) -> ``agent.spawn.RankProcess`` (on its host: its process,
pipes and ``ReadinessWatch``) -> ``job.RankState`` (seen by the head: phase,
address, pid, exit) -> ``results.RankResult`` (returned in the ``LaunchResult``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence

import msgspec
from msgspec.structs import replace

from . import envpolicy, netif, rankenv
from .command import BOOTSTRAP, BUILTIN_ENGINE, RUNTIME_PLACEHOLDERS, CommandError, render_template, user_command
from .gpus import GpuError, check_hostfile_gpus
from .host import Host, is_loopback_name
from .rankenv import RankIdentity
from .readiness import Log, Ports, Readiness, Report, Url, WithHead
from .restart import RestartPolicy
from .vllm import disagg
from .vllm import dp as vllm_dp
from .vllm import nodes as vllm_nodes
from .vllm.flags import is_vllm_serve, kv_transfer_engine_id, uses_nixl, vllm_dp_ranks

DEFAULT_PORT_BASE = 5600  # vLLM's VLLM_NIXL_SIDE_CHANNEL_PORT default
DEFAULT_RPC_PORT = 13345  # the --data-parallel-rpc-port of vLLM's multi-node examples


class PlanError(ValueError):
    """A launch that cannot be planned; the message names the culprit and the fix."""


class LaunchOptions(msgspec.Struct, frozen=True):
    """What the user chose for the whole job (CLI flags or API arguments)."""

    port_base: int | None = None  # None: head's VLLM_NIXL_SIDE_CHANNEL_PORT, else 5600
    env: tuple[tuple[str, str], ...] = ()  # --env K=V, applied to every rank
    env_include: tuple[str, ...] = ()  # --env-include NAME or PREFIX*
    ready_timeout: float = 60.0
    grace: float = 5.0  # SIGTERM -> SIGKILL
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 15.0
    command: tuple[str, ...] = ()  # empty: the built-in engine core
    head_command: tuple[str, ...] = ()  # the first host's command, when it differs (the API server)
    per_host: bool = False  # one process per host serving all its DP ranks, as `vllm serve --data-parallel-size-local`
    rpc_port: int = DEFAULT_RPC_PORT
    readiness: Readiness | None = None  # None: Report() for the built-in core, Ports() for a command
    strict_versions: bool = False  # different launcher/Python/vLLM versions across hosts fail the job (preflight)
    to_completion: bool = False  # a finite command: wait for every rank to exit; exit 0 is success, not a failure
    ifname: str | None = None  # --ifname: for every host whose line gives none (Slurm nodes have no line)
    cidr: str | None = None  # --cidr: likewise
    transfer_bytes: int | None = None  # built-in cores become NIXL agents serving this many bytes (check --transfer)
    transfer_memory: str = "auto"  # where: host (DRAM), gpu (the rank's CUDA device), auto (gpu where one is usable)
    gpus_per_rank: int | None = None  # each rank its own CUDA_VISIBLE_DEVICES slice of its host's devices (gpus.py)
    vllm_dp: str | None = None  # --vllm-dp MODE: write vllm serve's data-parallel flags per host (vllm_dp.py)
    vllm_nodes: bool = False  # --vllm-nodes: one instance whose TP/PP workers span the hosts (vllm/nodes.py)
    restart: RestartPolicy = RestartPolicy()  # --restart on-failure: failure groups come back (restart.py)


class RankSpec(msgspec.Struct, frozen=True):
    """One process the launcher starts: its identity, ports, command and environment.

    Per rank (the default), a process is one data-parallel rank. In per-host
    mode it serves all of its host's DP ranks and is keyed by the first.
    """

    identity: RankIdentity  # who it is; what its LAUNCHER_* variables say
    argv: tuple[str, ...]
    ports: tuple[int, ...]  # every side-channel port it binds (base + each DP index it serves, as vLLM computes them)
    env: Mapping[str, str]
    env_report: envpolicy.EnvReport

    rank = property(lambda self: self.identity.rank)  # global rank == data-parallel rank (the first it serves)
    local_rank = property(lambda self: self.identity.local_rank)
    local_size = property(lambda self: self.identity.local_size)
    world_size = property(lambda self: self.identity.world_size)
    host = property(lambda self: self.identity.host)
    host_index = property(lambda self: self.identity.host_index)
    engine_id = property(lambda self: self.identity.engine_id)
    port = property(lambda self: self.ports[0])


class HostPlan(msgspec.Struct, frozen=True):
    host: Host
    index: int
    ranks: tuple[RankSpec, ...]
    readiness: Readiness | None = None  # None: the plan's; --vllm-dp gives API and headless hosts their own
    leader: int = 0  # the host whose address fills this host's {head_ip}: the first, or its P/D instance's first
    rpc_port: int | None = None  # the DP RPC port this host's command binds ({rpc_port}): checked free before it starts

    def bind_request(self) -> netif.BindRequest:
        """What its ranks will know when they pick their address, as far as the plan knows it."""
        return netif.BindRequest(
            explicit=dict(self.host.env).get(netif.EXPLICIT_VAR),
            ifname=self.host.ifname,
            cidr=self.host.cidr,
            host_is_loopback=self.host.is_loopback,
            hostname=self.host.name,
        )


class LaunchPlan(msgspec.Struct, frozen=True):
    job_id: str
    hosts: tuple[HostPlan, ...]
    options: LaunchOptions
    port_base: int
    warnings: tuple[str, ...] = ()
    readiness: Readiness = Report()

    @property
    def builtin(self) -> bool:
        return not self.options.command

    @property
    def ranks(self) -> tuple[RankSpec, ...]:
        return tuple(r for h in self.hosts for r in h.ranks)

    @property
    def world_size(self) -> int:
        """Data-parallel ranks in the job (processes can be fewer: --per-host)."""
        return sum(h.host.slots for h in self.hosts)

    def readiness_of(self, host_index: int) -> Readiness:
        """The rule a host's ranks are ready by."""
        return self.hosts[host_index].readiness or self.readiness

    @property
    def leaders(self) -> frozenset[int]:
        """Hosts whose address another host's command waits for ({head_ip})."""
        return frozenset(hp.leader for hp in self.hosts if self.waits_for_leader(hp.index))

    @property
    def roles(self) -> tuple[str | None, ...]:
        """Each host's role in a P/D job (all None otherwise)."""
        return tuple(hp.host.role for hp in self.hosts)

    @property
    def instances(self) -> tuple[disagg.Instance, ...]:
        """A P/D job's vLLM instances (none otherwise)."""
        return disagg.instances([hp.host for hp in self.hosts]) if any(self.roles) else ()

    def api_hosts(self, instance: disagg.Instance) -> tuple[int, ...]:
        """The hosts of a P/D instance that run its API server: its first, or each one (--vllm-dp hybrid)."""
        return _api_hosts(instance, self.options)

    def waits_for_leader(self, index: int) -> bool:
        """Whether host ``index``'s command needs another host's address ({head_ip}): its spec waits for that agent."""
        hp = self.hosts[index]
        return hp.leader != index and any("{head_ip}" in a for r in hp.ranks for a in r.argv)


def build(
    hosts: Sequence[Host],
    options: LaunchOptions,
    head_env: Mapping[str, str],
    job_id: str,
) -> LaunchPlan:
    """Assign ranks to hosts in hostfile order and compute every rank's env."""
    if not hosts:
        raise PlanError("no hosts to launch on: the hostfile lists none; add a line such as 'localhost slots=2'")
    hosts = [replace(h, ifname=h.ifname or options.ifname, cidr=h.cidr or options.cidr) for h in hosts]
    _check_job_env(options.env)
    for host in hosts:
        _check_host_env(host)
        if host.gpus:
            try:
                check_hostfile_gpus(host.gpus, host.slots, options.gpus_per_rank, host.label)
            except GpuError as exc:
                raise PlanError(str(exc)) from None
    pd_job = any(h.role for h in hosts)
    if options.vllm_dp and not pd_job:
        options = _with_vllm_dp(options, hosts)
    if options.vllm_nodes and not pd_job:
        options = _with_vllm_nodes(options, hosts)
    instances: tuple[disagg.Instance, ...] = ()
    commands: list[tuple[str, ...]] = []
    instance_values: list[dict[str, str]] = []
    if pd_job:
        options, instances, commands, instance_values = _with_roles(options, hosts)
    port_base = _port_base(options, head_env)
    world_size = sum(h.slots for h in hosts)
    last_port = port_base + world_size - 1
    if last_port > 65535:
        raise PlanError(f"side-channel ports {port_base}..{last_port} run past 65535 for {world_size} ranks; choose a lower --port-base")
    if options.head_command and not options.command:
        raise PlanError("a head command needs a command for the other hosts too: launcher run --head-command '...' -- CMD ...")
    if options.to_completion and not options.command:
        raise PlanError("--to-completion is for a command that ends (a test, a benchmark); the built-in engine core serves until stopped")
    if options.per_host and not options.command:
        raise PlanError(
            "--per-host applies to a command that serves all of a host's DP ranks (vllm serve --data-parallel-size-local "
            "{local_size}); the built-in engine core runs one process per rank: drop --per-host or give -- CMD"
        )
    policy = envpolicy.EnvPolicy(include=tuple(options.env_include))

    host_plans, rank = [], 0
    for index, host in enumerate(hosts):
        ranks = []
        per_process = host.slots if options.per_host else 1
        for local_rank in range(0, host.slots, per_process):
            served = tuple(range(rank, rank + per_process))
            identity = RankIdentity(
                job_id=job_id,
                rank=rank,
                local_rank=local_rank,
                local_size=host.slots,
                world_size=world_size,
                host=host.name,
                host_index=index,
                engine_id=f"{job_id}-dp{rank}",
                port_base=port_base,
                ifname=host.ifname,
                cidr=host.cidr,
                transfer_bytes=None if options.command else options.transfer_bytes,  # a command's preflight moves bytes
                transfer_memory=None if options.command or not options.transfer_bytes else options.transfer_memory,
                gpus_per_rank=options.gpus_per_rank,
                host_gpus=host.gpus if options.gpus_per_rank else None,
            )
            values = {**placeholders(identity), "rpc_port": str(options.rpc_port)}
            if pd_job:
                values.update(instance_values[index])
            report = envpolicy.rank_environment(
                head_env,
                policy,
                job_env=_render_env(options.env, values, "--env"),
                host_env=_render_env(host.env, values, f"env: of {host.label}"),
                rank_env=identity.to_env(),
            )
            _check_text(report, host)
            argv = _argv(options, host, index, values, commands[index] if pd_job else None)
            # A vLLM command binds where its own DP flags say (base + each DP index it serves), whatever our rank count.
            vllm_ranks = vllm_dp_ranks(user_command(argv)) if options.command else None
            ports = tuple(port_base + r for r in (vllm_ranks if vllm_ranks is not None else served))
            ranks.append(RankSpec(identity=identity, argv=argv, ports=ports, env=report.env, env_report=report))
            rank += per_process
        host_plans.append(HostPlan(host=host, index=index, ranks=tuple(ranks)))
    host_plans = _leaders(host_plans, options, instances, commands if pd_job else None)

    processes = [r for h in host_plans for r in h.ranks]
    _check_port_overlap(host_plans)
    if options.command:
        _check_engine_ids(processes)
        _check_side_channel_hosts(hosts)
    readiness = options.readiness or (Ports() if options.command else Report())
    if options.vllm_dp and not pd_job and options.readiness is None:
        host_plans = _vllm_dp_readiness(options, host_plans)
        readiness = host_plans[0].readiness
    if options.vllm_nodes and not pd_job and options.readiness is None:
        # The instance answers on the first node's API server once every node's workers have joined; a headless
        # node opens no port of its own (the side channel is the first node's): it is ready with the first.
        api = _api_port(options.command)
        first = Url(url=f"http://{{host_ip}}:{api}/health", ports=uses_nixl(options.command))
        host_plans = [replace(hp, readiness=first if hp.index == 0 else WithHead()) for hp in host_plans]
        readiness = first
    if pd_job and options.readiness is None:
        # Every instance: its API server and its side channels; a headless host of one: its side channels.
        api = Url(url=f"http://{{host_ip}}:{_api_port(options.command)}/health", ports=True)
        serving = {i for instance in instances for i in _api_hosts(instance, options)}
        others = WithHead() if options.vllm_nodes else Ports()  # a headless node: workers only, no side channel
        host_plans = [replace(hp, readiness=api if hp.index in serving else others) for hp in host_plans]
        readiness = api
    if isinstance(readiness, Report) and options.command:
        raise PlanError(
            "a user command cannot report readiness itself; use the side-channel ports (default), --ready-port, --ready-url or --ready-log"
        )
    if isinstance(readiness, Ports) and options.command and not options.vllm_dp and not options.vllm_nodes and not pd_job:
        _check_side_channel_opens(processes)
    return LaunchPlan(
        job_id=job_id,
        hosts=tuple(host_plans),
        options=options,
        port_base=port_base,
        warnings=tuple(_compile_hash_warnings(hosts)) + ((vllm_dp.EXTERNAL_WARNING,) if options.vllm_dp == "external" else ()),
        readiness=readiness,
    )


def _with_vllm_dp(options: LaunchOptions, hosts: Sequence[Host]) -> LaunchOptions:
    """The options with vllm serve's DP flags written per host (vllm_dp.dp_commands): one process per host."""
    if not options.command:
        raise PlanError("--vllm-dp writes the data-parallel flags of a vllm serve command: give -- vllm serve MODEL ...")
    if options.head_command:
        raise PlanError("--vllm-dp writes the first host's command itself; drop --head-command")
    if options.vllm_dp == "external":  # one process a rank: each its command, in _argv
        try:
            vllm_dp.external_command(options.command, [h.slots for h in hosts], 0)
        except CommandError as exc:
            raise PlanError(f"--vllm-dp: {exc}") from None
        if options.per_host:
            raise PlanError("--vllm-dp external runs one process per DP rank: drop --per-host")
        return options
    try:
        head, rest = vllm_dp.dp_commands(options.command, options.vllm_dp, [h.slots for h in hosts])
    except CommandError as exc:
        raise PlanError(f"--vllm-dp: {exc}") from None
    return replace(options, command=rest, head_command=head, per_host=True)


def _with_vllm_nodes(options: LaunchOptions, hosts: Sequence[Host]) -> LaunchOptions:
    """The options with vllm serve's multi-node flags written per host (vllm/nodes.py): one process per host."""
    if not options.command:
        raise PlanError("--vllm-nodes writes the multi-node flags of a vllm serve command: give -- vllm serve MODEL ...")
    if options.vllm_dp or options.head_command:
        raise PlanError("--vllm-nodes writes every host's command itself: drop --vllm-dp and --head-command")
    many = next((h for h in hosts if h.slots != 1), None)
    if many is not None:
        raise PlanError(
            f"{many.label}: --vllm-nodes runs one process per host (a node of one vLLM instance; its GPUs are vLLM's "
            f"world size / nodes): give every host slots=1"
        )
    try:
        head, rest = vllm_nodes.nodes_commands(options.command, len(hosts))
    except CommandError as exc:
        raise PlanError(f"--vllm-nodes: {exc}") from None
    return replace(options, command=rest, head_command=head)


def _with_roles(options: LaunchOptions, hosts: Sequence[Host]):
    """A P/D job: (its options, its instances, each host's command, each host's instance placeholders).

    One vllm serve a host. An instance over several hosts is one DP group: ``{world_size}`` and
    ``{host_first_rank}`` are the instance's, ``{rpc_port}`` is ``--rpc-port`` + the instance's index (two
    instances never share one), and ``{head_ip}`` is the instance's first host's address."""
    try:
        disagg.check_roles(hosts)
        instances = disagg.instances(hosts)
    except disagg.RoleError as exc:
        raise PlanError(str(exc)) from None
    if not options.command:
        raise PlanError("--prefill/--decode start vLLM instances: give -- vllm serve MODEL ...")
    if options.head_command:
        raise PlanError("a P/D job writes every host's command itself: drop --head-command")
    if options.vllm_nodes and options.vllm_dp:
        raise PlanError("--vllm-nodes with --vllm-dp: an instance's hosts are either its nodes or its DP group; give one")
    if options.vllm_dp not in (None, *disagg.INSTANCE_MODES):
        raise PlanError(f"--vllm-dp {options.vllm_dp} in a P/D job: an instance over several hosts balances internal (default) or hybrid")
    last = _instance_rpc_port(options, len(instances) - 1)
    if last > 65535:
        raise PlanError(f"DP RPC ports {options.rpc_port}..{last} run past 65535 for {len(instances)} instances; choose a lower --rpc-port")
    commands: list[tuple[str, ...]] = [()] * len(hosts)
    values: list[dict[str, str]] = [{} for _ in hosts]
    for number, instance in enumerate(instances):
        slots = [hosts[i].slots for i in instance.hosts]
        try:
            written = disagg.instance_commands(
                options.command, instance.role, slots, options.vllm_dp or "internal", nodes=options.vllm_nodes
            )
        except CommandError as exc:
            raise PlanError(f"{instance.role} instance {instance.name}: {exc}") from None
        first = 0
        for index, command, count in zip(instance.hosts, written, slots, strict=True):
            commands[index] = command
            if len(instance.hosts) > 1:
                values[index] = {"rpc_port": str(_instance_rpc_port(options, number))}
                if not options.vllm_nodes:
                    values[index] |= {"world_size": str(sum(slots)), "host_first_rank": str(first)}
            first += count
    return replace(options, per_host=True), instances, commands, values


def _api_hosts(instance: disagg.Instance, options: LaunchOptions) -> tuple[int, ...]:
    return instance.hosts if options.vllm_dp == "hybrid" else instance.hosts[:1]


def _instance_rpc_port(options: LaunchOptions, number: int) -> int:
    """The DP RPC port (with --vllm-nodes: the master port) of a P/D job's ``number``-th instance."""
    return options.rpc_port + number


def _leaders(host_plans: list[HostPlan], options: LaunchOptions, instances, commands) -> list[HostPlan]:
    """Each host's leader (whose address is its {head_ip}) and the DP RPC port it binds, if any."""
    if not instances:
        binds = any("{rpc_port}" in a for a in (*options.command, *options.head_command))
        return [replace(hp, rpc_port=options.rpc_port) if binds and hp.index == 0 else hp for hp in host_plans]
    found = list(host_plans)
    for number, instance in enumerate(instances):
        binds = len(instance.hosts) > 1 and any("{rpc_port}" in a for a in commands[instance.leader])
        for index in instance.hosts:
            rpc = _instance_rpc_port(options, number) if binds and index == instance.leader else None
            found[index] = replace(found[index], leader=instance.leader, rpc_port=rpc)
    return found


def _api_port(command: Sequence[str]) -> int:
    try:
        return vllm_dp.api_port(command)
    except CommandError as exc:
        raise PlanError(str(exc)) from None


def _vllm_dp_readiness(options: LaunchOptions, host_plans: list[HostPlan]) -> list[HostPlan]:
    """API hosts: their /health (and side channels, with a NIXL connector); headless hosts: their side
    channels, or with the first host when they open none."""
    try:
        api = vllm_dp.api_port(options.command)
        nixl = uses_nixl(options.command)
    except CommandError as exc:
        raise PlanError(f"--vllm-dp: {exc}") from None
    serving = vllm_dp.api_hosts(options.vllm_dp, len(host_plans))
    if options.vllm_dp == "external":  # an API port per rank: its side channels, or uvicorn's word that it serves
        external = Ports() if nixl else Log(pattern="Application startup complete")
        return [replace(hp, readiness=external) for hp in host_plans]
    rule = lambda api_host: Url(url=f"http://{{host_ip}}:{api}/health", ports=nixl) if api_host else Ports() if nixl else WithHead()
    return [replace(hp, readiness=rule(api_host)) for hp, api_host in zip(host_plans, serving, strict=True)]


def _render_env(pairs: Sequence[tuple[str, str]], values: Mapping[str, str], where: str) -> tuple[tuple[str, str], ...]:
    """--env and env: values take the rank's placeholders (env:UCX_NET_DEVICES=mlx5_{local_rank}:1); only the
    ones the head knows: {host_ip} and {head_ip} are the host's, and it sets VLLM_HOST_IP to the first already."""
    rendered = []
    for name, value in pairs:
        try:
            (value,) = render_template((value,), values)
        except CommandError:
            used = next((m.group(1) for m in re.finditer(r"\{([a-z_]+)\}", value) if m.group(1) not in values), None)
            if used is None:
                raise PlanError(
                    f"{name}={envpolicy.masked(name, value)!r} ({where}) has braces that are no placeholder; "
                    f"write {{{{ and }}}} for literal braces"
                ) from None
            raise PlanError(
                f"{name}={envpolicy.masked(name, value)!r} ({where}) uses {{{used}}}, which an environment value cannot take: only "
                f"{' '.join('{' + v + '}' for v in values)}; write {{{{{used}}}}} for a literal"
            ) from None
        rendered.append((name, value))
    return tuple(rendered)


def placeholders(identity: RankIdentity) -> dict[str, str]:
    """The head's values for a command's placeholders (command.PLACEHOLDERS), all but {rpc_port}."""
    values = {
        "rank": identity.rank,
        "local_rank": identity.local_rank,
        "local_size": identity.local_size,
        "world_size": identity.world_size,
        "host": identity.host,
        "host_index": identity.host_index,
        "host_first_rank": identity.rank - identity.local_rank,
        "port": identity.port,
        "port_base": identity.port_base,
        "job_id": identity.job_id,
    }
    return {k: str(v) for k, v in values.items()}


def preflight_plan(plan: LaunchPlan) -> LaunchPlan:
    """The built-in engine core on the same hosts, ports and bind rules as ``plan``.

    Run before a user command, it proves what vLLM would otherwise find out
    the hard way: every host reachable, same versions, every address local,
    unique and reachable, every side-channel port free.
    """
    options = replace(
        plan.options,
        command=(),
        head_command=(),
        per_host=False,
        readiness=None,
        vllm_dp=None,  # its commands are the built-in core's
        to_completion=False,  # the built-in core serves until the check is done, whatever the command does
        port_base=plan.port_base,
        strict_versions=True,
    )
    return build([replace(h.host, role=None) for h in plan.hosts], options, {}, f"{plan.job_id}-preflight")  # cores, not instances


def _argv(
    options: LaunchOptions, host: Host, host_index: int, values: Mapping[str, str], written: tuple[str, ...] | None
) -> tuple[str, ...]:
    if not options.command:
        return BUILTIN_ENGINE
    command = options.head_command if options.head_command and host_index == 0 else options.command
    try:
        if written is not None:  # a P/D host: its instance's command
            command = written
        elif options.vllm_dp == "external":
            command = vllm_dp.external_command(command, [int(values["world_size"])], int(values["local_rank"]))
        return BOOTSTRAP + render_template(command, values, leave=RUNTIME_PLACEHOLDERS)
    except CommandError as exc:
        raise PlanError(str(exc)) from None


def _check_text(report: envpolicy.EnvReport, host: Host) -> None:
    """Every name and value a rank receives must be text: the spec travels as JSON, and a byte that is
    not UTF-8 (the shell's environment can hold one) would otherwise fail on the way, far from its cause."""
    for name, value in report.env.items():
        try:
            name.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError:
            shown = name.encode("utf-8", "backslashreplace").decode()
            source = f"copied from this environment ({report.copied[name]})" if name in report.copied else report.set.get(name, "set")
            raise PlanError(
                f"{shown} for {host.label} holds bytes that are not UTF-8 ({source}); launcher carries text only: "
                f"fix its value, unset it, or set it with --env {shown}=VALUE"
            ) from None


def _check_port_overlap(host_plans: Sequence[HostPlan]) -> None:
    """Two processes of one host cannot both bind a side-channel port."""
    for hp in host_plans:
        owner: dict[int, RankSpec] = {}
        for spec in hp.ranks:
            for port in spec.ports:
                other = owner.setdefault(port, spec)
                if other is not spec:
                    raise PlanError(
                        f"{hp.host.label}: processes {other.rank} and {spec.rank} would both bind side-channel port {port} "
                        f"(their vLLM DP flags give them the same DP index); give each process on a host its own "
                        f"--data-parallel-start-rank/--data-parallel-rank, or put them on different hosts"
                    )


def _check_side_channel_opens(processes: Sequence[RankSpec]) -> None:
    """vLLM opens its side channel only with a NixlConnector: without one, port readiness never holds."""
    for spec in processes:
        args = user_command(spec.argv)
        try:
            silent = is_vllm_serve(args) and not uses_nixl(args)
        except CommandError as exc:
            raise PlanError(str(exc)) from None
        if silent:
            raise PlanError(
                f"rank {spec.rank} on {spec.host} runs vllm serve without a NixlConnector --kv-transfer-config, so it opens "
                f"no side channel and would never count as ready by its side-channel ports; use --ready-url "
                f"'http://{{host_ip}}:8000/health' (an API server), --ready-log 'Application startup complete' "
                f"or --ready-port, or configure NixlConnector"
            )


def _check_engine_ids(processes: Sequence[RankSpec]) -> None:
    """Two processes with one kv-transfer engine_id fail vLLM's handshake ("engine ID mismatch")."""
    seen: dict[str, RankSpec] = {}
    for spec in processes:
        try:
            engine_id = kv_transfer_engine_id(user_command(spec.argv))
        except CommandError as exc:
            raise PlanError(str(exc)) from None
        if engine_id is None:
            continue
        other = seen.setdefault(engine_id, spec)
        if other is not spec:
            where = "hosts " + f"{other.host} and {spec.host}" if other.host != spec.host else f"host {spec.host}"
            raise PlanError(
                f"--kv-transfer-config gives engine_id {engine_id!r} to rank {other.rank} and rank {spec.rank} ({where}); "
                f'NIXL peers then refuse each other (engine ID mismatch): make it unique, e.g. "engine_id": "prefill-{{host}}-{{rank}}", '
                f"or leave it out and let vLLM generate one"
            )


def _check_side_channel_hosts(hosts: Sequence[Host]) -> None:
    """A side-channel host that binds but that peers cannot dial (vLLM advertises it as is)."""
    if all(h.is_loopback for h in hosts):
        return
    for host in hosts:
        value = dict(host.env).get("VLLM_NIXL_SIDE_CHANNEL_HOST")
        if value is None:
            continue
        bare = value.strip("[]")
        unusable = "is loopback" if is_loopback_name(bare) else None
        try:
            if ipaddress.ip_address(bare).is_unspecified:
                unusable = "is the wildcard address"
        except ValueError:
            pass
        if unusable:
            raise PlanError(
                f"{host.label}: env:VLLM_NIXL_SIDE_CHANNEL_HOST={value} {unusable}: it binds, but vLLM advertises it to "
                f"peers on other hosts, who then dial themselves or nothing; remove it (the launcher detects the host's "
                f"address) or give the host's own address"
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
    if name.startswith(rankenv.PREFIX):
        raise PlanError(f"{where}{name} uses the reserved LAUNCHER_ prefix, which the launcher sets itself; rename it")


def _compile_hash_warnings(hosts: Sequence[Host]) -> list[str]:
    """Per-host VLLM_* values that vLLM hashes make hosts compile separately."""
    names = sorted({name for h in hosts for name, _ in h.env if envpolicy.in_compile_hash(name)})
    return [
        f"{name} differs between hosts and is part of vLLM's compile-cache hash: each distinct value compiles separately"
        for name in names
        if len({dict(h.env).get(name) for h in hosts}) > 1
    ]
