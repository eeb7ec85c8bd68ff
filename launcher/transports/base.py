"""The transport interface: start an agent on a host, talk to it in lines.

A backend is one ``Transport`` subclass in a module of its own. Its class
methods say where it applies (``claims``, ``allocation_hosts``) and what it
takes from the command line (``add_arguments``, ``from_args``); an instance
starts agents (``start``) and knows the address the head reaches a host on.
"""

from __future__ import annotations

import abc
import argparse
import collections
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import msgspec

from ..host import Host


class TransportError(RuntimeError):
    """The agent could not be started; str() is one line naming the host and the fix."""


class AllocationError(ValueError):
    """An allocation (Slurm, ...) the launcher cannot read; str() names the variable and the fix."""


class Capabilities(msgspec.Struct, frozen=True):
    """What a backend can do besides starting the agents of a job; the head plans around what it cannot."""

    # ``start`` can start a fresh agent on a host at any moment: the sweep after a lost agent needs one.
    # A backend whose agents dial in (join) cannot: then the head says what to look for instead.
    sweeps: bool = True
    # ``terminate`` ends the agent itself (a signal to it), not only the connection to it: whatever its
    # ranks started in sessions of their own outlives it, and the head sweeps the host after.
    terminate_kills_agent: bool = False


class AgentConnection(abc.ABC):
    """A running agent: its stdin, its stdout lines, its end."""

    def __init__(self, host: Host):
        self.host = host
        self._stderr = collections.deque(maxlen=50)
        self._stderr_done = threading.Event()

    @abc.abstractmethod
    def send(self, data: bytes) -> None:
        """Write to the agent's stdin; raises OSError once the agent is gone."""

    @abc.abstractmethod
    def readline(self) -> bytes:
        """One line of the agent's stdout; b"" at its end."""

    @abc.abstractmethod
    def close_stdin(self) -> None:
        """EOF on the agent's stdin: the agent stops its ranks and exits."""

    @abc.abstractmethod
    def terminate(self) -> None:
        """Stop the agent without its cooperation (last resort)."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> int | None:
        """The agent's exit status, or None if it is still running after ``timeout``."""

    def _collect_stderr(self, stream) -> None:
        try:
            for raw in iter(stream.readline, b""):
                self._stderr.append(raw.decode("utf-8", "replace").rstrip("\n"))
        except (OSError, ValueError):
            pass
        finally:
            self._stderr_done.set()

    def bytes_waiting(self) -> bool:
        """Whether the agent's output has bytes not read yet: evidence it is alive, whatever the clock says."""
        return False

    def stop_reason(self) -> str | None:
        """Why the backend itself stopped this agent on purpose (Slurm's scancel), if it did; None otherwise."""
        return None

    def stderr_tail(self, wait: float = 0.5) -> list[str]:
        """The agent's last stderr lines (what it said before dying)."""
        self._stderr_done.wait(wait)
        return list(self._stderr)


class Transport(abc.ABC):
    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    # Where the backend tells the person at the terminal something (an address to join, a refused peer);
    # the supervisor points it at its reporter.
    say: Callable[[str], None] = staticmethod(lambda text: None)

    # --- where this backend applies (class methods: no instance needed) -----------

    @classmethod
    def claims(cls, hosts: Sequence[Host], env: Mapping[str, str]) -> bool:
        """Whether ``--transport auto`` should start these hosts' agents with this backend."""
        return False

    @classmethod
    def allocation_hosts(cls, env: Mapping[str, str], slots: int | None) -> list[Host] | None:
        """The hosts of the allocation this process runs in (a batch job), or None when not inside one."""
        return None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """This backend's command-line options."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str]) -> Transport:
        """An instance configured from the parsed command line."""
        return cls()

    # --- starting agents -----------------------------------------------------------

    def prepare(self, hosts: Sequence[Host]) -> None:
        """Called once from the head's main thread before it starts any thread (the moment a process can
        still fork safely); a backend may start agents here that ``start`` then hands out."""

    @abc.abstractmethod
    def start(self, host: Host) -> AgentConnection:
        """Start ``python -m launcher.agent`` on ``host``; raise TransportError naming it."""

    def reached_address(self, host: Host) -> str | None:
        """The host-local address the head reaches this host on, if the transport knows it.

        None lets the agent read it on the host (SSH_CONNECTION).
        """
        return None

    def close(self) -> None:
        """Release shared resources (connections) after the job."""
