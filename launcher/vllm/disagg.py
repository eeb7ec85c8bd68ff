"""Prefill/decode disaggregation in one job (``--prefill HOSTS --decode HOSTS``): roles, commands, requests.

An instance is one ``vllm serve`` deployment of one role: a host by itself
(its slots as the instance's data parallelism), or the hosts that share a
``group`` (hostfile ``group=p0``, or ``--prefill h1+h2``), whose engines form
one DP group with vLLM's flags written per host as ``--vllm-dp`` writes them
(``dp.dp_commands``: the first host runs the API server, the others are
headless in the internal mode). Every engine gets a NixlConnector, and the head runs a proxy
(``launcher.head.pd_proxy``) that sends each request first to a prefill instance,
with ``max_tokens`` 1 and ``kv_transfer_params.do_remote_decode``, then to a
decode instance with the ``kv_transfer_params`` the prefill returned: the
decode engine pulls the prompt's KV blocks from the prefill engine over NIXL.
This is vLLM's own protocol, as its toy proxy
(tests/v1/kv_connector/nixl_integration/toy_proxy_server.py) speaks it;
instances are taken round-robin within each role.

Pure: hosts, argv tuples and request dicts in, the same out.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from msgspec.structs import replace

from ..command import CommandError
from . import dp as vllm_dp
from . import nodes as vllm_nodes
from .flags import DP_ADDRESS, DP_LOCAL, DP_RANK, DP_SIZE, DP_START, HEADLESS, flag_name, flag_value, is_vllm_serve, kv_transfer_config

ROLES = ("prefill", "decode")
# vLLM 0.32 deprecates kv_both for the NixlConnector ("set kv_role='kv_producer' for prefill instances and
# kv_role='kv_consumer' for decode instances"); each role's instances get their own.
KV_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}


def nixl_config(role: str) -> str:
    """The ``--kv-transfer-config`` a P/D job gives a ``role`` instance whose command names none."""
    return json.dumps({"kv_connector": "NixlConnector", "kv_role": KV_ROLES[role]}, separators=(",", ":"))


_CROSS_HOST = (*DP_START, *DP_RANK, *DP_ADDRESS, *HEADLESS)


INSTANCE_MODES = ("internal", "hybrid")  # how a multi-host instance balances over its engines (--vllm-dp)


class RoleError(ValueError):
    """Roles that cannot make a P/D job; the message names the host and the fix."""


class Instance(msgspec.Struct, frozen=True):
    """One vLLM instance of a P/D job: its role, its name (the group's, or its one host's), its hosts
    (indices in hostfile order; the first is its leader: the API server, the DP address)."""

    role: str
    name: str
    hosts: tuple[int, ...]

    @property
    def leader(self) -> int:
        return self.hosts[0]


def assign_roles(hosts: Sequence, prefill: Sequence[Sequence[str]], decode: Sequence[Sequence[str]]):
    """Hosts with their role (and group) from --prefill/--decode, else their hostfile role= and group=.

    Each of ``prefill`` and ``decode`` lists instances, each the names of its hosts: one name, one host of its
    own; several (``--prefill h1+h2``), one instance over them, grouped under the name ``h1+h2``."""
    chosen: dict[str, tuple[str, str | None]] = {}
    for role, instances_ in (("prefill", prefill), ("decode", decode)):
        for names in instances_:
            group = "+".join(names) if len(names) > 1 else None
            for name in names:
                if name in chosen:
                    again = "both --prefill and --decode" if chosen[name][0] != role else f"two --{role} instances"
                    raise RoleError(f"host {name} is in {again}; give each host one instance")
                chosen[name] = (role, group)
    known = {h.name for h in hosts}
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise RoleError(f"--prefill/--decode name {unknown[0]}, which the hostfile does not list (hosts: {', '.join(sorted(known))})")
    return [replace(h, role=chosen[h.name][0], group=chosen[h.name][1]) if h.name in chosen else h for h in hosts]


def check_roles(hosts: Sequence) -> None:
    """Every host has a role, both roles have a host, and a group's hosts share one role."""
    missing = [h for h in hosts if not h.role]
    if missing:
        raise RoleError(f"{missing[0].label} has no role: give it role=prefill or role=decode, or name it in --prefill/--decode")
    for role in ROLES:
        if not any(h.role == role for h in hosts):
            raise RoleError(f"no {role} host: a P/D job needs at least one host of each role (--prefill HOSTS --decode HOSTS)")
    instances(hosts)


def instances(hosts: Sequence) -> tuple[Instance, ...]:
    """The P/D job's instances, in the order their first hosts appear: a host with no group is one by itself."""
    members: dict[object, list[int]] = {}
    for index, host in enumerate(hosts):
        members.setdefault(("group", host.group) if host.group else ("host", index), []).append(index)
    found = []
    for indices in members.values():
        first = hosts[indices[0]]
        other = next((hosts[i] for i in indices if hosts[i].role != first.role), None)
        if other is not None:
            raise RoleError(
                f"{other.label} is in group {first.group} with role={other.role}, but {first.label} has role={first.role}: "
                f"one instance has one role; give the group's hosts the same role or another group"
            )
        found.append(Instance(role=first.role, name=first.group or first.name, hosts=tuple(indices)))
    return tuple(found)


