"""Head environment -> rank environment.

The seed's lesson made structural (vLLM PR #41806): copy only an allowlist of
the head's variables, then drop every worker-specific one whatever the
allowlist says, then apply the user's explicit values. A rank never inherits
the head's bind address, device visibility or data-parallel identity.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence

import msgspec

from . import rankenv

# vLLM's own copy rules (vllm.ray.ray_env.DEFAULT_ENV_VAR_PREFIXES) plus NIXL_ and TORCH_.
DEFAULT_PREFIXES = ("VLLM_", "NCCL_", "UCX_", "NIXL_", "HF_", "HUGGING_FACE_", "LMCACHE_", "FLASH_ATTENTION_", "TORCH_")
DEFAULT_NAMES = ("PYTHONHASHSEED",)

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

# A name is secret-looking when one of its parts (split at _ and any other non-alphanumeric) is a short word here,
# or contains a long one (MYPASSWORD, GITHUB_TOKENS); PWD, KEYBOARD are not.
_SECRET_PARTS = frozenset({"PW", "PASS", "KEY", "AUTH", "PAT", "APIKEY", "CRED", "SALT", "CERT", "COOKIE", "SIGNATURE"})
_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDS", "PRIVATE")
_URL_PASSWORD = re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^/\s:@]*:)([^@/\s]+)@")
MASK = "****"


def in_compile_hash(name: str) -> bool:
    """Whether vLLM's compile-cache hash covers this variable."""
    return name.startswith("VLLM_") and name not in COMPILE_HASH_IGNORED


def is_secret(name: str) -> bool:
    upper = name.upper()
    parts = re.split(r"[^A-Z0-9]+", upper)  # '_' in a valid name; '-' or '.' in a misspelt one (HF-API-KEY) is a secret's name too
    return any(part in _SECRET_PARTS for part in parts) or any(word in upper for word in _SECRET_WORDS)


def masked(name: str, value: str) -> str:
    """The value as it may be printed: secret-looking names show ``****``, and so does a password in a URL."""
    if is_secret(name) and value:
        return MASK
    return _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + "@", value)


class EnvPolicy(msgspec.Struct, frozen=True):
    """Which head variables ranks receive: default allowlist plus ``include`` patterns.

    A pattern is an exact name (``MY_VAR``), a prefix ending in ``_`` or ``*``
    (``MYAPP_``, ``MYAPP*``), or any shell glob (``*_HOME``).
    """

    include: tuple[str, ...] = ()

    def allow_rule(self, name: str) -> str | None:
        """The rule that copies ``name``, or None if the allowlist rejects it."""
        for prefix in DEFAULT_PREFIXES:
            if name.startswith(prefix):
                return f"prefix {prefix}"
        if name in DEFAULT_NAMES:
            return f"name {name}"
        for pattern in self.include:
            if pattern == name:
                return f"--env-include {pattern}"
            if pattern.endswith("_") and name.startswith(pattern):
                return f"--env-include {pattern}"
            if fnmatch.fnmatchcase(name, pattern):
                return f"--env-include {pattern}"
        return None


class EnvReport(msgspec.Struct, frozen=True):
    """A rank's environment and how each variable got there (or did not)."""

    env: Mapping[str, str]
    copied: Mapping[str, str]  # name -> allowlist rule
    dropped: Mapping[str, str]  # name -> reason
    set: Mapping[str, str]  # name -> source (--env, host option, launcher)


