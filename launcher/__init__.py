"""launcher: start vLLM-style engine-core ranks across hosts without Ray.

Every rank gets an allowlisted copy of the head's environment with the
worker-specific variables dropped, and binds its NIXL side channel on its own
host's address.

    import launcher
    plan = launcher.plan_job(launcher.hostfile.read("hostfile"))
    result = launcher.launch(plan, check=launcher.CheckOptions())
    assert result.ok, result.failure.message

A user command instead of the built-in engine core::

    options = launcher.LaunchOptions(command=("vllm", "serve", "M", "--headless", ...), per_host=True)

The names below load on first use: an agent, a rank or the bootstrap in
front of ``vllm serve`` imports ``launcher.agent`` (or ``.engine_core``,
``.bootstrap``) without loading the head's modules (supervisor, SSH, Slurm).
"""

from __future__ import annotations

import importlib

from .version import __version__  # noqa: F401  (re-exported)

# public name -> the module that defines it
_EXPORTS = {
    "launch": "api",
    "plan_job": "api",
    "CheckOptions": "check",
    "Host": "plan",
    "LaunchOptions": "plan",
    "LaunchPlan": "plan",
    "RankSpec": "plan",
    "LaunchResult": "results",
    "RankResult": "results",
    "Failure": "results",
}
__all__ = sorted([*_EXPORTS, "hostfile", "readiness", "__version__"])


def __getattr__(name: str):
    if name in ("hostfile", "readiness"):
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'launcher' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
