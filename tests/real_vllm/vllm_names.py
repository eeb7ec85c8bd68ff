"""vLLM's own facts about environment variables (run in the vLLM venv); prints JSON.

What tests/test_real_vllm.py compares with launcher's envpolicy and plan:
the side-channel defaults, the worker-specific list, what vLLM copies to
workers, and which variables its compile-cache hash covers.
"""

import importlib.metadata
import json
import os

for name in list(os.environ):  # defaults as a fresh shell sees them
    if name.startswith("VLLM_"):
        del os.environ[name]

import vllm.envs as envs  # noqa: E402
from vllm.ray import ray_env  # noqa: E402
from vllm.v1.executor.ray_utils import WORKER_SPECIFIC_ENV_VARS  # noqa: E402

print(json.dumps({
    "version": importlib.metadata.version("vllm"),
    "defaults": {n: getattr(envs, n) for n in ("VLLM_NIXL_SIDE_CHANNEL_HOST", "VLLM_NIXL_SIDE_CHANNEL_PORT")},
    "worker_specific": sorted(WORKER_SPECIFIC_ENV_VARS),
    "copy_prefixes": sorted(ray_env.DEFAULT_ENV_VAR_PREFIXES),
    "copy_names": sorted(ray_env.DEFAULT_EXTRA_ENV_VARS),
    "known": sorted(envs.environment_variables),
    "hashed": sorted(envs.compile_factors()),
}))
