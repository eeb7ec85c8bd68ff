"""Prefill/decode disaggregation in one job (``--prefill HOSTS --decode HOSTS``): roles, commands, requests.

Each host of a role runs one ``vllm serve`` (its slots as that instance's
local data parallelism) with a NixlConnector, and the head runs a proxy
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

from msgspec.structs import replace

from ..command import CommandError
from .flags import DP_ADDRESS, DP_LOCAL, DP_RANK, DP_SIZE, DP_START, HEADLESS, flag_name, flag_value, is_vllm_serve, kv_transfer_config

ROLES = ("prefill", "decode")
NIXL_BOTH = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"}, separators=(",", ":"))
_CROSS_HOST = (*DP_START, *DP_RANK, *DP_ADDRESS, *HEADLESS)


class RoleError(ValueError):
    """Roles that cannot make a P/D job; the message names the host and the fix."""


def assign_roles(hosts: Sequence, prefill: Sequence[str], decode: Sequence[str]):
    """Hosts with their role from --prefill/--decode (names of the hostfile), else their hostfile role=."""
    chosen = {name: "prefill" for name in prefill}
    for name in decode:
        if chosen.get(name) == "prefill":
            raise RoleError(f"host {name} is in both --prefill and --decode; give each host one role")
        chosen[name] = "decode"
    known = {h.name for h in hosts}
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise RoleError(f"--prefill/--decode name {unknown[0]}, which the hostfile does not list (hosts: {', '.join(sorted(known))})")
    return [replace(h, role=chosen.get(h.name, h.role)) for h in hosts]


def check_roles(hosts: Sequence) -> None:
    """Every host has a role, and both roles have a host."""
    missing = [h for h in hosts if not h.role]
    if missing:
        raise RoleError(f"{missing[0].label} has no role: give it role=prefill or role=decode, or name it in --prefill/--decode")
    for role in ROLES:
        if not any(h.role == role for h in hosts):
            raise RoleError(f"no {role} host: a P/D job needs at least one host of each role (--prefill HOSTS --decode HOSTS)")


def role_command(command: Sequence[str], slots: int) -> tuple[str, ...]:
    """One host's ``vllm serve``: a NixlConnector unless the command names one, its slots as local DP."""
    command = tuple(command)
    if not is_vllm_serve(command):
        raise CommandError(f"--prefill/--decode run 'vllm serve'; the command is {' '.join(command[:2])!r} ...")
    for name in map(flag_name, command):
        if name in _CROSS_HOST:
            raise CommandError(f"{name} in the command: in a P/D job each host is its own vLLM instance; drop it")
    config = kv_transfer_config(command)
    if config is not None and "Nixl" not in str(config.get("kv_connector", "")):
        raise CommandError(f"--kv-transfer-config names {config.get('kv_connector')!r}: the P/D proxy speaks the NixlConnector's protocol")
    extra: list[str] = [] if config is not None else ["--kv-transfer-config", NIXL_BOTH]
    size = flag_value(command, DP_SIZE)
    if slots > 1 and size is None:
        extra += ["--data-parallel-size", "{local_size}"]  # one instance: every engine of the host behind its API server
    elif size is not None and size not in (str(slots), "{local_size}"):
        raise CommandError(f"--data-parallel-size {size} in the command, but a host's slots are its instance's DP size ({slots})")
    if flag_value(command, DP_LOCAL) not in (None, str(slots), "{local_size}"):
        raise CommandError("--data-parallel-size-local in the command disagrees with a host's slots; drop it")
    return (*command, *extra)


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
