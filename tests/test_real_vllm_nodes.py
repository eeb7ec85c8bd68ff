"""Multi-node tensor parallel without Ray on real vLLM: --vllm-nodes over two namespace hosts, gloo over TCP.

Its own module, so that the deployments of test_real_vllm.py are gone before it starts.
"""

import signal

import pytest
from test_real_vllm import SLOW_MACHINE, ended_by, head_env, pulled_over_nixl, served

from conftest import RunningLauncher, free_port_base, wait_for, write_hostfile
from support.netns import NET

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.real_vllm]


def test_tensor_parallel_over_two_hosts_serves_a_completion(cluster, real_vllm, tmp_path):
    """vLLM's multiprocessing executor over gloo: each node's workers must bind their own interface
    (GLOO_SOCKET_IFNAME, set by launcher), or h2's dial h1's 127.0.0.1 ("Gloo connectFullMesh failed")."""
    run = RunningLauncher(
        ["-H", write_hostfile(tmp_path, "h1\nh2\n"), *cluster.ssh_args(), "--vllm-nodes", *SLOW_MACHINE,
         "--", *real_vllm.serve("--tensor-parallel-size", "2", "--port", "8300")],
        env=head_env(real_vllm),
    )  # fmt: skip
    try:
        rows = run.ready_rows(2, timeout=400)
        assert [r[:3] for r in rows] == [(0, "h1", f"{NET}.11"), (1, "h2", f"{NET}.12")]
        done = served((run,), f"http://{NET}.11:8300/v1/completions", {"model": real_vllm.model, "prompt": "hello", "max_tokens": 3})
        assert done["usage"]["completion_tokens"] == 3
    finally:
        run.proc.send_signal(signal.SIGINT)
    assert run.finish(timeout=90) == 130, ended_by(run)
    assert wait_for(lambda: not cluster.stray_pids(), timeout=20), f"left on hosts: {cluster.stray_pids()}"


def test_a_prefill_instance_of_two_tensor_parallel_nodes_hands_its_kv_to_a_decoder(cluster, real_vllm, tmp_path):
    """--prefill h1+h2 --vllm-nodes: the prefill is one TP 2 instance over two hosts; the decoder on h3 pulls
    each TP rank's KV blocks over NIXL, h2's from h2's worker."""
    proxy = free_port_base(2)
    run = RunningLauncher(
        ["-H", write_hostfile(tmp_path, "h1\nh2\nh3\n"), *cluster.ssh_args(), "--prefill", "h1+h2", "--decode", "h3",
         "--vllm-nodes", "--proxy-port", str(proxy), *SLOW_MACHINE,
         "--", *real_vllm.serve("--tensor-parallel-size", "2", "--port", "8300")],
        env=head_env(real_vllm),
    )  # fmt: skip
    try:
        run.ready_rows(3, timeout=400)
        assert wait_for(lambda: any("P/D proxy on http://" in line for line in run.stderr), timeout=60), ended_by(run)
        prompt = "the quick brown fox jumps over the lazy dog " * 6
        body = {"model": real_vllm.model, "prompt": prompt, "max_tokens": 4}
        done, before, after = pulled_over_nixl((run,), f"http://127.0.0.1:{proxy}/v1/completions", body, f"{NET}.13:8300")
        assert done["usage"]["completion_tokens"] == 4
        assert after["vllm:nixl_bytes_transferred_sum"] > before.get("vllm:nixl_bytes_transferred_sum", 0)
        assert after["vllm:nixl_num_failed_transfers_total"] == before.get("vllm:nixl_num_failed_transfers_total", 0)
    finally:
        run.proc.send_signal(signal.SIGINT)
    assert run.finish(timeout=90) == 130, ended_by(run)
    assert wait_for(lambda: not cluster.stray_pids(), timeout=20), f"left on hosts: {cluster.stray_pids()}"
