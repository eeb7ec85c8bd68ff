"""How an agent is started on a host: one module per backend, one registry.

A transport knows how to run ``python -m launcher.agent`` on a host and hand
it a byte stream; it knows nothing about ranks. Each backend module defines
one ``Transport`` subclass (see ``base``) that owns its name, whether a job
is inside its allocation, its command-line options and its connections.
``BACKENDS`` drives the CLI's ``--transport`` choices, ``auto`` and
construction. Adding a backend (PBS, Kubernetes) is a module and a line here.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Mapping, Sequence

from ..host import Host
from .base import AgentConnection, AllocationError, Transport, TransportError

__all__ = ["AgentConnection", "AllocationError", "Transport", "TransportError", "backend", "choose", "get", "names"]

# name -> "module:class", in the order ``auto`` asks them; the last claims any host.
BACKENDS: Mapping[str, str] = {
    "local": "launcher.transports.local:LocalTransport",
    "slurm": "launcher.transports.slurm:SlurmTransport",
    "ssh": "launcher.transports.ssh:SSHTransport",
}


def names() -> list[str]:
    return list(BACKENDS)


def backend(name: str) -> type[Transport]:
    """A backend's class by name, imported on first use."""
    try:
        module, _, attr = BACKENDS[name].partition(":")
    except KeyError:
        raise TransportError(f"unknown transport {name!r}; choose {', '.join(BACKENDS)}") from None
    return getattr(importlib.import_module(module), attr)


def choose(hosts: Sequence[Host], env: Mapping[str, str]) -> str:
    """``--transport auto``: the first backend that claims every host."""
    for name in BACKENDS:
        if backend(name).claims(hosts, env):
            return name
    return list(BACKENDS)[-1]


def allocation_hosts(env: Mapping[str, str], slots: int | None) -> list[Host] | None:
    """The hosts of the allocation this process runs in, from whichever backend recognises it."""
    for name in BACKENDS:
        found = backend(name).allocation_hosts(env, slots)
        if found is not None:
            return found
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--transport",
        "-t",
        choices=["auto", *BACKENDS],
        default="auto",
        help=(
            "how agents start: auto = the first of " + ", ".join(BACKENDS) + " that can reach every host "
            "(local for loopback hosts, slurm for nodes of the current allocation, else ssh)"
        ),
    )
    for name in BACKENDS:
        backend(name).add_arguments(parser)


def from_args(name: str, args: argparse.Namespace, env: Mapping[str, str]) -> Transport:
    return backend(name).from_args(args, env)


def get(name: str, **options) -> Transport:
    """A transport by name, configured by keyword (the Python API): ``get("ssh", config_path=...)``."""
    return backend(name)(**options)
