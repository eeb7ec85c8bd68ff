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

from . import netif, protocol, rankenv
from .command import render_template

EXIT_BAD_ADDRESS = 2
EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    env = os.environ
    try:
        me, facts = rankenv.RankIdentity.from_env(env), rankenv.HostFacts.from_env(env)
    except rankenv.RankEnvError as exc:
        return protocol.rank_failed(0, str(exc), EXIT_BAD_ADDRESS)
    rank, host = me.rank, me.host
    if not args:
        return protocol.rank_failed(rank, "no command given: usage: python -m launcher.bootstrap -- CMD ...", EXIT_NOT_FOUND)

    try:
        choice = netif.claim_bind_address(env)
    except netif.BindAddressError as exc:
        return protocol.rank_failed(rank, str(exc), EXIT_BAD_ADDRESS)
    values = {"host_ip": choice.address, "head_ip": facts.head_ip or choice.address}
    args = list(render_template(args, values, strict=False))

    protocol.report_to_agent(protocol.Resolved(rank=rank, address=choice.address, rule=choice.rule))
    command_env = {k: v for k, v in env.items() if k != rankenv.CONTROL_FD_VAR}
    if facts.control_fd is not None:
        os.set_inheritable(facts.control_fd, False)  # the command never sees the agent's pipe
    try:
        os.execvpe(args[0], args, command_env)
    except FileNotFoundError:
        return protocol.rank_failed(
            rank, f"command not found on {host}: {args[0]!r}; install it there or give its full path", EXIT_NOT_FOUND
        )
    except PermissionError:
        return protocol.rank_failed(rank, f"command not executable on {host}: {args[0]!r}", EXIT_NOT_EXECUTABLE)
    except OSError as exc:
        return protocol.rank_failed(rank, f"cannot run {args[0]!r} on {host}: {exc.strerror or exc}", EXIT_NOT_EXECUTABLE)
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
