#!/usr/bin/env bash
# Install what the tests need on a fresh Debian machine: openssh-server (a real
# sshd per test host), iproute2 (network namespaces), Slurm's controller, node
# daemon and client (a real Slurm on those hosts; auth/none, so munged is never
# started), then this package with its test extras, and NIXL without torch (the
# transfer check's tests). Safe to run again.
set -euo pipefail
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ip >/dev/null || missing+=(iproute2)
command -v ssh-keygen >/dev/null || missing+=(openssh-client)
command -v unshare >/dev/null || missing+=(util-linux)
command -v slurmctld >/dev/null || missing+=(slurmctld)
command -v slurmd >/dev/null || missing+=(slurmd)
command -v sbatch >/dev/null || missing+=(slurm-client)
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's packages start no daemon without systemd here; the tests start their own.
mkdir -p /run/sshd
python3 -m pip install -q -e ".[test]"
bash "$(dirname "$0")/install-nixl-cpu.sh" python3
# Real vLLM (CPU build) and a tiny model, in a venv of their own: scripts/setup-real-vllm.sh.
bash "$(dirname "$0")/setup-real-vllm.sh"
# vllm-project's router (Rust, a wheel from PyPI) for run --router, in a venv of its own: its FastAPI and
# uvicorn pins must not move vLLM's. LAUNCHER_VLLM_HOME as in setup-real-vllm.sh.
router=${LAUNCHER_VLLM_HOME:-/opt/launcher-test}/router
if [ ! -x "$router/bin/vllm-router" ]; then
    python3 -m venv "$router"
    "$router/bin/python" -m pip install -q --disable-pip-version-check vllm-router==0.1.17
fi
