#!/usr/bin/env bash
# Install what the tests need on a fresh Debian machine: openssh-server (a real
# sshd per test host) and iproute2 (network namespaces), then this package with
# its test extras. Safe to run again.
set -euo pipefail
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ip >/dev/null || missing+=(iproute2)
command -v ssh-keygen >/dev/null || missing+=(openssh-client)
command -v unshare >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's package starts no daemon without systemd here; the tests start their own.
mkdir -p /run/sshd
python3 -m pip install -q -e ".[test]"
