"""Which vLLM a rank's command runs (the check picks its wire generation by it), asked without importing vLLM."""

from __future__ import annotations

import os
import shutil
import subprocess


def own_vllm_version() -> str:
    """This interpreter's vLLM, if it has one (importlib.metadata only then: it costs more to import than to ask)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return ""
    import importlib.metadata

    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return ""


def installed_vllm_version(hint: tuple[str, str], env: dict[str, str]) -> str:
    """Ask the interpreter behind a vLLM command which vLLM it has, without importing vLLM (tens of ms)."""
    kind, name = hint
    path = shutil.which(name, path=env.get("PATH"))
    if path is None:
        return ""
    if kind == "script":  # vLLM's console script: its interpreter is on the #! line
        try:
            with open(path, "rb") as f:
                first = f.readline(512).decode("utf-8", "replace")
        except OSError:
            return ""
        words = first[2:].split() if first.startswith("#!") else []
        if not words:
            return ""
        path = shutil.which(words[1], path=env.get("PATH")) if os.path.basename(words[0]) == "env" and len(words) > 1 else words[0]
        if path is None:
            return ""
    try:
        done = subprocess.run(
            [path, "-c", "import importlib.metadata as m; print(m.version('vllm'))"],
            capture_output=True,
            text=True,
            timeout=20,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""
