#!/usr/bin/env bash
# NIXL for `launcher check --transfer` on a CPU host, without torch or CUDA.
#
# `pip install nixl` pulls torch, triton and about 14 nvidia wheels (~6 GB):
# nixl-cu12 declares torch, which its UCX backend does not need on host
# memory. So: numpy, then the two NIXL wheels without their declared
# dependencies (~310 MB, seconds). GPU hosts that run vLLM have torch already:
# there `pip install 'launcher[nixl]'` is the whole story.
#
# Usage: scripts/install-nixl-cpu.sh [PYTHON]   (default: python3). Safe to run again.
set -euo pipefail
python=${1:-python3}
version=1.5.1
if "$python" -c "import numpy; from nixl._api import nixl_agent" 2>/dev/null; then
    exit 0
fi
"$python" -m pip install -q numpy
"$python" -m pip install -q --no-deps "nixl-cu12==$version" "nixl==$version"
"$python" -c "from nixl._api import nixl_agent" || {
    echo "install-nixl-cpu: NIXL $version installed but 'from nixl._api import nixl_agent' fails with $python" >&2
    exit 1
}
