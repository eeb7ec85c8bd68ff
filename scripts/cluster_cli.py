"""Shared by the test-cluster scripts: the library path and the ``up [COUNT]`` / ``down`` command line."""

from __future__ import annotations

import argparse
import os
import sys

# The cluster library is the tests' support package (tests/support).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def up_down_parser(doc: str, up_help: str) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``up [COUNT]`` / ``down`` command line of a test-cluster script: (parser, its ``up`` parser)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help=up_help)
    up.add_argument("count", type=int, nargs="?", default=3)
    sub.add_parser("down", help="remove the cluster (and anything a crashed run left)")
    return parser, up