def rank_environment(
    head_env: Mapping[str, str],
    policy: EnvPolicy,
    *,
    job_env: Sequence[tuple[str, str]] = (),
    host_env: Sequence[tuple[str, str]] = (),
    rank_env: Mapping[str, str] | None = None,
) -> EnvReport:
    """Allowlist the head env, drop worker-specific names, then apply explicit values.

    Order: copied < ``--env`` < per-host options; launcher rank values never
    overwrite a value set explicitly for the host.
    """
    env: dict[str, str] = {}
    copied: dict[str, str] = {}
    dropped: dict[str, str] = {}
    sources: dict[str, str] = {}
    for name in sorted(head_env):
        if name.startswith(rankenv.PREFIX):
            continue  # the head's own launcher state never travels
        if name in WORKER_SPECIFIC:  # whatever the allowlist says
            dropped[name] = f"worker-specific: {WORKER_SPECIFIC[name]}"
            continue
        rule = policy.allow_rule(name)
        if rule is None:
            continue
        env[name] = head_env[name]
        copied[name] = rule
    for name, value in job_env:
        env[name] = value
        sources[name] = "--env"
        copied.pop(name, None)
    for name, value in host_env:
        env[name] = value
        sources[name] = "host option"
        copied.pop(name, None)
        dropped.pop(name, None)  # honoured: set explicitly for this host
    for name, value in (rank_env or {}).items():
        if sources.get(name) == "host option":
            continue
        env[name] = value
        sources[name] = "launcher"
        copied.pop(name, None)
    return EnvReport(env=env, copied=copied, dropped=dropped, set=sources)


DEVICE_VISIBILITY = frozenset(name for name, why in WORKER_SPECIFIC.items() if why == _DEVICES)


# What a login gives an agent (sshd's session, roughly): the host layer of a rank's environment for the
# backends that start agents from the head's own environment (local, Slurm), so that everything else of
# the head's reaches a rank only through the allowlist, as over SSH.
LOGIN_NAMES = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")


def login_environment(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k in LOGIN_NAMES or k.startswith("LC_")}


def without_worker_specific(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` minus every worker-specific name: what a transport may carry from the head to a host."""
    return {k: v for k, v in env.items() if k not in WORKER_SPECIFIC}


class EnvLayer(msgspec.Struct, frozen=True):
    """One layer of a rank's environment: its name, what it holds, and the code that applies it
    (``module.name`` in launcher; ``tests/test_envpolicy.py`` resolves each)."""

    name: str
    meaning: str
    applied_by: str


# What a rank's environment is made of, in the order the layers apply (later wins, but a host option is never overwritten).
LAYERS: tuple[EnvLayer, ...] = (
    EnvLayer(
        "host",
        "the agent's own environment on the host (its login, or srun's), minus worker-specific and LAUNCHER_ names; "
        "device visibility the host set itself is kept",
        "envpolicy.host_environment",
    ),
    EnvLayer("copied", "the head's variables on the allowlist, minus worker-specific ones", "envpolicy.rank_environment"),
    EnvLayer("--env", "set for every rank on the command line", "envpolicy.rank_environment"),
    EnvLayer("host option", "env: on the host's hostfile line; never overwritten by what follows", "envpolicy.rank_environment"),
    EnvLayer(
        "launcher",
        "the rank's identity (LAUNCHER_RANK, ...) and VLLM_NIXL_SIDE_CHANNEL_PORT, one value per job",
        "rankenv.RankIdentity.to_env",
    ),
    EnvLayer(
        "host facts",
        "added by the agent: the address the head reached the host on, {head_ip}, the control pipe",
        "envpolicy.process_environment",
    ),
    EnvLayer(
        "address",
        "on the host, before the command runs: VLLM_NIXL_SIDE_CHANNEL_HOST and VLLM_HOST_IP setdefault to the address the rank binds",
        "bootstrap.prepare",
    ),
)


def process_environment(host_env: Mapping[str, str], planned: Mapping[str, str], facts: rankenv.HostFacts) -> dict[str, str]:
    """What the agent starts a rank with: the host layer (``host_environment``), the plan's layers, the host facts."""
    return {**host_env, **planned, **facts.to_env()}


def host_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The environment an agent was started with, as the base of its ranks'.

    Worker-specific and launcher names are dropped, so nothing the head
    leaked by any path reaches a rank; except device visibility, which the
    host itself set: SSH never forwards the head's environment, the local
    transport passes a login-like set, and the Slurm transport starts srun
    without the head's worker-specific values, so a ``CUDA_VISIBLE_DEVICES``
    found here is Slurm's choice for this node's step (or the host's profile).
    """
    return {
        k: v for k, v in env.items() if (k not in WORKER_SPECIFIC or (k in DEVICE_VISIBILITY and v)) and not k.startswith(rankenv.PREFIX)
    }
