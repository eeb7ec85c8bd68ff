"""Process boundaries and import directions hold, derived from the folders.

``launcher/`` is laid out by the process a module runs in (docs/DESIGN.md):
``head/`` and ``output/`` and ``transports/`` in the head, ``agent/`` on every
host, ``vllm/`` everywhere. An agent, a built-in rank and the bootstrap in
front of ``vllm serve`` run on every host for every job: they must not load
the head (its supervisor, its SSH and Slurm backends and their libraries).
And the pure core (planning, env policy, address choice, the wire, the job's
decisions) imports nothing that does I/O, so it stays testable as data.
"""

import ast
import os
import subprocess
import sys

import pytest

from conftest import REPO

ROOT = os.path.join(REPO, "launcher")


def _modules() -> list[str]:
    """Every module of the package, dotted from ``launcher`` (``head.job``, ``plan``); a package by its name."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith("__")]
        package = os.path.relpath(folder, ROOT).replace(os.sep, ".")
        for f in files:
            if f.endswith(".py"):
                stem = f[:-3]
                if stem == "__init__":
                    if package != ".":
                        found.append(package)
                else:
                    found.append(stem if package == "." else f"{package}.{stem}")
    return sorted(found)


MODULES = _modules()


def folder(name: str) -> str:
    """The subpackage a module lives in ('' at the top level); a package is its own folder."""
    if os.path.isdir(os.path.join(ROOT, *name.split("."))):
        return name
    return name.rpartition(".")[0]


# The head's process, by folder, plus the top-level modules that only the head runs.
HEAD_FOLDERS = ("head", "output", "transports")
HEAD_TOP = {"cli", "api", "entry", "hostfile", "operate"}
# What runs on every host: the agent's folder, plus the rank side at the top level.
HOST_TOP = {"engine_core", "bootstrap", "control", "forked", "exitwatch", "transfer"}
# Modules that do I/O (sockets, processes, files, threads) when used; every other module is pure.
IO_TOP = {"probe", "engine_core", "bootstrap", "api", "cli", "entry", "operate", "transfer", "forked", "exitwatch", "control"}
PURE_IN_IO_FOLDERS = {"agent.watch", "head.job", "output.documents", "head.reporter"}


def in_head(name: str) -> bool:
    return folder(name).split(".")[0] in HEAD_FOLDERS or name in HEAD_TOP


def on_hosts(name: str) -> bool:
    return folder(name).split(".")[0] == "agent" or name in HOST_TOP


def does_io(name: str) -> bool:
    if name in PURE_IN_IO_FOLDERS:
        return False
    return name in IO_TOP or folder(name).split(".")[0] in (*HEAD_FOLDERS, "agent") or name == "vllm.sidechannel"


def imports(name: str) -> tuple[set[str], set[str]]:
    """(modules imported when ``name`` loads, every module it may import, lazily too), dotted from ``launcher``."""
    path = os.path.join(ROOT, *name.split("."))
    path = os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"
    tree = ast.parse(open(path).read())
    package = folder(name).split(".") if folder(name) else []

    def resolved(node) -> set[str]:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
            elif node.module and node.module.split(".")[0] == "launcher":
                base = []
            else:
                return set()
            stem = [*base, *(node.module.split(".") if node.module and node.level else (node.module or "").split(".")[1:])]
            stem = [s for s in stem if s]
            out = {".".join(stem)} if stem else set()
            out |= {".".join([*stem, a.name]) for a in node.names}  # `from . import job`: a module
            return {m for m in out if m in MODULES}
        if isinstance(node, ast.Import):
            return {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("launcher.")} & set(MODULES)
        return set()

    every = set().union(*(resolved(n) for n in ast.walk(tree)))
    top = set().union(*(resolved(n) for n in tree.body))
    return top, every


def test_the_folders_are_the_map():
    """Each module sits where the map says; a new folder or top-level module must be placed in the rules."""
    assert {folder(m).split(".")[0] for m in MODULES} == {"", "agent", "head", "output", "transports", "vllm"}
    placed = {m for m in MODULES if folder(m)} | HEAD_TOP | HOST_TOP | IO_TOP
    pure_top = {m for m in MODULES if not folder(m) and m not in placed}
    assert pure_top == {
        "argtypes", "check", "command", "envpolicy", "exitcodes", "gpus", "host", "netif", "plan", "protocol",
        "rankenv", "readiness", "restart", "results", "version",
    }, "a new top-level module: say which process runs it (HEAD_TOP, HOST_TOP) and whether it does I/O (IO_TOP)"  # fmt: skip


HEAD_PREFIXES = ("launcher.head", "launcher.output", "launcher.transports", "launcher.cli", "launcher.api", "launcher.hostfile")


@pytest.mark.parametrize("module", ["launcher.agent", "launcher.engine_core", "launcher.bootstrap"])
def test_what_runs_on_the_hosts_never_loads_the_head(module):
    done = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print(' '.join(sorted(sys.modules)))"], capture_output=True, text=True, cwd=REPO
    )
    loaded = set(done.stdout.split())
    assert done.returncode == 0, done.stderr
    assert not {m for m in loaded if m.startswith(HEAD_PREFIXES) or m.split(".")[0] in ("paramiko", "hostlist", "matplotlib")}


@pytest.mark.parametrize("name", [m for m in MODULES if on_hosts(m)])
def test_the_host_side_never_imports_the_head(name):
    _, every = imports(name)
    assert not {m for m in every if in_head(m)}, f"launcher.{name} imports the head's {sorted(m for m in every if in_head(m))}"


@pytest.mark.parametrize("name", [m for m in MODULES if not does_io(m)])
def test_the_pure_core_imports_no_io_module(name):
    top, _ = imports(name)
    assert not {m for m in top if does_io(m)}, f"launcher.{name} imports {sorted(m for m in top if does_io(m))} when loaded"


@pytest.mark.parametrize("name", [m for m in MODULES if folder(m) == "vllm"])
def test_what_tracks_vllm_knows_nothing_of_launcher_processes(name):
    """vllm/ is shared vocabulary: it may use the pure core, never a process's modules."""
    _, every = imports(name)
    assert not {m for m in every if in_head(m) or on_hosts(m)}, every


@pytest.mark.parametrize("name", [m for m in MODULES if folder(m) == "transports"])
def test_a_transport_never_imports_the_agent(name):
    """A backend starts agents, it does not contain one: loading it loads no host-side code, and it knows
    nothing of the head's loop. (The local backend may fork an agent from the head: it imports the agent
    then, in ``prepare``, and only then.)"""
    top, every = imports(name)
    assert not {m for m in top if on_hosts(m)}, top
    assert not {m for m in every if folder(m) == "head"}, every
