"""User commands: placeholders and the bootstrap in front.

Pure functions over argv tuples; what launcher reads in a vLLM command
line is ``launcher.vllm.flags``. The plan fills in what the head knows
(``{rank}``, ``{local_size}``, ...); ``launcher.bootstrap`` fills in what only
the host knows (``{host_ip}``, ``{head_ip}``); the agent fills in ``{python}``.
"""

from __future__ import annotations

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


def render_argv(argv: Sequence[str], python: str) -> str:
    """The command as a shell would show it, with ``{python}`` filled in."""
    return shlex.join(python if a == "{python}" else a for a in argv)
