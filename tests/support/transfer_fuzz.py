"""Hostile peer metadata into a real NIXL agent: every input is a failed pair with a reason, never a crash.

Run by tests/test_transfer.py in a process of its own; prints one JSON line
and leaves with os._exit (NIXL 1.5.1 crashes in its destructor when two
connected agents share a process at exit, which is this script's setup only).
"""

import json
import os
import sys

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.transfer import TransferEndpoint, TransferFailed


def main() -> None:
    reader, peer = TransferEndpoint("fuzz-a", 0, 4096, "lo"), TransferEndpoint("fuzz-b", 1, 4096, "lo")
    good = peer.metadata()
    blob = good.agent_metadata
    seen = {"examples": 0, "failed_pairs": 0, "reasons_without_text": 0}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        cut=st.integers(0, len(blob)),
        flips=st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)), max_size=6),
        tail=st.binary(max_size=64),
        address=st.one_of(st.just(good.kv_caches_base_addr[0]), st.integers(0, 2**64 - 1)),
        length=st.integers(0, 2**40),
        n=st.integers(0, 10**9),
    )
    def read(cut, flips, tail, address, length, n):
        data = bytearray(blob[:cut] + tail)
        for i, value in flips:
            if i < len(data):
                data[i] = value
        hostile = msgspec.structs.replace(
            good, engine_id=f"hostile-{n}", agent_metadata=bytes(data), kv_caches_base_addr=[address], block_lens=[length]
        )
        seen["examples"] += 1
        try:
            reader.read(hostile, 1, timeout=0.5)
        except TransferFailed as exc:
            seen["failed_pairs"] += 1
            seen["reasons_without_text"] += not str(exc)

    read()
    reader.close()
    peer.close()
    print(json.dumps(seen), flush=True)
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
