"""Machine-readable results (``--json``): a plan and a launch's result as plain JSON-ready data.

Each document names its schema (``launcher.plan/1``, ``launcher.result/1``);
a field is only ever added within a version. The README lists the fields.
Secret-looking values are masked as in the dry run. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from .. import envpolicy, gpus, netif
from ..check import CheckMatrix
from ..command import user_command
from ..plan import LaunchPlan
from ..results import Failure, LaunchResult

PLAN_SCHEMA = "launcher.plan/1"
RESULT_SCHEMA = "launcher.result/1"
STATUS_SCHEMA = "launcher.status/1"


def plan_document(plan: LaunchPlan, python: str = "python") -> dict[str, Any]:
    """Per host its bind rule, per process its ranks, ports, command and environment (with each variable's source);
    a P/D job's instances; ``python``: the interpreter a host without ``python=`` runs."""
    instance_of = {i: instance for instance in plan.instances for i in instance.hosts}
    return {
        "schema": PLAN_SCHEMA,
        "job_id": plan.job_id,
        "world_size": plan.world_size,
        "port_base": plan.port_base,
        "builtin": plan.builtin,
        "readiness": plan.readiness.describe(),  # the first host's; each host's below
        "warnings": list(plan.warnings),
        "env_layers": [{"name": layer.name, "applied_by": layer.applied_by} for layer in envpolicy.LAYERS],
        "instances": [
            {
                "role": instance.role,
                "name": instance.name,
                "hosts": [plan.hosts[i].host.name for i in instance.hosts],
                "api_hosts": [plan.hosts[i].host.name for i in plan.api_hosts(instance)],
                "dp_size": sum(plan.hosts[i].host.slots for i in instance.hosts),
                "hosts_are": "nodes" if plan.options.vllm_nodes and len(instance.hosts) > 1 else "dp ranks",  # --vllm-nodes
                "rpc_port": plan.hosts[instance.leader].rpc_port,
            }
            for instance in plan.instances
        ],
        "hosts": [
            {
                "name": hp.host.name,
                "origin": hp.host.origin,
                "slots": hp.host.slots,
                "role": hp.host.role,
                "instance": instance_of[hp.index].name if hp.index in instance_of else None,
                "bind_address": netif.describe(hp.bind_request()),
                "readiness": plan.readiness_of(hp.index).describe(),
                "processes": [
                    {
                        "rank": r.rank,
                        "ranks": list(range(r.rank, r.rank + len(r.ports))),
                        "local_rank": r.local_rank,
                        "ports": list(r.ports),
                        "engine_id": r.engine_id,
                        "cuda_visible_devices": _planned_gpus(plan, hp.host, r),
                        "argv": [hp.host.python or python if a == "{python}" else a for a in user_command(r.argv)],
                        "env": {name: envpolicy.masked(name, value) for name, value in sorted(r.env.items())},
                        "copied": dict(sorted(r.env_report.copied.items())),
                        "dropped": dict(sorted(r.env_report.dropped.items())),
                        "set": dict(sorted(r.env_report.set.items())),
                    }
                    for r in hp.ranks
                ],
            }
            for hp in plan.hosts
        ],
    }


def _planned_gpus(plan: LaunchPlan, host, spec) -> str | None:
    """--gpus-per-rank: the slice when the hostfile lists the host's devices; None when the host finds them (or no GPUs)."""
    per_rank = plan.options.gpus_per_rank
    if not per_rank:
        return None
    return gpus.planned_slice(host.gpus, local_rank=spec.local_rank, served=len(spec.ports), per_rank=per_rank, slots=host.slots)


def result_document(result: LaunchResult) -> dict[str, Any]:
    """How the launch went: the verdict, every rank, the matrices."""
    failure = result.failure
    return {
        "schema": RESULT_SCHEMA,
        "job_id": result.job_id,
        "ok": result.ok,
        "exit_code": result.exit_code,
        "duration": round(result.duration, 3),
        "failure": None if failure is None else _failure(failure),
        "ranks": [
            {
                "rank": r.rank,
                "host": r.host,
                "address": r.address,
                "port": r.port,
                "pid": r.pid,
                "state": str(r.state),
                "exit_code": r.exit_code,
                "error": r.error,
                "started_at": _seconds(r.started_at),
                "ready_at": _seconds(r.ready_at),
                "ended_at": _seconds(r.ended_at),
                "address_rule": r.rule,
                "last_output": r.last_output,
            }
            for r in result.ranks
        ],
        "restarts": [
            {
                "unit": r.unit,
                "attempt": r.attempt,
                "cause": r.cause,
                "at": round(r.at, 3),
                "backoff": r.backoff,
                "ready_after": None if r.ready_after is None else round(r.ready_after, 3),
            }
            for r in result.restarts
        ],
        "check": matrix_document(result.check),
        "transfer": matrix_document(result.transfer),
    }


def _failure(failure: Failure) -> dict[str, Any]:
    return {
        "kind": str(failure.kind),
        "message": failure.message,
        "exit_code": failure.exit_code,
        "rank": failure.rank,
        "host": failure.host,
    }


def _seconds(t: float | None) -> float | None:
    return None if t is None else round(t, 3)


def matrix_document(matrix: CheckMatrix | None) -> dict[str, Any] | None:
    """Every expected pair with its outcome; a pair nobody answered for is listed with ok false."""
    if matrix is None:
        return None
    transfer = bool(matrix.transfer_bytes)
    pairs = []
    for a, b in matrix.expected():
        r = matrix.results.get((a, b))
        pair: dict[str, Any] = {"from": a, "to": b, "ok": bool(r and r.ok)}
        if r is None:
            pair["error"] = "no result"
        elif not r.ok:
            pair["error"] = r.error
        elif transfer:
            pair.update(latency_ms=r.latency_ms, mbps=r.mbps, used=r.used)
        else:
            pair["latency_ms"] = r.latency_ms
        pairs.append(pair)
    return {
        "what": matrix.what,
        "ok": matrix.ok,
        "transfer_bytes": matrix.transfer_bytes,
        "hosts": {str(rank): host for rank, host in matrix.hosts.items()},
        "wires": {str(rank): w for rank, w in matrix.wires.items()},
        "sampled": matrix.pairs is not None,
        "pairs": pairs,
        "problems": list(matrix.problems),
    }


def status_document(result: LaunchResult, *, state: str, health: str | None, time_to_ready: float | None) -> dict[str, Any]:
    """A running job as ``launcher status --json`` shows it: the result document of the job so far (``duration``
    is its uptime), with its ``state``, ``health`` (null while healthy, else why not) and ``time_to_ready``."""
    document = result_document(result)
    document.update(
        schema=STATUS_SCHEMA,
        state=state,
        uptime=document.pop("duration"),
        health=health,
        time_to_ready=None if time_to_ready is None else round(time_to_ready, 3),
    )
    return document
