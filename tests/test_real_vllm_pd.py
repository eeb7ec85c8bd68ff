"""Prefill/decode in one command on real vLLM: --prefill/--decode, the head's proxy, KV pulled over NIXL.

Its own module, so that the shared deployments of test_real_vllm.py are gone
before it starts (two CPU vLLMs at a time on this machine).
"""

import signal
import urllib.error

import pytest
from test_real_vllm import SLOW_MACHINE, ended_by, head_env, metrics, post

from conftest import RunningLauncher, free_port_base, wait_for, write_hostfile
from support.netns import NET

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.real_vllm]


def test_one_command_serves_prefill_then_decode_and_the_decoder_pulls_kv_over_nixl(cluster, real_vllm, tmp_path):
    proxy = free_port_base(2)
    run = RunningLauncher(
        ["-H", write_hostfile(tmp_path, "h1\nh2\n"), *cluster.ssh_args(), "--prefill", "h1", "--decode", "h2",
         "--proxy-port", str(proxy), "--check", *SLOW_MACHINE, "--", *real_vllm.serve("--port", "8100")],
        env=head_env(real_vllm),
    )  # fmt: skip
    try:
        run.ready_rows(2, timeout=400)
        assert wait_for(lambda: any("P/D proxy on http://127.0.0.1:" in line for line in run.stderr), timeout=60), run.stderr[-5:]
        assert any("all 4 handshakes ok" in line for line in run.stdout), run.stdout[-20:]  # vLLM's own side channels, v2 wire
        before = metrics(f"{NET}.12:8100")
        prompt = "the quick brown fox jumps over the lazy dog " * 6
        for _ in range(2):
            try:
                done = post(f"http://127.0.0.1:{proxy}/v1/completions", {"model": real_vllm.model, "prompt": prompt, "max_tokens": 4})
            except OSError as exc:
                body = exc.read()[:500] if isinstance(exc, urllib.error.HTTPError) else b""
                log = tmp_path / "deployment.log"
                log.write_text("\n".join(run.stdout + run.stderr))
                pytest.fail(
                    f"{exc} {body!r}; the deployment's output is in {log}; "
                    f"its errors: {[line for line in run.stdout if 'Error' in line][:8]}; {ended_by(run)}"
                )
            assert done["usage"]["completion_tokens"] == 4
        after = metrics(f"{NET}.12:8100")
        # vLLM's own evidence on the decoder: bytes read over NIXL, prompt tokens that came from the transfer, no failure.
        assert after["vllm:nixl_bytes_transferred_sum"] > before.get("vllm:nixl_bytes_transferred_sum", 0)
        assert after["vllm:prompt_tokens_by_source_total[external_kv_transfer]"] >= 2 * 50
        assert after["vllm:nixl_num_failed_transfers_total"] == 0
    finally:
        run.proc.send_signal(signal.SIGINT)
    assert run.finish(timeout=90) == 130
    assert wait_for(lambda: not cluster.stray_pids(), timeout=20), f"left on hosts: {cluster.stray_pids()}"
