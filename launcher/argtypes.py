"""argparse types whose errors say which value is wrong and why (shared by the CLI and the backends' options)."""

from __future__ import annotations

import argparse
import ipaddress


def number(convert, what: str, ok, bound: str):
    """An argparse type: ``convert`` the text, then require ``ok``; errors say which and why."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} {bound}")
        return value

    return parse


def network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a network like 10.0.0.0/8 or fd00::/64") from None


port = number(int, "a port number", lambda v: 1 <= v <= 65535, "is not a TCP port (1..65535)")
positive = number(int, "a whole number", lambda v: v >= 1, "must be at least 1")
seconds = number(float, "a number of seconds", lambda v: v > 0, "must be more than 0 seconds")
