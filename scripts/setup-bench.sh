#!/usr/bin/env bash
# The baselines the benchmarks under scripts/ compare launcher with, from Debian's packages:
# Open MPI's mpirun (bench_loopback.py) and pdsh (bench_launch.py). Not needed by the tests.
set -euo pipefail
missing=()
command -v mpirun >/dev/null || missing+=(openmpi-bin)
command -v pdsh >/dev/null || missing+=(pdsh)
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
python3 -m pip install -q matplotlib
