"""Host-key trust as OpenSSH decides it, for the SSH backend.

paramiko's own known_hosts reader matches names exactly, skips ``@revoked``
and ``@cert-authority`` lines, reads no global file, and treats a host whose
pinned key has another type as unknown (so "accept new keys" would accept a
substitute). ``KnownHosts`` reads the user's and the system's files with
their markers, patterns (``*``, ``?``, ``!``, ``[host]:port``, hashed
``|1|`` names), and ``verdict`` decides one presented key:

- a key listed ``@revoked`` for the host: refused, even if also pinned;
- a key pinned for the host: trusted;
- any other key for a host that has a pinned key, of any type: a changed
  key, always refused, also with --accept-new-host-keys;
- no pinned key but an ``@cert-authority`` for the host: refused, saying that
  host certificates are not supported and how to pin the host's own key;
- otherwise unknown: trusted and recorded only with --accept-new-host-keys.
"""

from __future__ import annotations

import base64
import os
import re
import shlex

import msgspec

GLOBAL_FILES = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")


class Entry(msgspec.Struct, frozen=True):
    patterns: tuple[str, ...]
    key_type: str
    blob: str  # base64, as in the file
    marker: str = ""  # "", "@revoked" or "@cert-authority"
    where: str = ""  # path:line

    def matches(self, name: str) -> bool:
        return host_matches(name, self.patterns)


def host_matches(name: str, patterns: tuple[str, ...]) -> bool:
    """OpenSSH's rule: a negated pattern that matches wins; else any positive match."""
    name = name.lower()
    hit = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern[1:] if negated else pattern
        if pattern.startswith("|1|"):
            matched = _hashed_matches(name, pattern)
        else:
            matched = _wildcard(pattern.lower()).fullmatch(name) is not None
        if matched and negated:
            return False
        hit = hit or matched
    return hit


def _wildcard(pattern: str) -> re.Pattern:
    """OpenSSH's patterns know only ``*`` and ``?``: ``[host]:port`` is literal, not a character class."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern))


def _hashed_matches(name: str, pattern: str) -> bool:
    import hashlib  # here: OpenSSL's load is a few ms of every head's start (the CLI loads this backend for its flags)
    import hmac

    try:
        salt, digest = (base64.b64decode(p) for p in pattern[3:].split("|", 1))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest)


def host_key_name(hostname: str, port: int) -> str:
    """How known_hosts names a host: ``host``, or ``[host]:port`` off port 22."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


class KnownHosts(msgspec.Struct):
    entries: list[Entry] = msgspec.field(default_factory=list)
    files: list[str] = msgspec.field(default_factory=list)  # the files read, for messages

    @classmethod
    def load(cls, paths: list[str]) -> KnownHosts:
        known = cls()
        for path in paths:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            known.files.append(path)
            for lineno, line in enumerate(lines, start=1):
                entry = parse_line(line, f"{path}:{lineno}")
                if entry is not None:
                    known.entries.append(entry)
        return known

    def verdict(self, name: str, key_type: str, blob: str) -> tuple[str, str]:
        """("trusted" | "revoked" | "changed" | "certificate" | "unknown", detail)."""
        mine = [e for e in self.entries if e.matches(name)]
        revoked = [e for e in mine if e.marker == "@revoked" and (e.key_type, e.blob) == (key_type, blob)]
        if revoked:
            return "revoked", revoked[0].where
        pinned = [e for e in mine if not e.marker]
        if any((e.key_type, e.blob) == (key_type, blob) for e in pinned):
            return "trusted", ""
        if pinned:
            return "changed", f"{pinned[0].key_type} at {pinned[0].where}"
        authorities = [e for e in mine if e.marker == "@cert-authority"]
        if authorities:
            return "certificate", authorities[0].where
        return "unknown", ""


def parse_line(line: str, where: str) -> Entry | None:
    """One known_hosts line (None: blank, a comment, or not a key line)."""
    words = line.split()
    if not words or words[0].startswith("#"):
        return None
    marker = ""
    if words[0].startswith("@"):
        marker, words = words[0], words[1:]
        if marker not in ("@revoked", "@cert-authority"):
            return None
    if len(words) < 3:
        return None
    return Entry(tuple(words[0].split(",")), words[1], words[2], marker, where)


def record(path: str, name: str, key_type: str, blob: str) -> None:
    """Append a newly trusted key (trust on first use), creating ~/.ssh (0700) and the file (0600) as ssh does."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{name} {key_type} {blob}\n")


def keyscan_hint(hostname: str, port: int, path: str) -> str:
    port_flag = f"-p {port} " if port != 22 else ""
    return f"ssh-keyscan {port_flag}{shlex.quote(hostname)} >> {shlex.quote(path)}"


def forget_hint(hostname: str, port: int, path: str) -> str:
    return f"ssh-keygen -R {shlex.quote(host_key_name(hostname, port))} -f {shlex.quote(path)}"
