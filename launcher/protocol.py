"""Messages between the head, the agents and the ranks: one JSON object a line.

The head writes an ``AgentSpec`` as the agent's first stdin line, then
``Heartbeat``/``Check``/``Stop``. The agent writes events to stdout. A rank
writes ``Ready`` or ``RankError`` to the control pipe the agent gave it
(``LAUNCHER_CONTROL_FD``). Every message carries a ``type`` tag.
"""

from __future__ import annotations

from typing import Union

import msgspec

from .rankenv import RankIdentity
from .readiness import Readiness, Report


class _Msg(msgspec.Struct, tag_field="type", tag=lambda name: name.lower(), kw_only=True, omit_defaults=True):
    pass


# --- head -> agent -----------------------------------------------------------


class RankLaunch(msgspec.Struct, kw_only=True):
    """A rank as the head sends it to its agent: who it is, its command, its planned environment."""

    identity: RankIdentity  # its LAUNCHER_* variables, added at spawn (environment())
    argv: list[str]  # "{python}" stands for the agent's interpreter
    env: dict[str, str]  # the plan's layers but the identity's
    ports: list[int]  # every side-channel port it binds: [port], or one per local DP rank (--per-host)

    rank = property(lambda self: self.identity.rank)
    local_rank = property(lambda self: self.identity.local_rank)
    engine_id = property(lambda self: self.identity.engine_id)
    port = property(lambda self: self.ports[0])

    def environment(self) -> dict[str, str]:
        """What the plan gives the rank: its layers and its identity (which a host option cannot name)."""
        return {**self.env, **self.identity.to_env()}


class AgentSpec(_Msg):
    job_id: str
    host: str
    host_index: int
    host_is_loopback: bool
    ranks: list[RankLaunch]
    grace: float
    heartbeat_interval: float
    heartbeat_timeout: float
    reached_address: str | None = None  # None: the agent reads SSH_CONNECTION
    readiness: Readiness = msgspec.field(default_factory=Report)
    head_ip: str | None = None  # its leader's address, for {head_ip}: the first host's, or its P/D instance's first
    rpc_port: int | None = None  # the DP RPC port its command binds ({rpc_port}, a leader only): checked free first


class Heartbeat(_Msg):
    pass


class Sweep(_Msg):
    """Instead of a spec: kill every process of this job left on the host, report, exit."""

    job_id: str


class Peer(msgspec.Struct, kw_only=True):
    """A rank to probe: every one of its side-channel ports, with ``wire``."""

    rank: int
    address: str
    ports: list[int]
    wire: str  # a handshake generation (wire.GENERATIONS), or "tcp": connect only
    expect_hash: str | None = None  # None: report the peer's, the head compares them across the job
    expect_engine_id: str | None = None  # a built-in core's; None: report it


class Check(_Msg):
    peers: list[Peer]
    timeout: float
    pairs: list[tuple[int, int]] | None = None  # (from rank, to rank) to probe; None: every pair (a sampled check names them)


class TransferCheck(_Msg):
    """Head -> agent -> each built-in rank: READ every peer's buffer over NIXL and verify it."""

    peers: list[Peer]
    timeout: float
    pairs: list[tuple[int, int]] | None = None


class Restart(_Msg):
    """Stop every rank of this host, and start each again after ``delay`` seconds (its ports free by then)."""

    attempt: int
    delay: float = 0.0


class Stop(_Msg):
    reason: str = ""
    now: bool = False  # skip the rest of the grace period: SIGKILL at once (a second Ctrl-C)


# --- agent/rank -> head --------------------------------------------------------


class Hello(_Msg):
    hostname: str
    pid: int
    python: str
    version: str
    python_version: str = ""
    vllm_version: str = ""  # "" when vllm is not installed on the host
    address: str = ""  # the host's own address, by the ranks' rules
    address_error: str = ""


class Resolved(_Msg):
    """From a user command's bootstrap: the address it chose, just before exec."""

    rank: int
    address: str
    rule: str


class Started(_Msg):
    rank: int
    pid: int


class Ready(_Msg):
    rank: int
    address: str
    port: int
    pid: int
    rule: str
    engine_id: str
    vllm_version: str = ""  # of the vLLM its command runs, if it runs one


class Output(_Msg):
    rank: int
    stream: str  # "stdout" | "stderr"
    line: str


class RankError(_Msg):
    rank: int
    message: str
    fatal: bool = False  # it can never become ready: the job ends now (its exit would be a consequence)


class Exited(_Msg):
    rank: int
    returncode: int  # negative: killed by that signal


class EngineSeen(msgspec.Struct, kw_only=True):
    """What a handshake learned about the engine core behind one port."""

    port: int
    engine_id: str
    compat_hash: str = ""  # "" from vLLM before 0.13 (no hash on the wire)


class CheckResult(_Msg):
    rank: int
    peer: int
    ok: bool
    latency_ms: float = 0.0
    error: str = ""
    engines: list[EngineSeen] = []
    # More ranks of the probing host whose address is ``rank``'s: one network path, probed once, reported once
    # for all of them (a job's results grow as rank pairs; its messages, as paths).
    also: list[int] = []
    # Ranks on ``peer``'s address that this path's probe stands for: not probed from here (their listeners are,
    # from other addresses: check.path_probes); the head judges those cells in CheckMatrix.settle.
    covers: list[int] = []


class TransferResult(CheckResult):
    """A rank's NIXL read of a peer's buffer: moved and verified, or why not."""

    mbps: float = 0.0
    used: str = ""  # what UCX used for the read ('software emulation tcp/eth0')


class Stopping(_Msg):
    """The agent is stopping its ranks; what follows from it is a consequence, not a cause."""

    reason: str
    signal: int = 0  # the signal the agent received (scancel, kill), if that is why


class Swept(_Msg):
    pids: list[int]


class AgentError(_Msg):
    message: str


# --- an agent that dials in (--transport join) ------------------------------------------


class Challenge(_Msg):
    """The head's first line to an agent that connected: prove the token for this nonce."""

    nonce: str


class Join(_Msg):
    """The agent's answer: which host it is, and ``join_proof(token, nonce, host)``."""

    host: str
    proof: str


def join_proof(token: str, nonce: str, host: str) -> str:
    """HMAC-SHA256 of the nonce and the host name under the job's token: the token itself never crosses the wire,
    and a proof heard once is worth nothing for another nonce or another host."""
    import hashlib
    import hmac

    return hmac.new(token.encode(), f"{nonce}\n{host}".encode(), hashlib.sha256).hexdigest()


Message = Union[
    TransferCheck,
    TransferResult,
    AgentSpec,
    Sweep,
    Heartbeat,
    Check,
    Restart,
    Stop,
    Hello,
    Started,
    Resolved,
    Ready,
    Output,
    RankError,
    Exited,
    CheckResult,
    Stopping,
    Swept,
    AgentError,
    Challenge,
    Join,
]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Message)


class ProtocolError(ValueError):
    pass


def encode(message: _Msg) -> bytes:
    """One message as one line, newline included."""
    return _encoder.encode(message) + b"\n"


def decode(line: bytes | str) -> Message:
    """One message; a ProtocolError says what is wrong and where (type, byte offset), never echoing the
    bytes: a spec carries every rank's environment, secrets included."""
    try:
        return _decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"not a launcher message ({exc})") from None
