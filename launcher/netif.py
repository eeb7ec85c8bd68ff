"""Which of MY addresses does this process bind?

``select_bind_address`` is pure: it takes a snapshot of this host's interfaces
and the rank's selectors and returns the address with the rule that chose it.
``local_interfaces`` is the one probe (netifaces for addresses, psutil for
link state). ``BIND_RULES`` is the order, first match wins, and
``describe`` says, from what the plan knows, which rule will decide: the dry
run and the run read the same order.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping, Sequence

import msgspec

from .rankenv import HostFacts, RankIdentity

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
EXPLICIT_VAR = "VLLM_NIXL_SIDE_CHANNEL_HOST"


class BindAddressError(ValueError):
    """No usable bind address; the message lists this host's interfaces and the fix."""


class InterfaceAddress(msgspec.Struct, frozen=True):
    interface: str
    address: IPAddress
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    up: bool = True

    @property
    def is_loopback(self) -> bool:
        return self.address.is_loopback

    def __str__(self) -> str:
        state = "" if self.up else " (down)"
        return f"{self.interface} {self.address}/{self.network.prefixlen}{state}"


class BindRequest(msgspec.Struct, frozen=True):
    """What a rank knows when it picks its address."""

    explicit: str | None = None  # VLLM_NIXL_SIDE_CHANNEL_HOST as the rank sees it
    ifname: str | None = None
    cidr: str | None = None
    reached: str | None = None  # the local address the head connected to
    host_is_loopback: bool = False
    hostname: str = "this host"


# (key, what it means), in the order they are tried.
class BindChoice(msgspec.Struct, frozen=True):
    address: str
    rule: str  # what chose it, for people
    key: str = ""  # which of BIND_RULES


Usable = Sequence[InterfaceAddress]  # up, not link-local


def _by_explicit(request: BindRequest, usable: Usable, every: Usable, default_interface: str | None) -> BindChoice | None:
    if request.explicit:
        return BindChoice(_explicit(request, every), f"{EXPLICIT_VAR} (explicit)", "explicit")
    return None


def _by_ifname(request: BindRequest, usable: Usable, every: Usable, default_interface: str | None) -> BindChoice | None:
    if not request.ifname:
        return None
    match = ifname_matcher(request.ifname)
    found = [a for a in usable if match(a.interface)]
    if not found:
        raise _error(request, every, f"no up interface matches ifname={request.ifname}", "fix ifname= in the hostfile")
    best = _preferred(found)
    return BindChoice(str(best.address), f"ifname={request.ifname} ({best.interface})", "ifname")


def _by_cidr(request: BindRequest, usable: Usable, every: Usable, default_interface: str | None) -> BindChoice | None:
    if not request.cidr:
        return None
    network = ipaddress.ip_network(request.cidr, strict=False)
    found = [a for a in usable if a.address.version == network.version and a.address in network]
    if not found:
        raise _error(request, every, f"no up interface has an address in cidr={network}", "fix cidr= in the hostfile")
    best = _preferred(found)
    return BindChoice(str(best.address), f"cidr={network} ({best.interface})", "cidr")


def _by_reached(request: BindRequest, usable: Usable, every: Usable, default_interface: str | None) -> BindChoice | None:
    local = _local_match(request.reached, usable) if request.reached else None
    return BindChoice(str(local), "address the head reached this host on", "reached") if local is not None else None


def _by_default_route(request: BindRequest, usable: Usable, every: Usable, default_interface: str | None) -> BindChoice | None:
    found = [a for a in usable if a.interface == default_interface and not a.is_loopback] if default_interface else []
    if not found:
        return None
    return BindChoice(str(_preferred(found).address), f"default-route interface {default_interface}", "default-route")


def _by_loopback(request: BindRequest, usable: Usable, every: Usable, default_interface: str | None) -> BindChoice | None:
    found = [a for a in usable if a.is_loopback] if request.host_is_loopback else []
    return BindChoice(str(_preferred(found).address), "loopback host", "loopback") if found else None


class BindRule(msgspec.Struct, frozen=True):
    """One way to choose a host's address: its key, what it means, and the function that applies it
    (a choice, None when it does not apply, or BindAddressError when it applies and nothing fits)."""

    key: str
    meaning: str
    choose: Callable[[BindRequest, Usable, Usable, str | None], BindChoice | None]


# The order, first that chooses wins: what select_bind_address runs and what the documentation prints.
BIND_RULES: tuple[BindRule, ...] = (
    BindRule(
        "explicit",
        f"an explicit {EXPLICIT_VAR} set for the host (os.environ.setdefault, as vLLM's fix); it must be a local, up address",
        _by_explicit,
    ),
    BindRule("ifname", "an interface selector in NCCL_SOCKET_IFNAME syntax (eth, =eth0, ^docker,lo)", _by_ifname),
    BindRule("cidr", "a network selector (cidr=10.1.0.0/16)", _by_cidr),
    BindRule("reached", "the local address the head reached this host on (SSH_CONNECTION, Slurm's NodeAddr)", _by_reached),
    BindRule("default-route", "the default-route interface's address", _by_default_route),
    BindRule("loopback", "loopback, only when the host itself is loopback", _by_loopback),
)
DECIDED_ON_THE_HOST = ("reached", "default-route", "loopback")


