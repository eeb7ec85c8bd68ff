"""``python -m launcher.agent --join ADDR:PORT --host NAME``: an agent that dials in to the head.

For systems that start processes their own way (a Kubernetes pod, a PBS
job, a systemd unit): the agent connects to the head, proves the job's
token (``LAUNCHER_JOIN_TOKEN``) against the head's nonce, and then uses the
connection as its stdin and stdout, so everything after is the agent every
other backend starts. The head's side is ``transports.join``.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from .. import protocol
from ..netif import host_port

TOKEN_VAR = "LAUNCHER_JOIN_TOKEN"
RETRY_SECONDS = 0.5


class JoinError(Exception):
    """The agent could not join; str() is one line naming the fix."""


def dial(where: str, host: str, token: str, timeout: float) -> socket.socket:
    """Connect to the head at ``where`` (retrying until it listens, up to ``timeout``) and answer its challenge."""
    head = host_port(where)
    if head is None:
        raise JoinError(f"--join {where!r}: give the head's ADDRESS:PORT (its --join-listen)")
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            sock = socket.create_connection(head, timeout=5.0)
            break
        except OSError as exc:
            last = exc.strerror or str(exc)
            if time.monotonic() + RETRY_SECONDS > deadline:
                raise JoinError(
                    f"cannot reach the head at {where} for {timeout:g}s ({last}); is the job started with --join-listen {where}?"
                ) from None
            time.sleep(RETRY_SECONDS)
    try:
        challenge = protocol.decode(sock.makefile("rb").readline(4096))
    except (OSError, protocol.ProtocolError) as exc:
        sock.close()
        raise JoinError(f"{where} did not answer as a launcher head ({exc})") from None
    if not isinstance(challenge, protocol.Challenge):
        sock.close()
        raise JoinError(f"{where} did not answer as a launcher head (it sent {type(challenge).__name__})")
    sock.sendall(protocol.encode(protocol.Join(host=host, proof=protocol.join_proof(token, challenge.nonce, host))))
    sock.settimeout(None)
    return sock


def become_stdio(sock: socket.socket) -> None:
    """From now on fd 0 and fd 1 are the connection: the agent reads its spec and writes its events there."""
    os.dup2(sock.fileno(), 0)
    os.dup2(sock.fileno(), 1)
    sock.close()


def main(argv: list[str]) -> int:
    import argparse  # here: an agent started by a transport never parses argv

    parser = argparse.ArgumentParser(prog="python -m launcher.agent", description="the per-host agent; --join dials in to the head")
    parser.add_argument("--join", required=True, metavar="ADDR:PORT", help="the head's --join-listen")
    parser.add_argument("--host", default=socket.gethostname(), help="this host's name as the job's hostfile gives it")
    parser.add_argument("--join-timeout", type=float, default=120.0, metavar="SECONDS", help="how long to keep trying to reach the head")
    args = parser.parse_args(argv)
    token = os.environ.pop(TOKEN_VAR, "")  # popped: nothing this agent starts inherits it
    if not token:
        print(f"launcher agent: --join needs {TOKEN_VAR}, the token the head was started with, in the environment", file=sys.stderr)
        return 2
    try:
        sock = dial(args.join, args.host, token, args.join_timeout)
    except JoinError as exc:
        print(f"launcher agent: {exc}", file=sys.stderr)
        return 2
    become_stdio(sock)
    from . import main as agent_main

    return agent_main()
