"""What launcher reads and writes in a vLLM command line: vLLM 0.32's flag spellings, one way to read them.

vLLM's argparse accepts ``--flag V`` and ``--flag=V``, and underscores for
dashes in long names; ``flag_name`` is that rule in one place, and ``given``,
``flag_value`` and ``without`` all go through it. Pure: argv tuples in, out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from ..command import CommandError, user_command

# vLLM 0.32's spellings (engine/arg_utils.py); any of them counts as the user's.
DP_SIZE = ("--data-parallel-size", "-dp")
DP_LOCAL = ("--data-parallel-size-local", "-dpl")
DP_START = ("--data-parallel-start-rank", "-dpr")
DP_RANK = ("--data-parallel-rank", "-dpn")
DP_ADDRESS = ("--data-parallel-address", "-dpa")
DP_RPC_PORT = ("--data-parallel-rpc-port", "-dpp")
DP_HYBRID = ("--data-parallel-hybrid-lb", "-dph")
DP_EXTERNAL = ("--data-parallel-external-lb", "-dpe")
DP_MULTI_PORT = ("--data-parallel-multi-port-external-lb", "-dpm")
HEADLESS = ("--headless",)
API_PORT = ("--port",)
KV_TRANSFER_CONFIG = ("--kv-transfer-config",)
_DP_FLAGS = {"size": DP_SIZE, "local": DP_LOCAL, "start": DP_START, "rank": DP_RANK}


def flag_name(arg: str) -> str:
    """The flag an argument names, as vLLM reads it: ``--a_b=1`` names ``--a-b``; a value names itself."""
    name = arg.partition("=")[0]
    return name.replace("_", "-") if name.startswith("--") else name


def given(args: Sequence[str], names: Sequence[str]) -> bool:
    """Whether any of ``names`` is in ``args``."""
    return any(flag_name(arg) in names for arg in args)


def refuse_written(args: Sequence[str], rules, option: str) -> None:
    """A CommandError for the first of ``rules`` ((flag spellings, why launcher writes it)) that ``args`` already
    gives: ``option`` (--vllm-dp, --vllm-nodes) writes those flags itself."""
    for names, why in rules:
        if given(args, names):
            raise CommandError(f"{names[0]} in the command: {why}; drop it, or drop {option} and write every flag yourself")


def flag_value(args: Sequence[str], names: Sequence[str]) -> str | None:
    """The value of the last of ``names`` in ``args`` (``--flag V``, ``--flag=V``)."""
    found = None
    for i, arg in enumerate(args):
        if flag_name(arg) in names:
            if "=" in arg:
                found = arg.partition("=")[2]
            elif i + 1 < len(args):
                found = args[i + 1]
    return found


def without(args: Sequence[str], names: Sequence[str]) -> tuple[str, ...]:
    """``args`` without a valued flag (``--port 9000`` or ``--port=9000``), however often given."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif flag_name(arg) in names:
            skip = "=" not in arg
        else:
            out.append(arg)
    return tuple(out)


def kv_transfer_config(args: Sequence[str]) -> dict | None:
    """The ``--kv-transfer-config`` JSON of a vLLM command line, if it has one."""
    text = flag_value(args, KV_TRANSFER_CONFIG)
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
