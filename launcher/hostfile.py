"""Hostfile text -> [Host].

One host (or Slurm hostlist) per line, then options::

    # comment
    localhost slots=2
    gpu-node1:8                      # MPICH form: 8 slots
    alice@gpu-node[02-04] slots=8    # Slurm hostlist, expanded in Slurm's order
    gpu-node5 slots=8 ifname=^docker,lo cidr=10.1.0.0/16 env:NCCL_SOCKET_IFNAME=ib0
    [fd00::5]:4 port=2222 python=/opt/venv/bin/python cwd="/srv/my work#1"
    pf[1-2] slots=4 role=prefill group=p0   # P/D: one prefill instance (DP 8) over two hosts

Words are separated by whitespace; ``#`` starts a comment at the start of a
line or after whitespace (``cwd=/tmp/run#1`` keeps its ``#1``); a value with
spaces goes in single or double quotes. Every error names the file, the
line number and the line (secret-looking ``env:`` values masked), and says
how to fix it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

import hostlist

from .envpolicy import masked
from .gpus import parse_device_list
from .host import Host
from .vllm.disagg import ROLES

OPTIONS = ("slots", "port", "ifname", "cidr", "python", "cwd", "gpus", "role", "group")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_HOST_CHARS = re.compile(r"[A-Za-z0-9._\-\[\],:]+\Z")
_GROUP = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_SCOPE_ID = re.compile(r"[0-9A-Za-z._-]+\Z")  # an IPv6 zone: an interface name or index, nothing a shell would read
# An env: word as an error may echo it, its value masked when the name looks secret: a valid name or not
# (env:HF-TOKEN=...), the value quoted or the whole word ("env:HF_TOKEN=a b").
_ENV_WORD = re.compile(r"""(["'])(env:([^\s=]*)=)(.*?)(\1|$)|(env:([^\s=]*)=)("[^"]*"?|'[^']*'?|\S*)()""")


class HostfileError(ValueError):
    """A hostfile line that cannot be parsed; str() is the one-line message."""

    def __init__(self, source: str, lineno: int, line: str, message: str):
        self.source, self.lineno, self.line = source, lineno, line
        shown = _masked_line(line).strip()
        shown = shown if len(shown) <= 160 else shown[:160] + "…"
        super().__init__(f"{source}:{lineno}: {message} (line: {shown!r})")


def _masked_line(line: str) -> str:
    """The line as an error may echo it: secret-looking env: values masked, as ``hosts`` and ``plan`` show them."""

    def mask(m: re.Match) -> str:
        if m.group(1):  # the whole word quoted
            return m.group(1) + m.group(2) + masked(m.group(3), m.group(4)) + m.group(5)
        return m.group(6) + masked(m.group(7), m.group(8).strip("\"'"))

    return _ENV_WORD.sub(mask, line)


def parse(text: str, source: str = "hostfile") -> list[Host]:
    """Parse hostfile text; ``source`` names the file in errors."""
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    # Lines end at \n (a \r before it is dropped): str.splitlines would also split at \x0b, \x1c, ... silently.
    for lineno, raw in enumerate(text.split("\n"), start=1):
        raw = raw[:-1] if raw.endswith("\r") else raw

        def fail(message: str, lineno: int = lineno, raw: str = raw) -> HostfileError:
            return HostfileError(source, lineno, raw, message)

        words = _words(raw, fail)
        if not words:
            continue
        head, *words = words
        for host in _parse_line(head, words, f"{source}:{lineno}", fail):
            if host.name in seen:
                raise fail(f"host {host.name!r} is already listed at line {seen[host.name]}; list each host once and give it slots=N")
            seen[host.name] = lineno
            hosts.append(host)
    return hosts


def _words(line: str, fail) -> list[str]:
    """Whitespace-separated words; quotes group, ``#`` after whitespace ends the line; control characters refused."""
    for column, char in enumerate(line, start=1):
        if (ord(char) < 0x20 and char != "\t") or ord(char) == 0x7F:
            raise fail(f"control character {char!r} at column {column}; a hostfile is plain text")
    words, word, quote, in_word = [], [], None, False
    for char in line:
        if quote:
            if char == quote:
                quote = None
            else:
                word.append(char)
        elif char in "\"'":
            quote, in_word = char, True
        elif char.isspace():
            if in_word:
                words.append("".join(word))
            word, in_word = [], False
        elif char == "#" and not in_word:
            break
        else:
            word.append(char)
            in_word = True
    if quote:
        raise fail(f'unterminated {quote} quote; close it, or quote the whole value: cwd="/path with spaces"')
    if in_word:
        words.append("".join(word))
    return words


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
            import difflib  # here: only a mistake needs it, and every start would pay its import

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
    if target.startswith("[") and "]" in target and _is_ipv6(target[1 : target.index("]")], fail):
        end = target.index("]")
        name, rest = target[1:end], target[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise fail(f"unexpected {rest!r} after the IPv6 address")
            slots_text = rest[1:]
        names = [name]
    else:
        if _is_ipv6(target, fail):
            return [target], None
        if not _HOST_CHARS.match(target):
            raise fail(f"{target!r} is not a host name; use letters, digits, '.', '-' and Slurm ranges like node[01-04]")
        base, sep, tail = target.rpartition(":")
        if sep and "]" not in tail:
            target, slots_text = base, tail
        try:
            names = hostlist.expand_hostlist(target)
        except (hostlist.BadHostlist, ValueError) as exc:  # ValueError: a bound past Python's 4300-digit limit
            raise fail(f"bad hostlist {target[:40]!r}{'…' if len(target) > 40 else ''}: {str(exc)[:80]}") from None
        if not names or any(not n for n in names):
            raise fail(f"{target!r} names no host")
        if any(len(n) > 253 for n in names):
            raise fail("a host name longer than 253 characters (DNS's limit); check the line")
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
    if key == "role":
        if value not in ROLES:
            raise fail(f"role={value!r}: a host's role is {' or '.join(ROLES)} (a P/D job)")
        return value
    if key == "group":
        if not _GROUP.match(value):
            raise fail(f"group={value!r}: a group is a name of letters, digits, '.', '_' and '-' (at most 64), such as group=p0")
        return value
    if key == "gpus":
        try:
            parse_device_list(value)
        except ValueError as exc:
            raise fail(f"gpus={value!r}: {exc}; give a count (gpus=8) or device ids (gpus=0,1,4,5)") from None
        return value
    if key in ("cwd", "python") and value.startswith("-"):
        # It would reach `cd` or srun as an option; a path never needs to start with '-'.
        raise fail(f"{key}={value!r} starts with '-'; give a path (./{value} or an absolute one)")
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
    if not sep or not _ENV_NAME.match(name):  # the value is not echoed: a secret's name may be the mistake
        shown = f"{name!r}=…" if sep else repr(name)
        raise fail(f"env:{shown} is not env:NAME=VALUE with NAME made of letters, digits and '_'")
    return name, value


def _is_ipv6(text: str, fail) -> bool:
    try:
        is_v6 = ipaddress.ip_address(text).version == 6
    except ValueError:
        return False
    zone = text.partition("%")[2]
    if "%" in text and not _SCOPE_ID.match(zone):
        raise fail(f"IPv6 zone {zone!r} is not an interface name or index; use letters, digits, '.', '_', '-'")
    return is_v6
