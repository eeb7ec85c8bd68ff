"""The built-in engine-core rank: detect this host's address, bind, serve.

It does at start-up what vLLM's engine core does after PR #41806: resolve this
host's own IP, ``os.environ.setdefault`` it into ``VLLM_NIXL_SIDE_CHANNEL_HOST``
and ``VLLM_HOST_IP``, then bind the NIXL side-channel listener at
``VLLM_NIXL_SIDE_CHANNEL_PORT + dp_rank``. It checks the address is local
before binding, so a wrong address is a one-line error, not a ZMQ traceback
and not a hang.

Run by the agent as ``python -m launcher.engine_core``; its identity comes from
its environment (``rankenv``).
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import threading

from . import control, exitcodes, netif, protocol, rankenv
from .vllm import wire
from .vllm.sidechannel import SideChannelBindError, SideChannelListener

IDLE_POLL_MS = 1000  # with no connection open; while one is, the listener looks every 50 ms (its watchdog)


def builtin_payload(engine_id: str, job_id: str, tp_rank: int = 0, metadata: wire.NixlAgentMetadata | None = None) -> bytes:
    """The handshake payload of the built-in engine core, in vLLM's current format: ``metadata`` (a real NIXL
    agent's, with --transfer) or a placeholder with no KV cache behind it."""
    metadata = metadata or wire.NixlAgentMetadata(
        engine_id=engine_id,
        agent_metadata=f"launcher-agent:{engine_id}:tp{tp_rank}".encode(),
        kv_caches_base_addr=[],
        device_id=tp_rank,
        num_blocks=0,
        block_lens=[],
        block_strides=[],
        kv_cache_layout="HND",
        block_size=16,
        ssm_sizes=(0, 0),
        attn_backend_name="launcher-builtin",
        physical_blocks_per_logical_kv_block=1,
    )
    return wire.encode_payload(metadata, wire.compatibility_hash(job_id))


def _raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> int:
    env = os.environ
    try:
        me = rankenv.RankIdentity.from_env(env)
    except rankenv.RankEnvError as exc:
        return control.rank_failed(0, str(exc), exitcodes.RANK_BAD_ADDRESS)
    rank, engine_id, port = me.rank, me.engine_id, me.port  # as vLLM: base + DP index
    _raise_open_files_limit()  # every peer's connection is a descriptor: use all the host allows

    try:
        choice = netif.claim_bind_address(env)
    except netif.BindAddressError as exc:
        return control.rank_failed(rank, str(exc), exitcodes.RANK_BAD_ADDRESS)

    endpoint = None
    if me.transfer_bytes:
        from .transfer import NixlMissing, TransferEndpoint

        try:
            interface = netif.interface_of(choice.address)
            endpoint = TransferEndpoint(engine_id, rank, me.transfer_bytes, interface, env, memory=me.transfer_memory or "host")
        except NixlMissing as exc:
            return control.rank_failed(rank, str(exc), exitcodes.RANK_NO_NIXL)
    metadata = endpoint.metadata() if endpoint else None
    listener = SideChannelListener(choice.address, port, {0: builtin_payload(engine_id, me.job_id, 0, metadata)})
    try:
        listener.bind()
    except SideChannelBindError as exc:
        return control.rank_failed(rank, str(exc), exitcodes.RANK_PORT_TAKEN)
    facts = rankenv.HostFacts.from_env(env)
    if endpoint and facts.command_fd is not None:
        threading.Thread(target=_obey, args=(facts.command_fd, endpoint, me, choice.address), daemon=True).start()

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    # A signal writes to this pipe the moment it arrives, so the listener waits on it and its socket
    # instead of waking every few milliseconds to look at ``stop``.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    print(f"engine core {engine_id} listening on {listener.endpoint} ({choice.rule})", flush=True)
    control.report_to_agent(
        protocol.Ready(rank=rank, address=choice.address, port=port, pid=os.getpid(), rule=choice.rule, engine_id=engine_id)
    )
    try:
        listener.serve(stop, idle_ms=IDLE_POLL_MS, on_idle=endpoint.progress if endpoint else None, wake_fd=wake_r)
    finally:
        listener.close()
        if endpoint:
            endpoint.close()
    return 0


def _obey(fd: int, endpoint, me: rankenv.RankIdentity, address: str) -> None:
    """The agent's commands to this rank, one JSON line each: a transfer check of its peers."""
    with os.fdopen(fd, "rb") as pipe:
        for raw in pipe:
            try:
                command = protocol.decode(raw)
            except protocol.ProtocolError:
                continue
            if isinstance(command, protocol.TransferCheck):
                endpoint.expect_reads(2 * command.timeout * len(command.peers) + 2)  # every peer may read us meanwhile
                wanted = None if command.pairs is None else {tuple(p) for p in command.pairs}
                for peer in command.peers:
                    if peer.rank != me.rank and (wanted is None or (me.rank, peer.rank) in wanted):
                        control.report_to_agent(_read_peer(endpoint, me, address, peer, command.timeout))


def _read_peer(endpoint, me: rankenv.RankIdentity, address: str, peer: protocol.Peer, timeout: float) -> protocol.TransferResult:
    """Fetch the peer's NIXL metadata over its side channel, READ its buffer, verify it."""
    from .transfer import TransferFailed
    from .vllm.sidechannel import HandshakeError, handshake

    try:
        reply = handshake(peer.address, peer.ports[0], wire.CURRENT, timeout=timeout, source=address).reply
        if peer.expect_engine_id and reply.metadata.engine_id != peer.expect_engine_id:
            raise TransferFailed(f"engine ID mismatch: expected {peer.expect_engine_id}, got {reply.metadata.engine_id}")
        latency, mbps, used = endpoint.read(reply.metadata, peer.rank, timeout)
    except (HandshakeError, TransferFailed) as exc:
        return protocol.TransferResult(rank=me.rank, peer=peer.rank, ok=False, error=str(exc))
    return protocol.TransferResult(rank=me.rank, peer=peer.rank, ok=True, latency_ms=round(latency, 3), mbps=round(mbps, 1), used=used)


if __name__ == "__main__":
    sys.exit(main())
