"""The head's /health, /metrics and /targets (``--metrics-port``): what a load balancer and Prometheus read.

/metrics is parsed with prometheus_client's own text parser; the real-vLLM
targets are scraped in tests/test_real_vllm.py.
"""

import http.client
import json
import os
import signal
import socket

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import RunningLauncher, free_port_base, run_launcher, wait_for, write_hostfile
from launcher import plan as planning
from launcher import protocol
from launcher.head.job import Job, LinkOpened
from launcher.head.ops import OpsEndpoint
from launcher.plan import Host, LaunchOptions
from launcher.readiness import Url
from launcher.restart import RestartPolicy
from launcher.version import __version__


def get(port, path, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("GET", path)
    reply = conn.getresponse()
    return reply.status, reply.getheader("Content-Type"), reply.read()


def samples(text):
    """{(name, frozenset(labels)): value} of a Prometheus text document, by prometheus_client's parser."""
    return {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def endpoint():
    """An endpoint over a job of two vllm serve processes on two hosts, driven by hand."""
    hosts = [Host("a", slots=1), Host("b", slots=1)]
    options = LaunchOptions(
        command=("vllm", "serve", "m", "--port", "8123"),
        readiness=Url(url="http://{host_ip}:8123/health"),
        restart=RestartPolicy(mode="on-failure"),
    )
    job = Job(planning.build(hosts, options, {}, "feedbeef00000000"))
    ops = OpsEndpoint(job, "127.0.0.1", 0)
    ops.start()
    yield job, int(ops.address.rpartition(":")[2])
    ops.close()


def ready(job, index, now=1.0):
    job.apply(index, LinkOpened(), 0.0)
    job.apply(index, protocol.Hello(hostname="x", pid=1, python="p", version=__version__, address=f"198.18.0.{11 + index}"), 0.0)
    job.apply(index, protocol.Started(rank=index, pid=10 + index), 0.1)
    job.apply(index, protocol.Ready(rank=index, address=f"198.18.0.{11 + index}", port=5600, pid=10 + index, rule="r", engine_id="e"), now)


def test_health_is_200_only_while_every_rank_is_ready_and_no_group_restarts(endpoint):
    job, port = endpoint
    status, _, body = get(port, "/health")
    assert status == 503 and json.loads(body)["reason"] == "ranks ready 0/2"
    ready(job, 0)
    ready(job, 1, now=2.0)
    status, kind, body = get(port, "/health")
    assert (status, kind, json.loads(body)["status"]) == (200, "application/json", "ok")
    job.apply(1, protocol.Exited(rank=1, returncode=-9), 5.0)
    status, _, body = get(port, "/health")
    assert status == 503 and json.loads(body)["reason"] == "restarting: the job"
    job.begin_stopping()
    assert json.loads(get(port, "/health")[2])["reason"] == "the job is stopping"


def test_metrics_are_prometheus_text_with_ranks_restarts_and_time_to_ready(endpoint):
    job, port = endpoint
    ready(job, 0)
    ready(job, 1, now=2.5)
    job.apply(1, protocol.Exited(rank=1, returncode=-9), 5.0)
    status, kind, body = get(port, "/metrics")
    assert status == 200 and kind.startswith("text/plain; version=")
    found = samples(body.decode())
    assert found[("launcher_ranks", frozenset({("state", "restarting")}))] == 2
    assert found[("launcher_restarts_total", frozenset({("unit", "the job"), ("cause", "signal")}))] == 1
    assert found[("launcher_time_to_ready_seconds", frozenset())] == 2.5
    assert found[("launcher_healthy", frozenset())] == 0
    assert found[("launcher_job_info", frozenset({("job_id", "feedbeef00000000"), ("version", __version__)}))] == 1


def test_targets_list_every_api_server_by_its_hosts_own_address(endpoint):
    job, port = endpoint
    ready(job, 0)
    ready(job, 1)
    status, _, body = get(port, "/targets")
    assert status == 200
    assert json.loads(body) == [
        {"targets": ["198.18.0.11:8123"], "labels": {"job_id": "feedbeef00000000", "host": "a", "rank": "0"}},
        {"targets": ["198.18.0.12:8123"], "labels": {"job_id": "feedbeef00000000", "host": "b", "rank": "1"}},
    ]


def test_slow_oversized_and_garbage_requests_cost_bounded_memory_and_the_endpoint_serves_on(endpoint):
    job, port = endpoint
    me = psutil.Process()
    before = me.memory_info().rss
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(80)]  # more than it serves at once
    refused = idle[-1].recv(4096)
    assert refused.startswith(b"HTTP/1.1 503 ")
    for sock in idle:
        sock.close()
    for size in (70000, 1 << 20):  # a request line, then a header, over what the server reads
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            try:
                sock.sendall(b"GET /" + b"a" * size + b" HTTP/1.1\r\n\r\n")
                assert sock.recv(4096).split(b" ")[1] in (b"414", b"400", b"431")
            except (ConnectionResetError, BrokenPipeError):
                pass  # refused before it read it all: also bounded
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\x00\xff garbage \r\n\r\n")
        assert b"400" in sock.recv(4096)  # a bad request, answered and closed
    assert wait_for(lambda: get(port, "/health")[0] == 503, 10)  # answers again (503: no rank is ready)
    assert me.memory_info().rss - before < 50 << 20


@pytest.mark.e2e
def test_a_running_job_serves_its_metrics_through_a_restart(tmp_path, no_leaks):
    port = free_port_base(1)
    hf = write_hostfile(tmp_path, "localhost slots=2\n")
    args = ["-H", hf, "--port-base", str(free_port_base(2)), "--metrics-port", str(port), "--restart", "on-failure"]
    run = RunningLauncher([*args, "--restart-backoff", "0.5,1"])
    try:
        assert wait_for(lambda: get_or_none(port, "/health") == 200, 30), run.stderr[-5:]
        pid = run.ready_rows(2)[1][4]
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: get_or_none(port, "/health") == 503, 10)
        assert wait_for(lambda: any("is ready again after restart 1" in line for line in run.stderr), 30)
        assert get_or_none(port, "/health") == 200
        found = samples(get(port, "/metrics")[2].decode())
        assert found[("launcher_restarts_total", frozenset({("unit", "the job"), ("cause", "signal")}))] == 1
        assert found[("launcher_restart_ready_seconds", frozenset({("unit", "the job")}))] > 0.5
    finally:
        run.proc.send_signal(signal.SIGINT)
        assert run.finish() == 130
    assert get_or_none(port, "/health") is None  # gone with the job


def get_or_none(port, path):
    try:
        return get(port, path, timeout=2)[0]
    except OSError:
        return None


def test_a_taken_metrics_port_is_a_one_line_error(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        hf = write_hostfile(tmp_path, "localhost\n")
        done = run_launcher("run", "-H", hf, "--metrics-port", str(port), timeout=30)
    assert done.returncode == 2 and f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}" in done.stderr.splitlines()[0]
