"""Prefill/decode in one command on real vLLM: --prefill/--decode, the head's proxy, KV pulled over NIXL.

Its own module, so that the shared deployments of test_real_vllm.py are gone
before it starts (two CPU vLLMs at a time on this machine).
"""

import os
import signal
import urllib.error

import psutil
import pytest
from test_real_vllm import SLOW_MACHINE, ended_by, head_env, metrics, post

from conftest import RunningLauncher, free_port_base, wait_for, write_hostfile
from support.netns import NET

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.real_vllm]


def _title(pid: int) -> str:
    try:
        process = psutil.Process(pid)
        return f"{process.name()} {' '.join(process.cmdline())}"
    except psutil.Error:
        return ""


def test_one_command_serves_prefill_then_decode_and_the_decoder_pulls_kv_over_nixl(cluster, real_vllm, tmp_path):
    """And, once it served: the prefill's EngineCore killed, the prefill restarts alone, then (--restart-peers) the
    decoder that held its old NIXL metadata, and a request through the proxy is served from the new prefill."""
    proxy = free_port_base(2)
    run = RunningLauncher(
        ["-H", write_hostfile(tmp_path, "h1\nh2\n"), *cluster.ssh_args(), "--prefill", "h1", "--decode", "h2",
         "--proxy-port", str(proxy), "--check", *SLOW_MACHINE, "--restart", "on-failure", "--restart-peers",
         "--restart-backoff", "1,2", "--", *real_vllm.serve("--port", "8100")],
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

        core = next(pid for pid in cluster.host("h1").pids() if "EngineCore" in _title(pid))
        os.kill(core, signal.SIGKILL)
        said = lambda text: any(text in line for line in run.stderr)
        assert wait_for(lambda: said("restarting prefill instance h1"), timeout=120), ended_by(run)
        assert wait_for(lambda: said("decode instance h2 is ready again after restart 1") or run.proc.poll() is not None, timeout=600)
        assert said("prefill instance h1 is ready again after restart 1"), ended_by(run)
        assert said("restarting decode instance h2") and said("(--restart-peers)"), run.stderr[-10:]
        assert said("decode instance h2 is ready again after restart 1"), ended_by(run)
        done = post(f"http://127.0.0.1:{proxy}/v1/completions", {"model": real_vllm.model, "prompt": prompt, "max_tokens": 4})
        assert done["usage"]["completion_tokens"] == 4
        fresh = metrics(f"{NET}.12:8100")  # the new decoder's own counters: it pulled from the new prefill
        assert fresh["vllm:nixl_bytes_transferred_sum"] > 0 and fresh["vllm:nixl_num_failed_transfers_total"] == 0
    finally:
        run.proc.send_signal(signal.SIGINT)
    assert run.finish(timeout=90) == 130
    assert wait_for(lambda: not cluster.stray_pids(), timeout=20), f"left on hosts: {cluster.stray_pids()}"