def select_bind_address(
    request: BindRequest,
    addresses: Sequence[InterfaceAddress],
    default_interface: str | None = None,
) -> BindChoice:
    """Pick this host's bind address by BIND_RULES, in order; raise BindAddressError naming what to fix."""
    usable = [a for a in addresses if a.up and not a.address.is_link_local]
    for rule in BIND_RULES:
        choice = rule.choose(request, usable, addresses, default_interface)
        if choice is not None:
            return choice
    raise _error(
        request,
        addresses,
        "cannot tell which address to bind (no selector, no head connection, no default route)",
        "add ifname= or cidr= for this host in the hostfile",
    )


def deciding_rule(request: BindRequest) -> str | None:
    """The rule that decides from what the plan knows (explicit, ifname, cidr), or None: the host decides."""
    for rule in BIND_RULES:
        if rule.key not in DECIDED_ON_THE_HOST and getattr(request, rule.key):
            return rule.key
    return None


def describe(request: BindRequest) -> str:
    """Which rule will choose this host's address, as ``launcher plan`` prints it."""
    key = deciding_rule(request)
    if key == "explicit":
        return f"explicit {EXPLICIT_VAR}={request.explicit}"
    if key is not None:
        return f"{key}={getattr(request, key)}"
    tail = ", else loopback" if request.host_is_loopback else ""
    return f"the address the head reaches it on, else the default-route interface{tail}"


def ifname_matcher(spec: str) -> Callable[[str], bool]:
    """NCCL_SOCKET_IFNAME syntax: ``eth,ib`` prefixes, ``=eth0`` exact, ``^`` excludes."""
    exclude = spec.startswith("^")
    body = spec[1:] if exclude else spec
    exact = body.startswith("=")
    names = [n for n in (body[1:] if exact else body).split(",") if n]

    def listed(interface: str) -> bool:
        return any(interface == n if exact else interface.startswith(n) for n in names)

    return (lambda i: not listed(i)) if exclude else listed


def _explicit(request: BindRequest, addresses: Sequence[InterfaceAddress]) -> str:
    value = request.explicit.strip("[]")  # type: ignore[union-attr]
    if value.lower() == "localhost":
        value = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise _error(request, addresses, f"{EXPLICIT_VAR}={request.explicit} is not an IP address", _EXPLICIT_FIX) from None
    if ip.is_unspecified:
        raise _error(
            request,
            addresses,
            f"{EXPLICIT_VAR}={request.explicit} would bind, but peers would be told to dial {ip}",
            _EXPLICIT_FIX,
        )
    local = _local_match(value, [a for a in addresses if a.up])
    if local is None:
        raise _error(request, addresses, f"{EXPLICIT_VAR}={request.explicit} is not an address of {request.hostname}", _EXPLICIT_FIX)
    return str(local)


_EXPLICIT_FIX = f"set env:{EXPLICIT_VAR} in the hostfile to one of these, or remove it to let the launcher detect the address"


def _local_match(text: str, addresses: Sequence[InterfaceAddress]) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    for a in addresses:
        if a.address == ip:
            return ip
    # The whole loopback network is local on Linux (127.0.0.2 works without being listed).
    for a in addresses:
        if a.is_loopback and ip.version == a.address.version and ip in a.network:
            return ip
    return None


def _preferred(found: Sequence[InterfaceAddress]) -> InterfaceAddress:
    """Among matches: a routable address before loopback (peers cannot dial a
    peer's 127.0.0.1), then IPv4 before IPv6, then interface order."""
    return min(found, key=lambda a: (a.is_loopback, a.address.version != 4))


def _error(request: BindRequest, addresses: Sequence[InterfaceAddress], what: str, fix: str) -> BindAddressError:
    listing = ", ".join(str(a) for a in addresses) or "none"
    return BindAddressError(f"{what}; interfaces of {request.hostname}: {listing}; {fix}")


# --- the probe -------------------------------------------------------------


def local_interfaces() -> list[InterfaceAddress]:
    """This host's interface addresses, with link state."""
    import netifaces
    import psutil

    stats = psutil.net_if_stats()
    result = []
    for name in netifaces.interfaces():
        up = stats[name].isup if name in stats else True
        entries = netifaces.ifaddresses(name)
        for family in (netifaces.AF_INET, netifaces.AF_INET6):
            for entry in entries.get(family, []):
                addr = entry.get("addr", "").split("%", 1)[0]
                mask = entry.get("netmask") or entry.get("mask") or ""
                if not addr:
                    continue
                ip = ipaddress.ip_address(addr)
                prefix = _prefixlen(mask, ip.version)
                result.append(InterfaceAddress(name, ip, ipaddress.ip_network(f"{addr}/{prefix}", strict=False), up))
    return result


