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


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _size(text: str) -> int:
    body = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = body[-1:] if body[-1:] in _UNITS else ""
    return int(body[: len(body) - len(unit)]) * _UNITS[unit]


port = number(int, "a port number", lambda v: 1 <= v <= 65535, "is not a TCP port (1..65535)")
positive = number(int, "a whole number", lambda v: v >= 1, "must be at least 1")
size = number(_size, "a size like 4096, 64K, 1M or 1G", lambda v: 1 <= v <= 1 << 30, "must be 1 byte to 1 GiB")
WEEK = 7 * 24 * 3600.0  # the longest wait any option takes: inf or 1e300 would hang a check, and ZMQ's clocks are 31-bit ms
seconds = number(float, "a number of seconds", lambda v: 0 < v <= WEEK, f"must be more than 0 and at most {WEEK:.0f} seconds (a week)")


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration(text: str) -> float:
    body = text.strip().lower()
    unit = body[-1:] if body[-1:] in _DURATION_UNITS else "s"
    return float(body[:-1] if body[-1:] in _DURATION_UNITS else body) * _DURATION_UNITS[unit]


duration = number(_duration, "a duration like 90, 90s, 15m, 1h or 2d", lambda v: 0 < v <= WEEK, "must be more than 0 and at most a week")


def backoff(text: str) -> tuple[float, float]:
    """``MIN,MAX`` seconds (restart.parse_backoff), as an argparse type."""
    from .restart import parse_backoff

    try:
        return parse_backoff(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).partition(": ")[2]) from None
