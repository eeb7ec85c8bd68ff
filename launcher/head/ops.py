"""The head's operations endpoint (``--metrics-port``): ``/health`` for a load balancer, ``/metrics`` for
Prometheus, ``/targets`` so that Prometheus finds every vLLM API server of the job.

- ``/health``: 200 only while every rank is ready, no failure group is
  restarting and the job is not ending; else 503 with a JSON reason.
- ``/metrics``: Prometheus' text format, written by ``prometheus_client``
  from the job's state at scrape time: ranks by state, restarts by failure
  group and cause, time to ready, the last check's handshake latency and
  transfer bandwidth, the P/D proxy's requests and errors by instance.
- ``/targets``: a Prometheus HTTP service-discovery document listing each
  process that runs a vLLM API server (``vllm serve`` without
  ``--headless``) at its host's address and ``--port``, labelled with the
  job, host, rank and role: an existing Prometheus scrapes vLLM's own
  ``/metrics`` there; and vllm-router's own endpoint (``--router
  vllm-router``), labelled ``role=router``.

It reads the job from the handler threads while the supervisor's pump
changes it: each answer is built from copies, and a torn read costs at
most one stale number. Bounded like the P/D proxy (``httpserve``); GET only.
"""

from __future__ import annotations

import http.server
import json
import statistics
import time

from ..command import user_command
from ..netif import url_host
from ..results import Phase
from ..version import __version__
from ..vllm import dp as vllm_dp
from ..vllm.flags import HEADLESS, given, is_vllm_serve
from .httpserve import BoundedServer
from .job import Job

IDLE = 30.0  # seconds a scraper may take to send its request
CONNECTIONS = 64


class OpsError(Exception):
    """The endpoint cannot listen; the message names the address and the fix."""