def _prefixlen(mask: str, version: int) -> int:
    full = 32 if version == 4 else 128
    if not mask:
        return full
    if "/" in mask:
        return int(mask.rsplit("/", 1)[1])
    try:
        return ipaddress.ip_network(f"0.0.0.0/{mask}").prefixlen if version == 4 else bin(int(ipaddress.IPv6Address(mask))).count("1")
    except ValueError:
        return full


def default_route_interface() -> str | None:
    import netifaces

    gateways = netifaces.gateways().get("default", {})
    for family in (netifaces.AF_INET, netifaces.AF_INET6):
        if family in gateways:
            return gateways[family][1]
    return None


def ssh_server_address(env: Mapping[str, str]) -> str | None:
    """The local address an SSH client reached us on: SSH_CONNECTION's third field."""
    fields = env.get("SSH_CONNECTION", "").split()
    return fields[2] if len(fields) == 4 else None


def bind_request(identity: RankIdentity, facts: HostFacts, explicit: str | None) -> BindRequest:
    """What a rank knows when it picks its address (``explicit``: its VLLM_NIXL_SIDE_CHANNEL_HOST)."""
    if explicit is not None and _is_hostname(explicit):
        explicit = resolve(explicit) or explicit  # left as is: select_bind_address says it is not an IP
    return BindRequest(
        explicit=explicit or None,
        ifname=identity.ifname,
        cidr=identity.cidr,
        reached=facts.reached_address,
        host_is_loopback=facts.host_is_loopback,
        hostname=socket.gethostname(),
    )


def interface_of(address: str, interfaces: Sequence[InterfaceAddress] | None = None) -> str | None:
    """The interface that holds ``address`` here (for UCX_NET_DEVICES); None for a loopback-range alias.
    ``interfaces``: this host's, when already probed."""
    ip = address_literal(address)
    for entry in local_interfaces() if interfaces is None else interfaces:
        if str(entry.address) == ip:
            return entry.interface
    return "lo" if ip and ipaddress.ip_address(ip).is_loopback else None


def resolve_bind_address(request: BindRequest) -> BindChoice:
    """Probe this host and choose."""
    return select_bind_address(request, local_interfaces(), default_route_interface())


def claim_bind_address(env) -> BindChoice:
    """What a rank does first, as vLLM's engine core after PR #41806: resolve
    this host's address from the rank's environment, then ``setdefault`` it
    into ``VLLM_NIXL_SIDE_CHANNEL_HOST`` and ``VLLM_HOST_IP``, and its
    interface into ``GLOO_SOCKET_IFNAME`` (a value set for the host wins).
    Gloo otherwise binds the address the host name resolves to, often
    loopback: a multi-node CPU or TP job's peers then dial 127.0.0.1 ("Gloo
    connectFullMesh failed ... remote=[127.0.0.1]"). Raises BindAddressError
    (or RankEnvError)."""
    request = bind_request(RankIdentity.from_env(env), HostFacts.from_env(env), env.get(EXPLICIT_VAR))
    interfaces = local_interfaces()  # one probe, for the choice and its interface
    choice = select_bind_address(request, interfaces, default_route_interface())
    env.setdefault(EXPLICIT_VAR, choice.address)
    env.setdefault("VLLM_HOST_IP", choice.address)
    interface = interface_of(choice.address, interfaces)
    if interface is not None:
        env.setdefault("GLOO_SOCKET_IFNAME", interface)
    return choice


def _is_hostname(value: str) -> bool:
    try:
        ipaddress.ip_address(value.strip("[]"))
        return False
    except ValueError:
        return value.lower() != "localhost" and bool(value)


def resolve(name: str) -> str | None:
    """A host name or address literal as one IP address string (IPv6 unbracketed), or None.

    The one place the launcher asks the resolver (getaddrinfo), for transports
    and ranks alike; literals are returned without asking.
    """
    literal = address_literal(name)
    if literal is not None:
        return literal
    try:
        return socket.getaddrinfo(name.strip("[]"), None, type=socket.SOCK_STREAM)[0][4][0]
    except (OSError, UnicodeError):
        return None


def address_literal(text: str) -> str | None:
    """``text`` as an IP address string if it is one (brackets and an IPv6 scope dropped), else None."""
    try:
        return str(ipaddress.ip_address(text.strip("[]").split("%", 1)[0]))
    except ValueError:
        return None


def host_port(text: str) -> tuple[str, int] | None:
    """``ADDR:PORT`` (``[v6]:PORT`` too) -> (address, port), or None when it is not one."""
    address, sep, port = text.rpartition(":")
    if not sep or not address.strip("[]") or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    return address.strip("[]"), int(port)


def url_host(address: str) -> str:
    """An address as the host part of a URL or ZMQ endpoint: IPv6 in brackets."""
    bare = address.strip("[]")
    return f"[{bare}]" if ":" in bare else bare


def zmq_tcp_path(address: str, port: int) -> str:
    """``tcp://host:port`` with IPv6 bracketed, as ZMQ wants it."""
    return f"tcp://{url_host(address)}:{port}"
