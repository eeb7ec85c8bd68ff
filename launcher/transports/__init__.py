"""How an agent is started on a host. One interface, several backends.

A transport knows how to run ``python -m launcher.agent`` on a host and hand
it a byte stream; it knows nothing about ranks.
"""

from .base import AgentConnection, Transport, TransportError

__all__ = ["AgentConnection", "Transport", "TransportError", "get"]


def get(name: str, **options) -> Transport:
    """A transport by name: ``local``, ``ssh`` or ``slurm``."""
    if name == "local":
        from .local import LocalTransport

        return LocalTransport(**options)
    if name == "ssh":
        from .ssh import SSHTransport

        return SSHTransport(**options)
    if name == "slurm":
        from .slurm import SlurmTransport

        return SlurmTransport(**options)
    raise TransportError(f"unknown transport {name!r}; choose local, ssh or slurm")
