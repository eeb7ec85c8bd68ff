import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from launcher import envpolicy, netif
from launcher import plan as planning
from launcher.netif import BindAddressError, BindRequest, InterfaceAddress, select_bind_address
from launcher.plan import Host, LaunchOptions
from launcher.rankenv import HostFacts, RankIdentity


def addr(interface, cidr, up=True):
    iface = ipaddress.ip_interface(cidr)
    return InterfaceAddress(interface, iface.ip, iface.network, up)


# A host with loopback, a primary NIC, a second network, a down NIC and IPv6.
HOST = [
    addr("lo", "127.0.0.1/8"),
    addr("lo", "::1/128"),
    addr("eth0", "198.18.0.12/24"),
    addr("eth0", "fe80::1/64"),
    addr("eth1", "198.19.0.12/24"),
    addr("eth1", "fd00:19::12/64"),
    addr("docker0", "172.17.0.1/16"),
    addr("eth9", "198.18.9.9/24", up=False),
]


def choose(**kw):
    return select_bind_address(BindRequest(hostname="h2", **kw), HOST, kw.pop("default", None))


RULE_CASES = [
        (dict(explicit="198.19.0.12", ifname="=eth0", reached="198.18.0.12"), "198.19.0.12", "explicit"),
        (dict(explicit="[fd00:19::12]"), "fd00:19::12", "explicit"),
        (dict(explicit="localhost"), "127.0.0.1", "explicit"),
        (dict(ifname="=eth1", reached="198.18.0.12"), "198.19.0.12", "ifname==eth1"),
        (dict(ifname="eth", reached="198.19.0.12"), "198.18.0.12", "ifname=eth"),
        (dict(ifname="^eth0,lo,docker"), "198.19.0.12", "ifname=^eth0,lo,docker"),
        (dict(ifname="^eth0"), "198.19.0.12", "ifname=^eth0"),  # matches lo too, but a routable address wins
        (dict(ifname="=lo"), "127.0.0.1", "ifname==lo"),
        (dict(cidr="0.0.0.0/0"), "198.18.0.12", "cidr=0.0.0.0/0"),
        (dict(cidr="198.19.0.0/24"), "198.19.0.12", "cidr=198.19.0.0/24"),
        (dict(cidr="fd00:19::/64"), "fd00:19::12", "cidr=fd00:19::/64"),
        (dict(reached="198.19.0.12"), "198.19.0.12", "reached"),
        (dict(reached="::ffff:198.18.0.12"), "198.18.0.12", "reached"),
        (dict(reached="127.0.0.3", host_is_loopback=True), "127.0.0.3", "reached"),
        (dict(host_is_loopback=True), "127.0.0.1", "loopback"),
]  # fmt: skip


@pytest.mark.parametrize("request_kw, address, rule", RULE_CASES)
def test_rules_in_order(request_kw, address, rule):
    choice = choose(**request_kw)
    assert choice.address == address
    assert rule.split("=")[0] in choice.rule


def test_the_table_is_what_runs_and_every_row_of_it_chooses_somewhere():
    by_default_route = select_bind_address(BindRequest(hostname="h2"), HOST, "eth1")
    chosen = {choose(**dict(kw)).key for kw, _, _ in RULE_CASES} | {by_default_route.key}
    assert chosen == {rule.key for rule in netif.BIND_RULES}
    assert set(netif.DECIDED_ON_THE_HOST) < chosen


def test_default_route_interface_is_the_fallback():
    choice = select_bind_address(BindRequest(), HOST, default_interface="eth1")
    assert choice.address == "198.19.0.12" and "default-route" in choice.rule


def test_a_reached_address_that_is_not_local_falls_through_to_the_default_route():
    choice = select_bind_address(BindRequest(reached="203.0.113.7"), HOST, default_interface="eth0")
    assert choice.address == "198.18.0.12"


@pytest.mark.parametrize(
    "request_kw, message",
    [
        (dict(explicit="198.18.255.254"), "VLLM_NIXL_SIDE_CHANNEL_HOST=198.18.255.254 is not an address of h2"),
        (dict(explicit="198.18.9.9"), "is not an address of h2"),  # on an interface that is down
        (dict(explicit="0.0.0.0"), "peers would be told to dial 0.0.0.0"),
        (dict(explicit="not an ip!"), "is not an IP address"),
        (dict(ifname="=ib0"), "no up interface matches ifname==ib0"),
        (dict(cidr="10.0.0.0/8"), "no up interface has an address in cidr=10.0.0.0/8"),
        (dict(), "cannot tell which address to bind"),
    ],
)
def test_errors_list_this_hosts_interfaces_and_the_fix(request_kw, message):
    with pytest.raises(BindAddressError) as err:
        choose(**request_kw)
    text = str(err.value)
    assert message in text
    assert "eth1 198.19.0.12/24" in text and "eth9 198.18.9.9/24 (down)" in text
    assert "\n" not in text
    assert "hostfile" in text  # says where to fix it


