#!/usr/bin/env python3
"""A cluster of SSH hosts on this machine: one network namespace per host.

    sudo python scripts/netns_cluster.py up 4      # prints a hostfile and the command to use
    sudo python scripts/netns_cluster.py down

Host hN is namespace ``lnch-hN`` with ``eth0`` = 198.18.0.(10+N)/24 on a bridge
(head side 198.18.0.1); h1 also has ``eth1`` = 198.19.0.11/24. Each host runs
its own sshd. ``LAUNCHER_NETNS_PREFIX=other`` builds a second cluster beside
the first, on its own /24s. The library is tests/support/netns.py.
"""

from __future__ import annotations

import os
import shutil
import sys

from cluster_cli import up_down_parser

from support.netns import STATE_DIR, NetnsCluster, sweep


def main(argv: list[str] | None = None) -> int:
    parser, up = up_down_parser(__doc__, "build the cluster and print a hostfile")
    up.add_argument("--slots", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "down":
        removed = sweep()
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        print(f"removed {', '.join(removed) or 'nothing'}")
        return 0
    cluster = NetnsCluster(args.count).up()
    # The sshd daemons outlive this command (they run in their own sessions).
    hostfile = os.path.join(cluster.workdir, "hostfile")
    with open(hostfile, "w") as f:
        f.write(cluster.hostfile(args.slots))
    print(f"# {args.count} hosts up; hostfile {hostfile}:")
    print(open(hostfile).read(), end="")
    print(f"# try:\nlauncher check -H {hostfile} {' '.join(cluster.ssh_args())}")
    print(f"# remove with: python {sys.argv[0]} down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
