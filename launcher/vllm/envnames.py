"""vLLM's environment facts that launcher's policy rests on: which names are worker-specific, which are hashed.

Tracks vLLM's releases: ``tests/test_real_vllm.py`` compares both sets with
the installed vLLM (``vllm.v1.executor.ray_utils.WORKER_SPECIFIC_ENV_VARS``,
``vllm.envs.compile_factors``). The policy that uses them is ``envpolicy``.
"""

from __future__ import annotations

from collections.abc import Mapping

_BIND = "this host's own address, detected on each host"
_DEVICES = "device visibility belongs to each host's own devices"
_DP = "vLLM applies it silently when its CLI sets no data parallelism, changing a host's DP index and port"

# Never copied from the head, whatever the allowlist says (vLLM's
# WORKER_SPECIFIC_ENV_VARS, plus the DP identity and the generic rank names).
WORKER_SPECIFIC: Mapping[str, str] = {
    "VLLM_HOST_IP": _BIND,
    "VLLM_HOST_PORT": "a per-host port",
    "VLLM_NIXL_SIDE_CHANNEL_HOST": _BIND,
    "LOCAL_RANK": "a per-rank identity",
    "RANK": "a per-rank identity",
    "CUDA_VISIBLE_DEVICES": _DEVICES,
    "HIP_VISIBLE_DEVICES": _DEVICES,
    "ROCR_VISIBLE_DEVICES": _DEVICES,
    "ASCEND_RT_VISIBLE_DEVICES": _DEVICES,
    "VLLM_DP_RANK": _DP,
    "VLLM_DP_RANK_LOCAL": _DP,
    "VLLM_DP_SIZE": _DP,
    "VLLM_DP_MASTER_IP": _DP,
    "VLLM_DP_MASTER_PORT": _DP,
}

# The VLLM_ variables vLLM 0.32 leaves out of its compile-cache hash
# (vllm.envs.compile_factors drops its ignored_factors): ranks of one job may
# differ in these without compiling separately; every other variable vLLM
# knows is hashed, VLLM_DP_RANK/_LOCAL/_SIZE included. tests/test_real_vllm.py
# compares this set with the installed vLLM's compile_factors().
COMPILE_HASH_IGNORED = frozenset(
    {
        "VLLM_API_KEY",
        "VLLM_ASSETS_CACHE",
        "VLLM_ASSETS_CACHE_MODEL_CLEAN",
        "VLLM_AUDIO_FETCH_TIMEOUT",
        "VLLM_CACHE_ROOT",
        "VLLM_CONFIG_ROOT",
        "VLLM_CPU_KVCACHE_SPACE",
        "VLLM_CUDA_COMPATIBILITY_PATH",
        "VLLM_DEBUG_DUMP_PATH",
        "VLLM_DEBUG_LOG_API_SERVER_RESPONSE",
        "VLLM_DO_NOT_TRACK",
        "VLLM_DP_MASTER_IP",
        "VLLM_DP_MASTER_PORT",
        "VLLM_ELASTIC_EP_SCALE_UP_LAUNCH",
        "VLLM_ENABLE_CUDA_COMPATIBILITY",
        "VLLM_ENABLE_STARTUP_PLAN",
        "VLLM_ENABLE_V1_MULTIPROCESSING",
        "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS",
        "VLLM_FLASHINFER_AUTOTUNE_CACHE_DIR",
        "VLLM_FLASHINFER_AUTOTUNE_SKIP_OPS",
        "VLLM_FORCE_AOT_LOAD",
        "VLLM_HOST_IP",
        "VLLM_HTTP_TIMEOUT_KEEP_ALIVE",
        "VLLM_IMAGE_FETCH_TIMEOUT",
        "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH",
        "VLLM_LOGGING_COLOR",
        "VLLM_LOGGING_CONFIG_PATH",
        "VLLM_LOGGING_LEVEL",
        "VLLM_LOGGING_PREFIX",
        "VLLM_LOGGING_STREAM",
        "VLLM_LOG_STATS_INTERVAL",
        "VLLM_MAX_AUDIO_CLIP_FILESIZE_MB",
        "VLLM_MAX_AUDIO_DECODE_BYTES",
        "VLLM_MAX_AUDIO_DECODE_DURATION_S",
        "VLLM_MAX_AUDIO_PREPROCESS_WORKERS",
        "VLLM_MAX_EMBED_DECODE_BYTES",
        "VLLM_MAX_IMAGE_PIXELS",
        "VLLM_MEDIA_CACHE",
        "VLLM_MEDIA_CACHE_MAX_SIZE_MB",
        "VLLM_MEDIA_CACHE_TTL_HOURS",
        "VLLM_MEDIA_CONNECTOR",
        "VLLM_MEDIA_FETCH_MAX_RETRIES",
        "VLLM_MEDIA_LOADING_THREAD_COUNT",
        "VLLM_MEDIA_URL_ALLOW_REDIRECTS",
        "VLLM_MODEL_REDIRECT_PATH",
        "VLLM_NIXL_SIDE_CHANNEL_HOST",
        "VLLM_NO_USAGE_STATS",
        "VLLM_OBJECT_STORAGE_SHM_BUFFER_NAME",
        "VLLM_PORT",
        "VLLM_RANDOMIZE_DP_DUMMY_INPUTS",
        "VLLM_RINGBUFFER_WARNING_INTERVAL",
        "VLLM_RPC_BASE_PATH",
        "VLLM_SERVER_DEV_MODE",
        "VLLM_SKIP_MODEL_NAME_VALIDATION",
        "VLLM_SKIP_VERSION_SUFFIX",
        "VLLM_TEST_FORCE_LOAD_FORMAT",
        "VLLM_TRITON_JIT_WARMUP_NUM_THREADS",
        "VLLM_TUNED_CONFIG_FOLDER",
        "VLLM_USAGE_STATS_SERVER",
        "VLLM_USE_MODELSCOPE",
        "VLLM_V1_OUTPUT_PROC_CHUNK_SIZE",
        "VLLM_VIDEO_FETCH_TIMEOUT",
        "VLLM_VIDEO_LOADER_BACKEND",
        "VLLM_WORKER_MULTIPROC_METHOD",
        "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS",
        "VLLM_XLA_CACHE_PATH",
        "VLLM_ZENTORCH_WEIGHT_PREPACK",
    }
)

DEVICE_VISIBILITY = frozenset(name for name, why in WORKER_SPECIFIC.items() if why == _DEVICES)
