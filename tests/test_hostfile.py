import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher import hostfile
from launcher.hostfile import HostfileError


def test_every_documented_form_parses():
    text = """
    # comment line
    localhost slots=2          # trailing comment
    gpu1:8
    alice@gpu2 slots=4 port=2222 ifname=^docker,lo cidr=10.1.2.3/16 env:NCCL_SOCKET_IFNAME=ib0 env:X=a=b
    gpu3 python=/opt/venv/bin/python cwd=/srv
    [fd00::5]:3
    """
    hosts = hostfile.parse(text, "hf")
    assert [(h.name, h.slots) for h in hosts] == [("localhost", 2), ("gpu1", 8), ("gpu2", 4), ("gpu3", 1), ("fd00::5", 3)]
    gpu2 = hosts[2]
    assert (gpu2.user, gpu2.port, gpu2.ifname, gpu2.cidr) == ("alice", 2222, "^docker,lo", "10.1.0.0/16")
    assert gpu2.env == (("NCCL_SOCKET_IFNAME", "ib0"), ("X", "a=b"))
    assert (hosts[3].python, hosts[3].cwd) == ("/opt/venv/bin/python", "/srv")
    assert hosts[0].origin == "hf:3" and hosts[0].is_loopback and not hosts[1].is_loopback


def test_slurm_hostlists_expand_in_slurm_order_not_sorted():
    hosts = hostfile.parse("node[07,01-03]:2 ifname=eth1\n")
    assert [h.name for h in hosts] == ["node07", "node01", "node02", "node03"]
    assert all(h.slots == 2 and h.ifname == "eth1" for h in hosts)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a\nb\na slots=2\n", "hf:3: host 'a' is already listed at line 1"),
        ("a slots=0\n", "hf:1: slots must be at least 1"),
        ("a slots=two\n", "hf:1: slots must be a whole number"),
        ("a slot=2\n", "hf:1: unknown option 'slot'; did you mean 'slots='?"),
        ("a:2 slots=3\n", "hf:1: slots given twice"),
        ("a port=70000\n", "hf:1: port 70000 is not a TCP port"),
        ("a cidr=10.0.0.300/8\n", "hf:1: cidr '10.0.0.300/8' is not a network"),
        ("a env:1BAD=x\n", "hf:1: env:'1BAD'=… is not env:NAME=VALUE"),
        ("\n\na $(reboot)\n", "hf:3: "),
        ("node[01-\n", "hf:1: "),
        ("a slots\n", "hf:1: expected key=value"),
    ],
)
def test_errors_name_file_line_and_fix(text, expected):
    with pytest.raises(HostfileError) as err:
        hostfile.parse(text, "hf")
    message = str(err.value)
    assert message.startswith(expected)
    assert "\n" not in message and "(line: " in message


def test_missing_file_is_one_line_error(tmp_path):
    with pytest.raises(HostfileError, match=r"no such hostfile; pass --hostfile"):
        hostfile.read(str(tmp_path / "nope"))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_any_text_parses_or_fails_with_one_line_located_error(text):
    try:
        hosts = hostfile.parse(text, "fuzz")
    except HostfileError as exc:
        message = str(exc)
        assert message.startswith(f"fuzz:{exc.lineno}: ") and exc.lineno >= 1
        assert "\n" not in message and "\r" not in message.split(" (line: ")[0]
    else:
        assert all(h.slots >= 1 and h.name for h in hosts)
        assert len({h.name for h in hosts}) == len(hosts)


# --- hostile input: each class, not just its first example --------------------------------


def test_a_hash_inside_a_value_is_kept_and_quotes_carry_spaces():
    hosts = hostfile.parse("a cwd=/tmp/run#1 env:X=a#b   # a comment\nb cwd='/srv/my work' env:Y=\"x y # z\"\n")
    assert (hosts[0].cwd, hosts[0].env) == ("/tmp/run#1", (("X", "a#b"),))
    assert (hosts[1].cwd, hosts[1].env) == ("/srv/my work", (("Y", "x y # z"),))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([chr(c) for c in [*range(0, 9), *range(11, 32), 127]]), st.integers(0, 12))  # \n ends a line
def test_any_control_character_anywhere_is_refused_with_its_column(char, at):
    line = "h1 cwd=/srv/work"
    line = line[:at] + char + line[at:]
    with pytest.raises(HostfileError) as err:
        hostfile.parse(line, "hf")
    assert f"control character {char!r} at column {at + 1}" in str(err.value) and "\n" not in str(err.value)


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20).filter(
        lambda z: not z.replace(".", "").replace("_", "").replace("-", "").isalnum()
    )
)
def test_an_ipv6_zone_holds_only_an_interface_name(zone):
    try:
        hosts = hostfile.parse(f"[fe80::1%{zone}]:2\n")
    except HostfileError:
        return
    # What got through is an interface name: nothing for a shell or an ssh config's Match exec to read.
    assert all(c.isalnum() or c in "._-" for c in hosts[0].name.partition("%")[2])


@pytest.mark.parametrize("option", ["cwd", "python"])
@pytest.mark.parametrize("value", ["-P", "--version", "-c", "'-x y'"])
def test_a_path_option_starting_with_a_dash_is_refused(option, value):
    with pytest.raises(HostfileError, match=f"{option}=.* starts with '-'; give a path"):
        hostfile.parse(f"a {option}={value}\n")


@settings(max_examples=50, deadline=None)
@given(st.integers(4301, 20000), st.sampled_from(["n[1-{}]", "n[{}]", "n[{}-{}]"]))
def test_a_hostlist_of_any_size_is_a_one_line_error_or_hosts(digits, pattern):
    big = "9" * digits
    with pytest.raises(HostfileError) as err:
        hostfile.parse(pattern.format(big, big) + "\n")
    assert len(str(err.value)) < 600 and "\n" not in str(err.value)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["HF_TOKEN", "API_KEY", "DB_PASSWORD", "MY_SECRET", "AWS_SECRET_ACCESS_KEY", "GCP_CREDS", "SALT", "TLS_CERT"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=8, max_size=20).map(lambda v: "s3cr3t-" + v),
    st.sampled_from(["slot=2", "slots=0", "cwd=-x", "port=99999", "bogus", "cidr=nope", "\x01"]),
    st.sampled_from(["{n}={v}", "'{n}={v}'", "{n}='{v} x'", '"env:{n}={v} x"', "'env:{n}={v}'"]),
    st.booleans(),
)
def test_a_hostfile_error_never_shows_a_secret_value(name, value, mistake, form, misspelt):
    """Whatever the mistake: another option, the name itself (HF-TOKEN), or the word quoted whole."""
    name = name.replace("_", "-") if misspelt and "_" in name else name
    word = form.format(n=name, v=value)
    word = word if word[1:].startswith("env:") else f"env:{word}"
    with pytest.raises(HostfileError) as err:
        hostfile.parse(f"h1 {word} {mistake}\n")
    assert "s3cr3t-" not in str(err.value), str(err.value)
