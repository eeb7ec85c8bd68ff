"""Prefill and decode in one launcher job on real vLLM, the decoder cut off from the prefiller.

vLLM itself, once a KV read's path breaks, waits on the read with no end
(seen here: "KV fetch: 1 in progress" for minutes); launcher's all-pairs
check against vLLM's own side channels finds the cut before any request,
names the address, and stops the job. Its own module, so that the shared
deployments of test_real_vllm.py are gone before it starts.
"""

import shlex
import subprocess

import pytest
from test_real_vllm import head_env, kv

from conftest import failed_line, launcher_cmd, wait_for, write_hostfile
from support.netns import NET

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.real_vllm]


def test_a_prefiller_the_decoder_cannot_reach_fails_the_check_naming_the_address(cluster, real_vllm, tmp_path):
    h3 = cluster.host("h3")
    h3.run("ip", "route", "add", "unreachable", f"{NET}.11/32")
    try:
        hf = write_hostfile(tmp_path, "h1\nh3\n")
        done = subprocess.run(
            launcher_cmd(
                "run",
                "-H",
                hf,
                *cluster.ssh_args(),
                "--check",
                "--ready-timeout",
                "400",
                "--handshake-timeout",
                "3",
                "--head-command",
                shlex.join(real_vllm.serve("--port", "8100", "--kv-transfer-config", kv("kv_producer"))),
                "--",
                *real_vllm.serve("--port", "8200", "--kv-transfer-config", kv("kv_consumer")),
            ),
            capture_output=True,
            text=True,
            timeout=600,
            env=head_env(real_vllm),
        )
    finally:
        h3.run("ip", "route", "del", "unreachable", f"{NET}.11/32")
    assert done.returncode == 5, done.stderr[-3000:]
    assert failed_line(done.stderr).startswith("2 of 4 pairs failed the check; first: r")
    # Both DP-less vLLMs bind base + 0 on their own hosts, as vLLM does; the cut is named with the address.
    assert f"r1 (h3) -> r0 (h1): {NET}.11:5600: No route to host" in done.stdout, done.stdout[-2000:]
    assert wait_for(lambda: not cluster.stray_pids(), timeout=20), f"left on hosts: {cluster.stray_pids()}"
