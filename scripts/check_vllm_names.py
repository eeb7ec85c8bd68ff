#!/usr/bin/env python3
"""Compare launcher's vLLM facts with an installed vLLM (run where vLLM is installed).

    python scripts/check_vllm_names.py

Checks that the variables launcher sets, drops or treats as outside the
compile-cache hash exist in ``vllm.envs`` with the defaults launcher assumes,
and that vLLM's own worker-specific list (where this release has one) is a
subset of launcher's. Exit 0: agree; 1: a difference (printed); 2: vLLM is
not importable here. Not part of the test suite: vLLM does not install on
the CI machine, and a test that skips would fail CI.
"""

from __future__ import annotations

import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launcher import envpolicy  # noqa: E402

EXPECTED_DEFAULTS = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "localhost", "VLLM_NIXL_SIDE_CHANNEL_PORT": 5600}
# Where releases kept the list of variables never copied from driver to workers.
WORKER_LIST_PLACES = [("vllm.ray.ray_env", "WORKER_SPECIFIC_ENV_VARS"), ("vllm.executor.ray_utils", "WORKER_SPECIFIC_ENV_VARS"),
                      ("vllm.envs", "WORKER_SPECIFIC_ENV_VARS")]


def main() -> int:
    try:
        envs = importlib.import_module("vllm.envs")
    except ImportError as exc:
        print(f"vLLM is not importable here ({exc}); run this where vLLM is installed")
        return 2
    problems = []
    known = set(getattr(envs, "environment_variables", {}))
    saved = {k: os.environ.pop(k) for k in EXPECTED_DEFAULTS if k in os.environ}
    try:
        for name, default in EXPECTED_DEFAULTS.items():
            if name not in known:
                problems.append(f"{name} is not a vLLM variable in this release")
            elif getattr(envs, name) != default:
                problems.append(f"{name} defaults to {getattr(envs, name)!r}, launcher assumes {default!r}")
    finally:
        os.environ.update(saved)
    ours = {n for n in list(envpolicy.WORKER_SPECIFIC) + sorted(envpolicy.COMPILE_HASH_IGNORED) if n.startswith("VLLM_")}
    problems += [f"launcher names {n}, which this vLLM does not know" for n in sorted(ours - known)]
    for module, attr in WORKER_LIST_PLACES:
        try:
            theirs = set(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue
        problems += [f"vLLM treats {n} as worker-specific ({module}); launcher copies it" for n in sorted(theirs - set(envpolicy.WORKER_SPECIFIC))]
    version = getattr(importlib.import_module("vllm"), "__version__", "?")
    for line in problems:
        print(line)
    print(f"vLLM {version}: {'agrees' if not problems else f'{len(problems)} differences'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
