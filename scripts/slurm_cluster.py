#!/usr/bin/env python3
"""A real Slurm cluster on this machine: slurmctld on the head, one slurmd per namespace host.

    sudo python scripts/slurm_cluster.py up 3     # netns hosts h1..h3 plus Slurm; prints how to use it
    sudo python scripts/slurm_cluster.py down

The library is tests/support/slurm.py.
"""

from __future__ import annotations

import sys

from cluster_cli import up_down_parser

from support.slurm import SlurmCluster


def main(argv: list[str] | None = None) -> int:
    args = up_down_parser(__doc__, "build netns hosts and Slurm on them")[0].parse_args(argv)
    if args.command == "down":
        SlurmCluster().down()
        print("removed the Slurm cluster")
        return 0
    cluster = SlurmCluster(args.count).up()
    print(f"# Slurm up: nodes {', '.join(cluster.nodes)}; daemons keep running after this command")
    print(f"export SLURM_CONF={cluster.conf}")
    print(f"sbatch -N {args.count} scripts/slurm_example.sbatch")
    print(f"# remove with: python {sys.argv[0]} down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
