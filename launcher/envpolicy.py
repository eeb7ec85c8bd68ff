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
from .vllm.envnames import COMPILE_HASH_IGNORED, DEVICE_VISIBILITY, WORKER_SPECIFIC

# vLLM's own copy rules (vllm.ray.ray_env.DEFAULT_ENV_VAR_PREFIXES) plus NIXL_ and TORCH_.
DEFAULT_PREFIXES = ("VLLM_", "NCCL_", "UCX_", "NIXL_", "HF_", "HUGGING_FACE_", "LMCACHE_", "FLASH_ATTENTION_", "TORCH_")
DEFAULT_NAMES = ("PYTHONHASHSEED",)

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
        "on the host, before the command runs: VLLM_NIXL_SIDE_CHANNEL_HOST and VLLM_HOST_IP setdefault to the address the rank binds, "
        "GLOO_SOCKET_IFNAME to its interface",
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