class OpsEndpoint:
    def __init__(self, job: Job, address: str, port: int, proxy=None):
        self.job, self.proxy, self.started = job, proxy, time.monotonic()
        self.router_metrics: str | None = None  # "host:port" of a --router's own Prometheus endpoint, once it serves
        handler = type("Handler", (_Handler,), {"ops": self, "timeout": IDLE})
        try:
            self.server = BoundedServer((address, port), handler, backlog=256, connections=CONNECTIONS, who="the metrics endpoint")
        except OSError as exc:
            raise OpsError(f"--metrics-port {port}: cannot listen on {address}:{port} ({exc.strerror or exc}); give a free port") from None
        self.address = f"{url_host(address)}:{self.server.server_address[1]}"
        self._serving = None
        from prometheus_client import CollectorRegistry  # here: ~35 ms that a job without --metrics-port never pays

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_JobCollector(self))

    def start(self) -> None:
        self._serving = self.server.serve_in_background("ops-endpoint")

    def close(self) -> None:
        if self._serving is not None:
            self.server.shutdown()
        self.server.server_close()

    # --- what each path answers -----------------------------------------------------------------

    def health(self) -> tuple[int, dict]:
        job = self.job
        ready = sum(r.phase is Phase.READY for r in list(job.ranks.values()))
        reason = job.health()
        if reason is None:
            return 200, {"status": "ok", "job_id": job.plan.job_id, "ranks_ready": ready}
        return 503, {"status": "unavailable", "reason": reason, "job_id": job.plan.job_id, "ranks_ready": ready}

    def targets(self) -> list[dict]:
        """Prometheus HTTP SD: every vLLM API server of the job, by the address its host chose."""
        found = []
        for hp in self.job.plan.hosts:
            for spec in hp.ranks:
                argv = user_command(spec.argv)
                state = self.job.ranks[spec.rank]
                if not is_vllm_serve(argv) or given(argv, HEADLESS) or not state.address:
                    continue
                labels = {"job_id": self.job.plan.job_id, "host": spec.host, "rank": str(spec.rank)}
                if hp.host.role:
                    labels["role"] = hp.host.role
                if hp.host.group:
                    labels["instance"] = hp.host.group
                found.append({"targets": [f"{url_host(state.address)}:{vllm_dp.api_port(argv)}"], "labels": labels})
        if self.router_metrics is not None:
            found.append({"targets": [self.router_metrics], "labels": {"job_id": self.job.plan.job_id, "role": "router"}})
        return found

    def metrics(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _JobCollector:
    """Reads the job at scrape time (prometheus_client's custom-collector interface)."""

    def __init__(self, ops: OpsEndpoint):
        self.ops = ops

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        job, proxy = self.ops.job, self.ops.proxy
        info = GaugeMetricFamily("launcher_job_info", "The job this head runs", labels=["job_id", "version"])
        info.add_metric([job.plan.job_id, __version__], 1)
        yield info
        yield GaugeMetricFamily("launcher_uptime_seconds", "Seconds since the launch began", value=time.monotonic() - self.ops.started)
        ranks = GaugeMetricFamily("launcher_ranks", "Ranks (processes) of the job by state", labels=["state"])
        phases = [r.phase for r in list(job.ranks.values())]
        for phase in Phase:
            ranks.add_metric([phase.value], phases.count(phase))
        yield ranks
        healthy = GaugeMetricFamily("launcher_healthy", "1 while /health answers 200")
        healthy.add_metric([], 1 if self.ops.health()[0] == 200 else 0)
        yield healthy
        if job.first_ready_at is not None:
            yield GaugeMetricFamily(
                "launcher_time_to_ready_seconds", "From the launch to every rank ready, first start", value=job.first_ready_at
            )
        restarts = CounterMetricFamily("launcher_restarts", "Restarts of a failure group by cause", labels=["unit", "cause"])
        recovered = GaugeMetricFamily(
            "launcher_restart_ready_seconds", "From a failure to its group ready again, last restart", labels=["unit"]
        )
        counts: dict[tuple[str, str], int] = {}
        last: dict[str, float] = {}
        for record in list(job.restarts):
            counts[(record.unit, _cause_kind(record.cause))] = counts.get((record.unit, _cause_kind(record.cause)), 0) + 1
            if record.ready_after is not None:
                last[record.unit] = record.ready_after
        for (unit, cause), n in sorted(counts.items()):
            restarts.add_metric([unit, cause], n)
        for unit, seconds in sorted(last.items()):
            recovered.add_metric([unit], seconds)
        yield restarts
        yield recovered
        yield from _check_metrics(job)
        if proxy is not None:
            requests = CounterMetricFamily(
                "launcher_proxy_requests", "P/D proxy requests by instance", labels=["role", "instance", "result"]
            )
            for (role, upstream, ok), n in sorted(dict(proxy.requests).items()):
                requests.add_metric([role, upstream, "ok" if ok else "error"], n)
            yield requests


def _check_metrics(job: Job):
    from prometheus_client.core import GaugeMetricFamily

    for matrix, name, what, unit in (
        (job.matrix, "launcher_check_handshake_latency_seconds", "latency_ms", 0.001),
        (job.transfers, "launcher_check_transfer_bandwidth_bytes_per_second", "mbps", 1e6),
    ):
        if matrix is None:
            continue
        results = list(matrix.results.values())
        values = [getattr(r, what) * unit for r in results if r.ok and getattr(r, what, 0)]
        pairs = GaugeMetricFamily(name.rsplit("_", 2)[0] + "_pairs", "Pairs of the last check by result", labels=["result"])
        pairs.add_metric(["ok"], sum(r.ok for r in results))
        pairs.add_metric(["failed"], sum(not r.ok for r in results))
        yield pairs
        if values:
            family = GaugeMetricFamily(name, "The last check, over its pairs", labels=["stat"])
            for stat, value in (("min", min(values)), ("median", statistics.median(values)), ("max", max(values))):
                family.add_metric([stat], value)
            yield family


def _cause_kind(cause: str) -> str:
    """A restart's cause as a label of few values (the cause itself is free text: one series each)."""
    if "--restart-peers" in cause:
        return "peer replaced"
    if "killed by signal" in cause:
        return "signal"
    if "exited with code" in cause:
        return "exit"
    return "error"


class _Handler(http.server.BaseHTTPRequestHandler):
    ops: OpsEndpoint
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # scrapes are not the job's output
        pass

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        if path == "/health":
            status, document = self.ops.health()
            self._send(status, "application/json", json.dumps(document).encode())
        elif path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            self._send(200, CONTENT_TYPE_LATEST, self.ops.metrics())
        elif path == "/targets":
            self._send(200, "application/json", json.dumps(self.ops.targets()).encode())
        else:
            self._send(404, "application/json", json.dumps({"error": "no such path; GET /health, /metrics or /targets"}).encode())

    def _send(self, status: int, kind: str, data: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True
