"""``--vllm-dp``: the data-parallel flags of a multi-node ``vllm serve``, written per host as vLLM wants them.

vLLM 0.32 chooses its load-balancing mode from the flags each process gets
(``EngineArgs.create_engine_config``, ``vllm serve``'s own defaults):

- ``internal`` (vLLM's default): one API server, on the first host, balances
  over every engine. The first host runs ``--data-parallel-size``, ``-size-local``,
  ``-address``, ``-rpc-port`` and no start rank; every other host adds
  ``--data-parallel-start-rank`` and ``--headless`` (a start rank on a host that
  is not headless would mean hybrid, and the API server then refuses headless
  peers: "Remote engine 2 must not use --headless in external or hybrid dp lb mode").
- ``hybrid``: every host runs its own API server balancing over its own
  engines; every host gets a start rank and none is headless. vLLM switches a
  host with one local engine to external balancing, which it refuses for a
  model that is not MoE, so every host needs at least two slots.

- ``external``: one process and one API server per DP rank
  (``--data-parallel-rank``), an outside load balancer in front; a rank at
  local index L serves its API on ``--port`` + L. vLLM 0.32 runs it for MoE
  models only ("Non-MoE models do not support external data parallel mode").

Flags the user already gave win when they agree (an address, an RPC port, a
size that matches the hostfile); one that contradicts the hostfile or the mode
is a ``CommandError`` before anything starts. Pure: argv tuples in, out.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..command import CommandError
from .flags import API_PORT, HEADLESS, flag_value, given, is_vllm_serve, refuse_written, without
from .flags import DP_ADDRESS as ADDRESS
from .flags import DP_EXTERNAL as EXTERNAL
from .flags import DP_HYBRID as HYBRID
from .flags import DP_LOCAL as LOCAL
from .flags import DP_MULTI_PORT as MULTI_PORT
from .flags import DP_RANK as RANK
from .flags import DP_RPC_PORT as RPC_PORT
from .flags import DP_SIZE as SIZE
from .flags import DP_START as START

MODES = ("internal", "hybrid", "external")
EXTERNAL_WARNING = (
    "--vllm-dp external: vLLM 0.32 runs external load balancing for MoE models only; a dense model fails at start "
    "with 'Non-MoE models do not support external data parallel mode' (use internal or hybrid)"
)

DEFAULT_API_PORT = 8000


def dp_commands(command: Sequence[str], mode: str, slots: Sequence[int]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the first host's command, every other host's command) for one ``vllm serve`` process per host,
    with placeholders the plan fills per host. ``slots``: each host's DP ranks, in hostfile order."""
    command = tuple(command)
    _check(command, mode, slots)
    world = sum(slots)
    if mode == "external":
        raise CommandError("--vllm-dp external writes one command per rank: use external_command")
    _agrees(command, SIZE, world, "the hostfile's slots add up to")
    if len(set(slots)) > 1 and given(command, LOCAL):
        raise CommandError(f"{LOCAL[0]} in the command: hosts have different slots ({', '.join(map(str, slots))}); drop it")
    if given(command, LOCAL):
        _agrees(command, LOCAL, slots[0], "every host's slots are")
    if mode == "hybrid" and min(slots) < 2:
        raise CommandError(
            "--vllm-dp hybrid needs at least 2 slots on every host: vLLM 0.32 switches a host with one engine to "
            "external load balancing, which it refuses for models that are not MoE; use the internal mode"
        )
    dp = [
        *_unless(command, SIZE, "{world_size}"),
        *_unless(command, LOCAL, "{local_size}"),
        *_unless(command, ADDRESS, "{head_ip}"),
        *_unless(command, RPC_PORT, "{rpc_port}"),
    ]
    start = ["--data-parallel-start-rank", "{host_first_rank}"]
    if mode == "internal":
        return (*command, *dp), (*command, *dp, *start, "--headless")
    return (*command, *dp, *start), (*command, *dp, *start)


def external_command(command: Sequence[str], slots: Sequence[int], local_rank: int) -> tuple[str, ...]:
    """External balancing: the command of the rank at ``local_rank`` of its host, its API on --port + local_rank."""
    _check(command, "external", slots)
    _agrees(command, SIZE, sum(slots), "the hostfile's slots add up to")
    if flag_value(command, LOCAL) not in (None, "1"):
        raise CommandError(f"{LOCAL[0]} in the command: an external DP rank runs alone (vLLM requires 1); drop it")
    base = api_port(command)
    rest = without(command, API_PORT)
    dp = [
        *_unless(command, SIZE, "{world_size}"),
        *_unless(command, ADDRESS, "{head_ip}"),
        *_unless(command, RPC_PORT, "{rpc_port}"),
    ]
    return (*rest, *dp, "--data-parallel-rank", "{rank}", "--port", str(base + local_rank))


def _check(command: tuple[str, ...], mode: str, slots: Sequence[int]) -> None:
    """A vllm serve whose own flags do not contradict what --vllm-dp MODE writes."""
    if not is_vllm_serve(command):
        raise CommandError(f"--vllm-dp writes the flags of 'vllm serve'; the command is {' '.join(command[:2])!r} ...")
    if mode not in MODES:
        raise CommandError(f"--vllm-dp {mode}: the modes are {', '.join(MODES)}")
    written = (
        (START, "launcher gives each host its start rank"),
        (RANK, "launcher gives each process its DP rank (external mode)"),
        (HEADLESS, "launcher makes every host but the first headless (internal mode)"),
        (MULTI_PORT, "multi-port external load balancing is not written by --vllm-dp"),
        (EXTERNAL, "use --vllm-dp external"),
    )
    refuse_written(command, written, "--vllm-dp")
    if given(command, HYBRID) and mode != "hybrid":
        raise CommandError(f"{HYBRID[0]} in the command asks for hybrid load balancing: use --vllm-dp hybrid")


def api_port(command: Sequence[str]) -> int:
    """The port the command's API server listens on (vLLM's --port, default 8000)."""
    text = flag_value(command, API_PORT)
    try:
        return int(text) if text is not None else DEFAULT_API_PORT
    except ValueError:
        raise CommandError(f"--port {text!r} in the command is not a number") from None


def api_hosts(mode: str, host_count: int) -> list[bool]:
    """Which hosts run an API server on --port: the first (internal), every one (hybrid; external: --port + L)."""
    return [mode != "internal" or i == 0 for i in range(host_count)]


def _unless(command: Sequence[str], names: Sequence[str], value: str) -> list[str]:
    return [] if given(command, names) else [names[0], value]


def _agrees(command: Sequence[str], names: Sequence[str], expected: int, what: str) -> None:
    text = flag_value(command, names)
    if text is not None and text != str(expected):
        raise CommandError(f"{names[0]} {text} in the command, but {what} {expected}; drop it (--vllm-dp writes it) or fix the hostfile")
