"""Give NIXL's progress thread a delay, in the real-vLLM test venv only.

NIXL 1.5.1's Python API hard-codes ``pthrDelay = 0`` when it builds an agent
(``nixl_agent.__init__``), so every idle agent's progress thread spins a whole
core; on a 2-core test machine two vLLM instances then starve each other.
There is no environment variable for it in 1.5.1, so a ``.pth`` line imports
this module at start-up, and it wraps ``nixlAgent`` in NIXL's bindings to
set the delay (microseconds, ``LAUNCHER_TEST_NIXL_PTHR_DELAY_US``, default
1000) on the config the API passes in. Nothing else changes.
"""

import importlib.abc
import importlib.machinery
import os
import sys

_MODULES = {"nixl_cu12._bindings", "nixl_cu13._bindings"}


def _patch(bindings) -> None:
    original = bindings.nixlAgent
    delay = int(os.environ.get("LAUNCHER_TEST_NIXL_PTHR_DELAY_US", "1000"))

    def nixl_agent(name, config, *rest):
        config.pthrDelay = delay
        return original(name, config, *rest)

    bindings.nixlAgent = nixl_agent


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def patched_exec(module):
            exec_module(module)
            _patch(module)

        loader.exec_module = patched_exec
        return spec


sys.meta_path.insert(0, _Finder())
