"""Host-key trust decided as OpenSSH decides it (pure: known_hosts text in, verdict out)."""

import base64
import hashlib
import hmac

from launcher.transports.knownhosts import KnownHosts, host_key_name, host_matches, keyscan_hint, parse_line

ED = "AAAAC3NzaC1lZDI1NTE5AAAAIB" + "x" * 43
RSA = "AAAAB3NzaC1yc2EAAAADAQABAAABAQ" + "y" * 40


def known(text):
    return KnownHosts([e for i, line in enumerate(text.splitlines(), 1) if (e := parse_line(line, f"kh:{i}"))], ["kh"])


def test_patterns_wildcards_negation_ports_and_hashed_names():
    assert host_matches("node7.cluster", ("*.cluster",)) and not host_matches("node7.cluster", ("*.cluster", "!node7.*"))
    assert host_matches("[10.0.0.5]:2222", ("[10.0.0.5]:2222",)) and not host_matches("10.0.0.5", ("[10.0.0.5]:2222",))
    salt = b"0123456789abcdef0123"
    hashed = "|1|" + base64.b64encode(salt).decode() + "|" + base64.b64encode(hmac.new(salt, b"gpu1", hashlib.sha1).digest()).decode()
    assert host_matches("gpu1", (hashed,)) and not host_matches("gpu2", (hashed,))
    assert host_key_name("h", 22) == "h" and host_key_name("h", 2222) == "[h]:2222"


def test_a_pinned_key_of_any_type_makes_another_key_a_changed_key():
    kh = known(f"h1 ssh-rsa {RSA}\n")
    assert kh.verdict("h1", "ssh-rsa", RSA) == ("trusted", "")
    assert kh.verdict("h1", "ssh-ed25519", ED) == ("changed", "ssh-rsa at kh:1")  # paramiko would call this "new"
    assert kh.verdict("h2", "ssh-ed25519", ED) == ("unknown", "")


def test_revoked_beats_pinned_and_a_certificate_authority_is_named():
    kh = known(f"# comment\n*.cluster ssh-ed25519 {ED}\n@revoked * ssh-ed25519 {ED}\n@cert-authority *.ca ssh-rsa {RSA}\n@bogus x y z\n")
    assert kh.verdict("n1.cluster", "ssh-ed25519", ED) == ("revoked", "kh:3")
    assert kh.verdict("n1.ca", "ssh-ed25519", "other") == ("certificate", "kh:4")


def test_hints_quote_the_host_and_name_the_port():
    assert keyscan_hint("h;rm -rf ~", 2222, "/k h") == "ssh-keyscan -p 2222 'h;rm -rf ~' >> '/k h'"


def test_proxyjump_specs_parse_with_users_ports_and_ipv6():
    import pytest

    from launcher.transports import TransportError
    from launcher.transports.ssh import parse_jump

    assert parse_jump("h1", "x") == (None, "h1", None)
    assert parse_jump("alice@h1:2222", "x") == ("alice", "h1", 2222)
    assert parse_jump("[::1]:2222", "x") == (None, "::1", 2222)
    assert parse_jump("bob@[fd00::5]", "x") == ("bob", "fd00::5", None)
    assert parse_jump("fd00::5", "x") == (None, "fd00::5", None)
    with pytest.raises(TransportError, match="ProxyJump 'h1:ssh': 'ssh' is not a port"):
        parse_jump("h1:ssh", "x")