@pytest.mark.parametrize(
    "spec, yes, no",
    [
        ("eth", ["eth0", "eth10"], ["ib0", "lo"]),
        ("=eth0", ["eth0"], ["eth01", "eth1"]),
        ("^docker,lo", ["eth0", "ib0"], ["docker0", "lo"]),
        ("^=eth0", ["eth01", "eth1"], ["eth0"]),
        ("eth,ib", ["eth2", "ib1"], ["lo"]),
    ],
)
def test_ifname_selectors_follow_nccl_socket_ifname(spec, yes, no):
    match = netif.ifname_matcher(spec)
    assert all(match(n) for n in yes) and not any(match(n) for n in no)


def test_ssh_connection_gives_the_address_the_head_reached():
    assert netif.ssh_server_address({"SSH_CONNECTION": "198.18.0.1 50000 198.18.0.12 22"}) == "198.18.0.12"
    assert netif.ssh_server_address({}) is None


def test_zmq_paths_bracket_ipv6():
    assert netif.zmq_tcp_path("::1", 5600) == "tcp://[::1]:5600"
    assert netif.zmq_tcp_path("127.0.0.1", 5600) == "tcp://127.0.0.1:5600"


def test_the_probe_sees_this_hosts_loopback():
    found = netif.local_interfaces()
    assert any(a.interface == "lo" and str(a.address) == "127.0.0.1" and a.network.prefixlen == 8 and a.up for a in found)


# --- the dry run and the run read one rule order -------------------------------------


SNAPSHOT = [
    netif.InterfaceAddress("lo", ipaddress.ip_address("127.0.0.1"), ipaddress.ip_network("127.0.0.0/8")),
    netif.InterfaceAddress("eth0", ipaddress.ip_address("10.0.0.5"), ipaddress.ip_network("10.0.0.0/24")),
    netif.InterfaceAddress("ib0", ipaddress.ip_address("192.168.7.5"), ipaddress.ip_network("192.168.7.0/24")),
    netif.InterfaceAddress("docker0", ipaddress.ip_address("172.17.0.1"), ipaddress.ip_network("172.17.0.0/16"), up=False),
]


@given(
    name=st.sampled_from(["localhost", "node1", "127.0.0.2"]),
    explicit=st.sampled_from([None, "127.0.0.2", "10.0.0.5", "10.9.9.9", "localhost", "0.0.0.0"]),
    ifname=st.sampled_from([None, "lo", "=eth0", "ib", "^lo,docker", "nope"]),
    cidr=st.sampled_from([None, "10.0.0.0/8", "192.168.7.0/24", "172.17.0.0/16"]),
    reached=st.sampled_from([None, "10.0.0.5", "192.168.7.5", "10.9.9.9"]),
    default=st.sampled_from([None, "eth0", "ib0"]),
)
def test_the_dry_run_names_the_rule_the_run_applies(name, explicit, ifname, cidr, reached, default):
    host = Host(name, ifname=ifname, cidr=cidr, env=(("VLLM_NIXL_SIDE_CHANNEL_HOST", explicit),) if explicit else ())
    hp = planning.build([host], LaunchOptions(), {}, "j").hosts[0]
    planned = netif.deciding_rule(hp.bind_request())
    shown = netif.describe(hp.bind_request())
    # The run: the rank's environment as the agent builds it, read back as the rank reads it.
    env = envpolicy.process_environment({}, hp.ranks[0].env, HostFacts(host_is_loopback=host.is_loopback, reached_address=reached))
    request = netif.bind_request(RankIdentity.from_env(env), HostFacts.from_env(env), env.get(netif.EXPLICIT_VAR))
    try:
        choice = netif.select_bind_address(request, SNAPSHOT, default)
    except netif.BindAddressError:
        return  # the run refuses, naming the fix: it never binds by another rule than the plan showed
    if planned is None:
        assert choice.key in netif.DECIDED_ON_THE_HOST and shown.startswith("the address the head reaches it on")
    else:
        assert choice.key == planned and shown.startswith("explicit" if planned == "explicit" else f"{planned}=")


def test_an_explicit_address_beats_the_ifname_on_the_same_line_in_the_dry_run_too():
    host = Host("localhost", ifname="lo", env=(("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.2"),))
    hp = planning.build([host], LaunchOptions(), {}, "j").hosts[0]
    assert netif.describe(hp.bind_request()) == "explicit VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.2"
