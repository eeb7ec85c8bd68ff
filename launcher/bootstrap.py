"""Run a user command as a rank: resolve this host's address, set it, exec.

``python -m launcher.bootstrap -- CMD ...`` is what the agent starts for a
user command (``launcher run -- vllm serve ...``). Before exec, on the host
itself, it does what vLLM's engine core does after PR #41806:

- resolve this host's own address with the same rules as the built-in engine
  core (``netif``), and ``os.environ.setdefault`` it into
  ``VLLM_NIXL_SIDE_CHANNEL_HOST`` and ``VLLM_HOST_IP``: a value set for this
  host on purpose wins, the head's never arrives (the agent dropped it);
- fill in ``{host_ip}`` and ``{head_ip}``, which only the hosts know;
- tell the agent the address it chose, close the control pipe, and exec the
  command in place, so there is no extra process and signals reach it
  directly.

``VLLM_NIXL_SIDE_CHANNEL_PORT`` stays one value for the whole job (vLLM adds
the DP index itself, and hashes the value into its compile cache), and DP
ranks travel as CLI flags in the command, never as ``VLLM_DP_*``.
"""

from __future__ import annotations

import os
import sys

import msgspec

from . import control, exitcodes, netif, protocol, rankenv
from .command import render_template


class BootstrapError(Exception):
    """Why the command cannot start; ``code`` is the exit code a rank reports for it."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class Prepared(msgspec.Struct, frozen=True):
    """The command as it will run: placeholders filled, the environment with this host's address."""

    argv: list[str]
    env: dict[str, str]
    resolved: protocol.Resolved


def prepare(args: list[str], env: dict[str, str]) -> Prepared:
    """Everything before the exec, on this host: ``env`` is the rank's environment (changed in place)."""
    try:
        me, facts = rankenv.RankIdentity.from_env(env), rankenv.HostFacts.from_env(env)
    except rankenv.RankEnvError as exc:
        raise BootstrapError(str(exc), exitcodes.RANK_BAD_ADDRESS) from None
    if not args:
        raise BootstrapError("no command given: usage: python -m launcher.bootstrap -- CMD ...", exitcodes.RANK_NOT_FOUND)
    try:
        choice = netif.claim_bind_address(env)
    except netif.BindAddressError as exc:
        raise BootstrapError(str(exc), exitcodes.RANK_BAD_ADDRESS) from None
    values = {"host_ip": choice.address, "head_ip": facts.head_ip or choice.address}
    command_env = {k: v for k, v in env.items() if k != rankenv.CONTROL_FD_VAR}  # the command never sees the agent's pipe
    return Prepared(
        list(render_template(args, values, strict=False)),
        command_env,
        protocol.Resolved(rank=me.rank, address=choice.address, rule=choice.rule),
    )


def exec_error(exc: OSError, command: str, host: str) -> BootstrapError:
    """An exec (or spawn) that failed, as the rank reports it."""
    if isinstance(exc, FileNotFoundError):
        return BootstrapError(f"command not found on {host}: {command!r}; install it there or give its full path", exitcodes.RANK_NOT_FOUND)
    if isinstance(exc, PermissionError):
        return BootstrapError(f"command not executable on {host}: {command!r}", exitcodes.RANK_NOT_EXECUTABLE)
    return BootstrapError(f"cannot run {command!r} on {host}: {exc.strerror or exc}", exitcodes.RANK_NOT_EXECUTABLE)


def _rank(env) -> int:
    """The rank, for reporting an error before the identity could be read."""
    text = env.get(rankenv.RankIdentity.NAMES["rank"], "")
    return int(text) if text.isdigit() else 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    env = dict(os.environ)
    rank = _rank(env)
    try:
        prepared = prepare(args, env)
    except BootstrapError as exc:
        return control.rank_failed(rank, str(exc), exc.code)
    control.report_to_agent(prepared.resolved)
    facts = rankenv.HostFacts.from_env(env)
    if facts.control_fd is not None:
        os.set_inheritable(facts.control_fd, False)
    try:
        os.execvpe(prepared.argv[0], prepared.argv, prepared.env)
    except OSError as exc:
        error = exec_error(exc, prepared.argv[0], env.get(rankenv.RankIdentity.NAMES["host"], "this host"))
        return control.rank_failed(prepared.resolved.rank, str(error), error.code)
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
