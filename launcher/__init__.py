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

# public name -> the module that defines it. This module imports nothing, not even __future__ (importlib loads
# on first use): the console script holds Ctrl-C only once this package has loaded, and a Ctrl-C inside an
# import here was a traceback through launcher's code.
_EXPORTS = {
    "__version__": "version",
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
__all__ = sorted([*_EXPORTS, "hostfile", "readiness"])


def __getattr__(name: str):
    import importlib

    if name in ("hostfile", "readiness"):
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'launcher' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
