"""vLLM's own facts about environment variables (run in the vLLM venv); prints JSON.

What tests/test_real_vllm.py compares with launcher's envpolicy and plan:
the side-channel defaults, the worker-specific list, what vLLM copies to
workers, which variables its compile-cache hash covers, and how a leaked
``VLLM_DP_RANK`` moves an engine core's DP index (hence its port).
"""

import importlib.metadata
import json
import os

for name in list(os.environ):  # defaults as a fresh shell sees them
    if name.startswith("VLLM_"):
        del os.environ[name]

import vllm.envs as envs  # noqa: E402
from vllm.config import ParallelConfig  # noqa: E402
from vllm.ray import ray_env  # noqa: E402
from vllm.v1.executor.ray_utils import WORKER_SPECIFIC_ENV_VARS  # noqa: E402

facts = {}
# A DP index leaked through the environment: vLLM applies it when its CLI sets no data parallelism.
os.environ["VLLM_DP_RANK"] = "3"
facts["dp_index_no_cli_dp"] = ParallelConfig().data_parallel_index
facts["dp_index_cli_dp"] = ParallelConfig(data_parallel_size=2, data_parallel_rank=1).data_parallel_index
del os.environ["VLLM_DP_RANK"]

print(
    json.dumps(
        {
            **facts,
            "version": importlib.metadata.version("vllm"),
            "defaults": {n: getattr(envs, n) for n in ("VLLM_NIXL_SIDE_CHANNEL_HOST", "VLLM_NIXL_SIDE_CHANNEL_PORT")},
            "worker_specific": sorted(WORKER_SPECIFIC_ENV_VARS),
            "copy_prefixes": sorted(ray_env.DEFAULT_ENV_VAR_PREFIXES),
            "copy_names": sorted(ray_env.DEFAULT_EXTRA_ENV_VARS),
            "known": sorted(envs.environment_variables),
            "hashed": sorted(envs.compile_factors()),
        }
    )
)