def instance_commands(
    command: Sequence[str], role: str, slots: Sequence[int], mode: str = "internal", nodes: bool = False
) -> list[tuple[str, ...]]:
    """Each host's ``vllm serve`` for one ``role`` instance over hosts with ``slots`` DP ranks each, in order.

    A NixlConnector in the role's kv_role unless the command names a connector. One host: its slots as the
    instance's DP size. Several: one DP group, its flags written per host as ``--vllm-dp MODE`` writes them, with ``{world_size}``,
    ``{host_first_rank}``, ``{head_ip}`` and ``{rpc_port}`` standing for the instance's (the plan fills them so);
    or, with ``nodes`` (``--vllm-nodes``), one model-parallel instance whose hosts are its nodes, its flags as
    ``nodes.nodes_commands`` writes them with each host's node rank within the instance."""
    command = _with_connector(tuple(command), role)
    if mode not in INSTANCE_MODES:
        raise CommandError(f"--vllm-dp {mode} in a P/D job: an instance over several hosts balances internal or hybrid")
    if nodes and len(slots) > 1:
        if any(count != 1 for count in slots):
            raise CommandError("--vllm-nodes: each host of an instance is one node of it (its GPUs are vLLM's); give each slots=1")
        head, rest = vllm_nodes.nodes_commands(command, len(slots))
        return [_node_rank(head if i == 0 else rest, i) for i in range(len(slots))]
    if len(slots) > 1:
        head, rest = vllm_dp.dp_commands(command, mode, slots)
        return [head, *[rest] * (len(slots) - 1)]
    (count,) = slots
    size = flag_value(command, DP_SIZE)
    extra: list[str] = []
    if count > 1 and size is None:
        extra += ["--data-parallel-size", "{local_size}"]  # one instance: every engine of the host behind its API server
    elif size is not None and size not in (str(count), "{local_size}"):
        raise CommandError(f"--data-parallel-size {size} in the command, but a host's slots are its instance's DP size ({count})")
    if flag_value(command, DP_LOCAL) not in (None, str(count), "{local_size}"):
        raise CommandError("--data-parallel-size-local in the command disagrees with a host's slots; drop it")
    return [(*command, *extra)]


def _node_rank(command: tuple[str, ...], rank: int) -> tuple[str, ...]:
    """``--node-rank {host_index}`` as written for a job, with the host's rank within its instance instead."""
    i = command.index("--node-rank")
    return (*command[: i + 1], str(rank), *command[i + 2 :])


def _with_connector(command: tuple[str, ...], role: str) -> tuple[str, ...]:
    """The command with a NixlConnector for ``role`` (unless it names a connector); refused when it is no vllm serve, names another
    connector, or writes flags that tie hosts together (the plan writes those per instance)."""
    if not is_vllm_serve(command):
        raise CommandError(f"--prefill/--decode run 'vllm serve'; the command is {' '.join(command[:2])!r} ...")
    for name in map(flag_name, command):
        if name in _CROSS_HOST:
            raise CommandError(
                f"{name} in the command: launcher writes it per host of each instance (hostfile group= joins hosts into one); drop it"
            )
    config = kv_transfer_config(command)
    if config is not None and "Nixl" not in str(config.get("kv_connector", "")):
        raise CommandError(f"--kv-transfer-config names {config.get('kv_connector')!r}: the P/D proxy speaks the NixlConnector's protocol")
    return command if config is not None else (*command, "--kv-transfer-config", nixl_config(role))


def prefill_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the prefill instance gets: the request, one token, no stream, and the ask to keep its KV for a decoder."""
    request = copy.deepcopy(dict(body))
    request["kv_transfer_params"] = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    request["stream"] = False
    request["max_tokens"] = 1
    if "max_completion_tokens" in request:
        request["max_completion_tokens"] = 1
    for name in ("stream_options", "min_tokens", "min_completion_tokens"):  # not for a one-token prefill
        request.pop(name, None)
    return request


def decode_request(body: Mapping[str, Any], prefilled: Mapping[str, Any]) -> dict[str, Any]:
    """What the decode instance gets: the client's request as sent, with the prefill's ``kv_transfer_params``.

    Never the client's own: they say where the decoder pulls KV from, and only the prefill may say that
    (a client that made the prefill return none, with a stop string, would otherwise choose the address)."""
    request = copy.deepcopy(dict(body))
    request.pop("kv_transfer_params", None)
    params = prefilled.get("kv_transfer_params")
    if isinstance(params, dict) and params:
        request["kv_transfer_params"] = params
    return request
