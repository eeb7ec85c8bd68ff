"""The all-pairs check from this host: a probe of one peer from one of this host's ranks."""

from __future__ import annotations

import msgspec

from .. import protocol
from ..probe import ProbeError, tcp_connect
from ..vllm import wire


def probe_peer(mine: protocol.Ready, peer: protocol.Peer, timeout: float) -> protocol.CheckResult:
    """Probe every side-channel port of ``peer`` from ``mine``'s address: a handshake of the peer's wire, or a TCP connect."""
    from ..vllm.sidechannel import HandshakeError, handshake  # ZMQ: for a check only, not on every agent's start

    latencies, engines = [], []
    try:
        for port in peer.ports:
            if peer.wire == wire.TCP:  # safe against any listener, a real vLLM's included
                latencies.append(tcp_connect(peer.address, port, timeout, source=mine.address))
                continue
            done = handshake(peer.address, port, wire.generation(peer.wire), timeout=timeout, source=mine.address)
            meta, got_hash = done.reply.metadata, done.reply.compat_hash or ""
            where = f"{peer.address}:{port}"
            if peer.expect_hash is not None and got_hash and got_hash != peer.expect_hash:  # "": no hash on this wire
                raise HandshakeError(f"{where}: compatibility hash mismatch (another job's engine is listening there)")
            if peer.expect_engine_id is not None and meta.engine_id != peer.expect_engine_id:
                raise HandshakeError(f"{where}: engine ID mismatch: expected {peer.expect_engine_id}, got {meta.engine_id}")
            latencies.append(done.latency_ms)
            engines.append(protocol.EngineSeen(port=port, engine_id=meta.engine_id, compat_hash=got_hash))
    except (HandshakeError, ProbeError, wire.WireError) as exc:
        return protocol.CheckResult(rank=mine.rank, peer=peer.rank, ok=False, error=str(exc))
    return protocol.CheckResult(rank=mine.rank, peer=peer.rank, ok=True, latency_ms=round(max(latencies), 3), engines=engines)


def probe_path(mine: protocol.Ready, first: list[protocol.Peer], rest: list[protocol.Peer], timeout: float) -> list[protocol.CheckResult]:
    """One network path from ``mine``'s address to one destination address: probe ``first``; when all answer,
    the path stands for ``rest`` (``covers``); when one does not, probe ``rest`` too, so that every cell of a
    broken path or listener is reported as the full check would (``check.path_probes``)."""
    results = [probe_peer(mine, peer, timeout) for peer in first]
    if all(r.ok for r in results):
        if rest:
            results[0] = msgspec.structs.replace(results[0], covers=[p.rank for p in rest])
        return results
    return results + [probe_peer(mine, peer, timeout) for peer in rest]
