"""How an agent is started on a host: one module per backend, one registry.

A transport knows how to run ``python -m launcher.agent`` on a host and hand
it a byte stream; it knows nothing about ranks. Each backend module defines
one ``Transport`` subclass (see ``base``) that owns its name, whether a job
is inside its allocation, its command-line options and its connections.
``BACKENDS`` drives the CLI's ``--transport`` choices, ``auto`` and
construction. Adding a backend (PBS, Kubernetes) is a module and a line here;
or, outside this package, a ``Transport`` subclass named on the command line
as ``--transport pkg.module:Class`` or registered under the entry-point
group ``launcher.transports`` (ClusterShell loads its workers the same way).
Such a backend takes its settings from the environment: the options of the
command line are built before it is known.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Mapping, Sequence

from ..host import Host
from .base import AgentConnection, AllocationError, Capabilities, Transport, TransportError

__all__ = ["AgentConnection", "AllocationError", "Capabilities", "Transport", "TransportError", "backend", "choose", "get", "names"]

# name -> "module:class", in the order ``auto`` asks them; the last claims any host. A backend that
# ``auto`` never picks (its agents must be started by someone) is in EXPLICIT_ONLY.
BACKENDS: Mapping[str, str] = {
    "local": "launcher.transports.local:LocalTransport",
    "slurm": "launcher.transports.slurm:SlurmTransport",
    "ssh": "launcher.transports.ssh:SSHTransport",
    "join": "launcher.transports.join:JoinTransport",
}
EXPLICIT_ONLY = frozenset({"join"})
ENTRY_POINTS = "launcher.transports"


def names() -> list[str]:
    return list(BACKENDS)


def backend(name: str) -> type[Transport]:
    """A backend's class: by name (built in, or an entry point of ``launcher.transports``), or ``pkg.module:Class``."""
    where = BACKENDS.get(name) or (name if ":" in name else _entry_point(name))
    module, _, attr = where.partition(":")
    try:
        found = getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise TransportError(f"--transport {name}: cannot import {module} ({exc}); install the package that provides it") from None
    except AttributeError:
        raise TransportError(f"--transport {name}: {module} has no {attr}; name its Transport subclass as module:Class") from None
    if not (isinstance(found, type) and issubclass(found, Transport)):
        raise TransportError(f"--transport {name}: {where} is not a launcher.transports.Transport subclass")
    return found


def _entry_point(name: str) -> str:
    from importlib.metadata import entry_points  # here: scanning installed packages costs every start ~10 ms

    for ep in entry_points(group=ENTRY_POINTS):
        if ep.name == name:
            return ep.value
    raise TransportError(
        f"unknown transport {name!r}; choose {', '.join(BACKENDS)}, a backend's pkg.module:Class, "
        f"or the name of one registered under the {ENTRY_POINTS!r} entry points"
    )


def choose(hosts: Sequence[Host], env: Mapping[str, str]) -> str:
    """``--transport auto``: the first backend that claims every host."""
    for name in _automatic():
        if backend(name).claims(hosts, env):
            return name
    return _automatic()[-1]


def _automatic() -> list[str]:
    return [name for name in BACKENDS if name not in EXPLICIT_ONLY]


def allocation_hosts(env: Mapping[str, str], slots: int | None) -> list[Host] | None:
    """The hosts of the allocation this process runs in, from whichever backend recognises it."""
    for name in _automatic():
        found = backend(name).allocation_hosts(env, slots)
        if found is not None:
            return found
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--transport",
        "-t",
        default="auto",
        metavar="{auto," + ",".join(BACKENDS) + "}",
        help=(
            "how agents start: auto = the first of " + ", ".join(_automatic()) + " that can reach every host "
            "(local for loopback hosts, slurm for nodes of the current allocation, else ssh); join = agents "
            "started by someone else dial in; or a backend of another package: pkg.module:Class, or its entry-point name"
        ),
    )
    for name in BACKENDS:
        backend(name).add_arguments(parser)


def from_args(name: str, args: argparse.Namespace, env: Mapping[str, str]) -> Transport:
    return backend(name).from_args(args, env)


def get(name: str, **options) -> Transport:
    """A transport by name, configured by keyword (the Python API): ``get("ssh", config_path=...)``."""
    return backend(name)(**options)
