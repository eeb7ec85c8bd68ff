"""Process boundaries and import directions hold.

An agent, a built-in rank and the bootstrap in front of ``vllm serve`` run on
every host for every job: they must not load the head (its supervisor, its
SSH and Slurm backends and their libraries). And the pure core (planning,
env policy, address choice, the wire, the job's decisions) imports nothing
that does I/O, so it stays testable as data.
"""

import ast
import os
import subprocess
import sys

import pytest

from conftest import REPO

HEAD = {
    "launcher.supervisor",
    "launcher.link",
    "launcher.job",
    "launcher.api",
    "launcher.cli",
    "launcher.report",
    "launcher.plot",
    "launcher.pd_proxy",
    "matplotlib",
    "launcher.transports",
    "launcher.hostfile",
    "paramiko",
    "hostlist",
}
PURE = {
    "plan",
    "envpolicy",
    "netif",
    "hostfile",
    "command",
    "wire",
    "check",
    "job",
    "rankenv",
    "readiness",
    "results",
    "protocol",
    "version",
    "argtypes",
    "documents",
    "gpus",
    "vllm_dp",
    "disagg",
    "agent.watch",
    "exitcodes",
}
IO = {
    "supervisor", "link", "transports", "agent", "sidechannel", "probe", "engine_core", "bootstrap", "api", "cli", "report", "entry",
    "transfer", "plot", "pd_proxy", "forked", "exitwatch",
    "control", "agent.events", "agent.probes", "agent.spawn", "agent.teardown", "agent.threads", "agent.vllm_version",
}  # fmt: skip
# The agent is a package: each of its modules runs on every host, so each is held to the rank side's rules.
AGENT = sorted(f"agent.{f[:-3]}" for f in os.listdir(os.path.join(REPO, "launcher", "agent")) if f.endswith(".py") and f[0] != "_")
RANK_SIDE = {"agent", *AGENT, "engine_core", "bootstrap", "forked", "exitwatch", "control"}


@pytest.mark.parametrize("module", ["launcher.agent", "launcher.engine_core", "launcher.bootstrap"])
def test_what_runs_on_the_hosts_never_loads_the_head(module):
    done = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print(' '.join(sorted(sys.modules)))"], capture_output=True, text=True, cwd=REPO
    )
    loaded = set(done.stdout.split())
    assert done.returncode == 0, done.stderr
    assert not {m for m in loaded if m in HEAD or any(m.startswith(h + ".") for h in HEAD)}


def imports(name):
    """(module-level launcher modules, all launcher modules) that launcher/<name>.py imports, by their short names."""
    path = os.path.join(REPO, "launcher", *name.split(".")) + (
        ".py" if not os.path.isdir(os.path.join(REPO, "launcher", name)) else "/__init__.py"
    )
    tree = ast.parse(open(path).read())
    package = name.split(".")[:-1] if "." in name else []
    top, every = set(), set()

    def names(node):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            parts = [*base, *(node.module.split(".") if node.module else [])]
            if parts:
                yield parts[0]
            else:
                yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("launcher."):
            yield node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            yield from (a.name.split(".")[1] for a in node.names if a.name.startswith("launcher."))

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            every.update(names(node))
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            top.update(names(node))
    return top, every


MODULES = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "launcher")) if f.endswith(".py") and f != "__init__.py")
BACKENDS = sorted(f"transports.{f[:-3]}" for f in os.listdir(os.path.join(REPO, "launcher", "transports")) if f.endswith(".py"))


@pytest.mark.parametrize("name", sorted(PURE))
def test_the_pure_core_imports_no_io_module(name):
    top, _ = imports(name)
    assert not top & IO, f"launcher.{name} imports {sorted(top & IO)} when loaded"


@pytest.mark.parametrize("name", BACKENDS)
def test_a_transport_never_imports_the_agent(name):
    """A backend starts agents, it does not contain one: loading it loads no rank-side code, and it knows
    nothing of the head's loop. (The local backend may fork an agent from the head: it imports the agent
    then, in ``prepare``, and only then.)"""
    top, every = imports(name)
    assert not top & RANK_SIDE, top
    assert not every & {"supervisor", "job", "link"}, every


@pytest.mark.parametrize("name", sorted(RANK_SIDE))
def test_the_rank_side_never_imports_the_head(name):
    _, every = imports(name)
    assert not every & {"transports", "supervisor", "link", "job", "api", "cli", "report", "hostfile"}, every


def test_every_module_is_classified():
    assert set(MODULES) | set(AGENT) <= PURE | IO, (set(MODULES) | set(AGENT)) - PURE - IO
