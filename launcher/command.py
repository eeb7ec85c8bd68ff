"""User commands: placeholders, the bootstrap in front, what launcher reads in a vLLM command line.

Pure functions over argv tuples. The plan fills in what the head knows
(``{rank}``, ``{local_size}``, ...); ``launcher.bootstrap`` fills in what only
the host knows (``{host_ip}``, ``{head_ip}``); the agent fills in ``{python}``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence


class CommandError(ValueError):
    """A command line launcher cannot use; the message says which argument and the fix."""


BUILTIN_ENGINE = ("{python}", "-m", "launcher.engine_core")
BOOTSTRAP = ("{python}", "-m", "launcher.bootstrap", "--")

# Placeholders a user command may use. The head fills in all but the runtime
# ones, which only the host knows: ``launcher.bootstrap`` fills those in.
PLACEHOLDERS: Mapping[str, str] = {
    "rank": "the process's first data-parallel rank",
    "local_rank": "its index on its host (0 in --per-host mode)",
    "local_size": "data-parallel ranks on its host",
    "world_size": "data-parallel ranks in the job",
    "host": "the host's name as the hostfile gives it",
    "host_index": "the host's line in the hostfile, from 0",
    "host_first_rank": "the first data-parallel rank on its host",
    "port": "its side-channel port (base + rank)",
    "port_base": "VLLM_NIXL_SIDE_CHANNEL_PORT, one value per job",
    "rpc_port": "the data-parallel RPC port (--rpc-port)",
    "job_id": "the launcher's job id",
    "host_ip": "the host's own address, detected on the host",
    "head_ip": "the first host's own address, detected on that host",
}
RUNTIME_PLACEHOLDERS = frozenset({"host_ip", "head_ip"})
_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}|\{([a-z_]+)\}")


def render_template(
    args: Sequence[str], values: Mapping[str, str], *, leave: frozenset[str] = frozenset(), strict: bool = True
) -> tuple[str, ...]:
    """Fill ``{name}`` placeholders; ``{{name}}`` is a literal ``{name}``.

    Only ``{lowercase_name}`` is a placeholder, so JSON such as
    ``{"kv_connector": "NixlConnector"}`` passes through untouched. Names in
    ``leave`` stay as they are, for a later stage to fill; with ``strict``
    off, so does any name not in ``values``.
    """

    def fill(match: re.Match, index: int) -> str:
        if match.group(1):
            return match.group(0) if match.group(1) in leave else "{" + match.group(1) + "}"
        name = match.group(2)
        if name in values:
            return values[name]
        if name in leave or not strict:
            return match.group(0)
        known = " ".join("{" + n + "}" for n in PLACEHOLDERS)
        raise CommandError(
            f"unknown placeholder {{{name}}} in argument {index} of the command ({args[index]!r}); "
            f"known: {known}; write {{{{{name}}}}} for a literal {{{name}}}"
        )

    return tuple(_PLACEHOLDER.sub(lambda m, i=i: fill(m, i), a) for i, a in enumerate(args))


def user_command(argv: Sequence[str]) -> tuple[str, ...]:
    """The user's part of a process's argv (what follows the bootstrap)."""
    argv = tuple(argv)
    return argv[len(BOOTSTRAP) :] if argv[: len(BOOTSTRAP)] == BOOTSTRAP else argv


def kv_transfer_config(args: Sequence[str]) -> dict | None:
    """The ``--kv-transfer-config`` JSON of a vLLM command line, if it has one."""
    text = flag_value(args, ("--kv-transfer-config",))
    if text is None:
        return None
    try:
        config = json.loads(text)
    except ValueError:
        raise CommandError(f"--kv-transfer-config is not valid JSON: {text!r}; quote it as one shell word") from None
    if not isinstance(config, dict):
        raise CommandError(f"--kv-transfer-config is not a JSON object: {text!r}")
    return config


def kv_transfer_engine_id(args: Sequence[str]) -> str | None:
    """The engine_id in a ``--kv-transfer-config`` JSON argument, if any."""
    config = kv_transfer_config(args)
    return None if config is None or config.get("engine_id") is None else str(config["engine_id"])


def is_vllm_serve(args: Sequence[str]) -> bool:
    """``vllm serve ...`` or ``python -m vllm.entrypoints.cli.main serve ...``."""
    if not args:
        return False
    if os.path.basename(args[0]) == "vllm":
        return tuple(args[1:2]) == ("serve",)
    if "-m" in args[:-1]:
        module = args[list(args).index("-m") + 1]
        return module == "vllm.entrypoints.openai.api_server" or (module.startswith("vllm") and "serve" in args)
    return False


def vllm_interpreter_hint(argv: Sequence[str]) -> tuple[str, str] | None:
    """Where to ask which vLLM a process runs: ("script", "vllm") for vLLM's console
    script (its #! line names the interpreter), ("python", PYTHON) for ``PYTHON -m vllm...``;
    None when it runs no vLLM."""
    args = user_command(argv)
    if args and os.path.basename(args[0]) == "vllm":
        return "script", args[0]
    return ("python", args[0]) if is_vllm_serve(args) else None


# vLLM 0.32's spellings of its data-parallel flags (engine/arg_utils.py).
DP_SIZE = ("--data-parallel-size", "-dp")
DP_LOCAL = ("--data-parallel-size-local", "-dpl")
DP_START = ("--data-parallel-start-rank", "-dpr")
DP_RANK = ("--data-parallel-rank", "-dpn")
_DP_FLAGS = {"size": DP_SIZE, "local": DP_LOCAL, "start": DP_START, "rank": DP_RANK}


def vllm_dp_ranks(args: Sequence[str]) -> tuple[int, ...] | None:
    """The DP indexes whose engine cores a ``vllm serve`` command line runs, as vLLM derives them.

    vLLM binds each engine core's side channel at base + DP index. External
    load balancing (``--data-parallel-rank N``): N. Otherwise the start rank
    (0 when not given: the API-server host) and the local size (the whole
    DP size when not given). No DP flags: index 0. None when ``args`` is not
    ``vllm serve`` or a value is not a number (a placeholder filled on the host).
    """
    if not is_vllm_serve(args):
        return None
    values: dict[str, int] = {}
    for key, names in _DP_FLAGS.items():
        text = flag_value(args, names)
        if text is None:
            continue
        try:
            values[key] = int(text)
        except ValueError:
            return None
    if "rank" in values:
        return (values["rank"],)
    size = values.get("size", 1)
    start = values.get("start", 0)
    return tuple(range(start, start + values.get("local", size)))


def uses_nixl(args: Sequence[str]) -> bool:
    """Whether a vLLM command line configures a NixlConnector (which opens the side channel)."""
    config = kv_transfer_config(args)
    return bool(config) and "Nixl" in str(config.get("kv_connector", ""))


def flag_value(args: Sequence[str], names: Sequence[str]) -> str | None:
    """The value of the last of ``names`` in ``args`` (``--flag V``, ``--flag=V``; vLLM also accepts underscores)."""
    found = None
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        name = name.replace("_", "-") if name.startswith("--") else name
        if name in names:
            if eq:
                found = value
            elif i + 1 < len(args):
                found = args[i + 1]
    return found


def render_argv(argv: Sequence[str], python: str) -> str:
    """The command as a shell would show it, with ``{python}`` filled in."""
    return shlex.join(python if a == "{python}" else a for a in argv)
