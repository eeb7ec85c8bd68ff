"""Hostfile text -> [Host].

One host (or Slurm hostlist) per line, then options::

    # comment
    localhost slots=2
    gpu-node1:8                      # MPICH form: 8 slots
    alice@gpu-node[02-04] slots=8    # Slurm hostlist, expanded in Slurm's order
    gpu-node5 slots=8 ifname=^docker,lo cidr=10.1.0.0/16 env:NCCL_SOCKET_IFNAME=ib0
    [fd00::5]:4 port=2222 python=/opt/venv/bin/python cwd=/srv/work

Every error names the file, the line number and the line, and says how to fix it.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Iterable

import hostlist

from .plan import Host

OPTIONS = ("slots", "port", "ifname", "cidr", "python", "cwd")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_HOST_CHARS = re.compile(r"[A-Za-z0-9._\-\[\],:]+\Z")


class HostfileError(ValueError):
    """A hostfile line that cannot be parsed; str() is the one-line message."""

    def __init__(self, source: str, lineno: int, line: str, message: str):
        self.source, self.lineno, self.line = source, lineno, line
        super().__init__(f"{source}:{lineno}: {message} (line: {line.strip()!r})")


def parse(text: str, source: str = "hostfile") -> list[Host]:
    """Parse hostfile text; ``source`` names the file in errors."""
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue

        def fail(message: str, lineno: int = lineno, raw: str = raw) -> HostfileError:
            return HostfileError(source, lineno, raw, message)

        head, *words = line.split()
        for host in _parse_line(head, words, f"{source}:{lineno}", fail):
            if host.name in seen:
                raise fail(f"host {host.name!r} is already listed at line {seen[host.name]}; list each host once and give it slots=N")
            seen[host.name] = lineno
            hosts.append(host)
    return hosts


def read(path: str) -> list[Host]:
    """Read and parse a hostfile; a missing file is a one-line error too."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise HostfileError(path, 0, "", "no such hostfile; pass --hostfile PATH") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HostfileError(path, 0, "", f"cannot read the hostfile: {exc}") from None
    return parse(text, source=path)


def _parse_line(head: str, words: list[str], origin: str, fail) -> Iterable[Host]:
    user, target = _split_user(head, fail)
    names, mpich_slots = _split_target(target, fail)
    fields: dict[str, object] = {}
    env: list[tuple[str, str]] = []
    for word in words:
        if word.startswith("env:"):
            env.append(_parse_env(word[4:], fail))
            continue
        key, sep, value = word.partition("=")
        if not sep:
            raise fail(f"expected key=value, got {word!r}; options are {', '.join(o + '=' for o in OPTIONS)}, env:NAME=VALUE")
        if key not in OPTIONS:
            close = difflib.get_close_matches(key, OPTIONS, n=1)
            hint = f"did you mean '{close[0]}='?" if close else f"options are {', '.join(o + '=' for o in OPTIONS)}, env:NAME=VALUE"
            raise fail(f"unknown option {key!r}; {hint}")
        if key in fields:
            raise fail(f"option {key!r} is given twice")
        if not value:
            raise fail(f"option {key!r} has no value")
        fields[key] = _convert(key, value, fail)
    if mpich_slots is not None:
        if "slots" in fields:
            raise fail("slots given twice (host:N and slots=N); keep one")
        fields["slots"] = mpich_slots
    for name in names:
        yield Host(name=name, user=user, env=tuple(env), origin=origin, **fields)  # type: ignore[arg-type]


def _split_user(head: str, fail) -> tuple[str | None, str]:
    if "@" not in head:
        return None, head
    user, _, target = head.rpartition("@")
    if not user or not target:
        raise fail(f"{head!r} is not user@host")
    return user, target


def _split_target(target: str, fail) -> tuple[list[str], int | None]:
    """``host``, ``host:N``, ``[v6]``, ``[v6]:N``, ``node[01-04]``, ``node[01-04]:N``."""
    slots_text = None
    if target.startswith("[") and "]" in target and _is_ipv6(target[1 : target.index("]")]):
        end = target.index("]")
        name, rest = target[1:end], target[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise fail(f"unexpected {rest!r} after the IPv6 address")
            slots_text = rest[1:]
        names = [name]
    else:
        if _is_ipv6(target):
            return [target], None
        if not _HOST_CHARS.match(target):
            raise fail(f"{target!r} is not a host name; use letters, digits, '.', '-' and Slurm ranges like node[01-04]")
        base, sep, tail = target.rpartition(":")
        if sep and "]" not in tail:
            target, slots_text = base, tail
        try:
            names = hostlist.expand_hostlist(target)
        except hostlist.BadHostlist as exc:
            raise fail(f"bad hostlist {target!r}: {exc}") from None
        if not names or any(not n for n in names):
            raise fail(f"{target!r} names no host")
    slots = None if slots_text is None else _positive(slots_text, "slots (host:N)", fail)
    return names, slots


def _convert(key: str, value: str, fail):
    if key == "slots":
        return _positive(value, "slots", fail)
    if key == "port":
        port = _positive(value, "port", fail)
        if port > 65535:
            raise fail(f"port {port} is not a TCP port (1..65535)")
        return port
    if key == "cidr":
        try:
            return str(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise fail(f"cidr {value!r} is not a network like 10.0.0.0/8 or fd00::/64") from None
    return value


def _positive(text: str, what: str, fail) -> int:
    try:
        number = int(text)
    except ValueError:
        raise fail(f"{what} must be a whole number, got {text!r}") from None
    if number < 1:
        raise fail(f"{what} must be at least 1, got {number}")
    return number


def _parse_env(text: str, fail) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not _ENV_NAME.match(name):
        raise fail(f"env:{text!r} is not env:NAME=VALUE with NAME made of letters, digits and '_'")
    return name, value


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False
