"""Every exit code launcher gives, in one table.

The launcher passes a failing rank's own exit code through (as ``mpirun``
and ``srun`` do), so its own codes are few and low. When launcher's own code
fails a rank (the built-in engine core, or the exec shim in front of a
command), the rank's code comes from sysexits.h's range, which none of the
launcher's shares: a 3 then always means a host lost, never a port taken.
Pure data: imported by the head, the agents and the ranks alike.
"""

# The launcher's own.
OK = 0
USAGE = 2  # bad input: hostfile, options, a log directory; the P/D proxy's port
HOST_LOST = 3  # a host unreachable, lost, or two sharing an address; an agent that stopped on its own
NOT_READY = 4  # ranks not ready in time, or one that never can be (its port is another's)
CHECK_FAILED = 5  # the all-pairs or transfer check, the compatibility hashes, the preflight's versions
STDOUT_CLOSED = 128 + 13  # stdout's reader went away, as a tool killed by SIGPIPE: `launcher run | head -2`
# 128 + N: stopped by signal N, at the head or at an agent.

# A rank's, when launcher's own code fails it.
RANK_NO_NIXL = 69  # EX_UNAVAILABLE: check --transfer, and NIXL is not installed on the host
RANK_PORT_TAKEN = 71  # EX_OSERR: the side channel could not bind its port (in use, or not this host's address)
RANK_BAD_ADDRESS = 78  # EX_CONFIG: this host offers no address by the rules (a selector matches nothing, ...)
RANK_NOT_EXECUTABLE = 126  # as a shell says: the command is there but cannot run
RANK_NOT_FOUND = 127  # as a shell says: no such command on the host
