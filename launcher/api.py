"""The Python API: plan a job, launch it, get a result. The CLI is a thin layer on this."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from . import plan as planmod
from . import transports
from .check import CheckOptions
from .head.reporter import Reporter
from .head.supervisor import Supervisor
from .netif import url_host
from .plan import Host, LaunchOptions, LaunchPlan
from .results import FailureKind, LaunchResult
from .vllm import disagg
from .vllm import dp as vllm_dp


def plan_job(
    hosts: Sequence[Host],
    options: LaunchOptions = LaunchOptions(),
    env: Mapping[str, str] | None = None,
    job_id: str | None = None,
) -> LaunchPlan:
    """A plan for ``hosts`` from ``env`` (default: this process's environment)."""
    job_id = job_id or os.urandom(8).hex()  # 64 bits, the sweep kills by it (secrets.token_hex, minus its imports)
    return planmod.build(hosts, options, os.environ if env is None else env, job_id)


def _serve(supervisor: Supervisor, plan: LaunchPlan, proxy: tuple[str, int], ops=None, router=None, log_dir=None) -> None:
    """Serve; a P/D job behind its proxy (or ``router``, an argv template), which lives exactly as long."""
    if not any(plan.roles):
        return supervisor.serve()
    api = vllm_dp.api_port(plan.options.command)
    upstreams: dict[str, list[str]] = {role: [] for role in disagg.ROLES}
    upstreams_of: dict[int, list[str]] = {}  # host index -> its instance's API servers (a headless host has none)
    address = {state.spec.host_index: state.address for state in supervisor.ranks.values()}
    for instance in plan.instances:
        found = [f"{url_host(address[i])}:{api}" for i in plan.api_hosts(instance)]
        upstreams[instance.role] += found
        upstreams_of.update(dict.fromkeys(instance.hosts, found))
    if router is not None:
        return _serve_behind_router(supervisor, plan, upstreams, proxy, router, log_dir, ops)
    from .head.pd_proxy import PdProxy, ProxyError

    try:
        server = PdProxy(upstreams["prefill"], upstreams["decode"], *proxy, note=supervisor.reporter.progress)
    except ProxyError as exc:
        supervisor.job.fail(FailureKind.PROXY, str(exc))
        return
    supervisor.on_hosts_down = lambda hosts, why: server.set_down([u for h in hosts for u in upstreams_of[h]], why)
    supervisor.on_hosts_up = lambda hosts: server.set_up([u for h in hosts for u in upstreams_of[h]])
    if ops is not None:
        ops.proxy = server  # its requests by instance go into /metrics
    server.start()
    supervisor.reporter.progress(
        f"P/D proxy on http://{server.address}: prefill on {', '.join(upstreams['prefill'])}, decode on {', '.join(upstreams['decode'])}"
    )
    try:
        supervisor.serve()
    finally:
        server.close()


def _serve_behind_router(supervisor: Supervisor, plan: LaunchPlan, upstreams, proxy, template, log_dir, ops) -> None:
    """The router is started with every instance's URL and is a part of the job: its exit restarts it (--restart
    on-failure, after a backoff, the instances untouched) or fails the job."""
    from .head.router_process import RouterProcess, free_port
    from .vllm import router as routers

    urls = {role: [f"http://{u}" for u in found] for role, found in upstreams.items()}
    metrics_port = free_port(proxy[0]) if tuple(template) == (routers.VLLM_ROUTER,) else 0
    argv = routers.router_argv(template, urls["prefill"], urls["decode"], *proxy, metrics_port=metrics_port)
    log_path = os.path.join(log_dir, "router.log") if log_dir else None
    timeout = plan.options.ready_timeout
    current: list[RouterProcess] = []

    def start() -> RouterProcess:  # on the head's main thread: the router's PR_SET_PDEATHSIG follows it
        current[:] = [RouterProcess(argv, *proxy, log_path=log_path)]
        current[0].start()
        return current[0]

    def now_serving(process: RouterProcess) -> None:
        supervisor.reporter.progress(
            f"router {argv[0]} on http://{url_host(proxy[0])}:{proxy[1]} (pid {process.pid}): "
            f"prefill on {', '.join(upstreams['prefill'])}, decode on {', '.join(upstreams['decode'])}"
            + (f"; its metrics on http://{url_host(proxy[0])}:{metrics_port}/metrics" if metrics_port else "")
        )
        process.watch(lambda message, code: ended(process, message, code))

    def ended(process: RouterProcess, message: str, code: int | None) -> None:
        process.close(plan.options.grace)  # what it left in its process group goes with it
        supervisor.router_exited_later(message, code)

    def restart(attempt: int) -> None:
        supervisor.reporter.progress(f"starting the router again (restart {attempt})")
        threading.Thread(target=await_serving, args=(start(),), name="router-start", daemon=True).start()

    def await_serving(process: RouterProcess) -> None:
        deadline = time.monotonic() + timeout
        while (state := process.serving()) is False and time.monotonic() < deadline:
            time.sleep(0.2)
        if state is True:
            now_serving(process)
            supervisor.router_ready_later()
        else:
            ended(process, process.not_serving(timeout) if state is False else state, process.poll())

    supervisor.reporter.progress(f"starting the router: {' '.join(argv)}")
    process = start()
    try:
        # The job's events are pumped meanwhile: a rank that fails while the router starts ends the job now.
        state: dict[str, bool | str] = {"serving": False}

        def answered() -> bool:
            state["serving"] = process.serving()
            return state["serving"] is not False

        supervisor.pump_until(answered, timeout)
        if supervisor.stop_requested.is_set() or supervisor.job.over:
            return  # stopped (a Ctrl-C, a rank's failure) before the router served
        if state["serving"] is not True:
            code = process.poll()
            failure = str(state["serving"]) if code is not None else process.not_serving(timeout)
            supervisor.job.fail(FailureKind.ROUTER if code is not None else FailureKind.NOT_READY, failure, rank_code=code)
            return
        if ops is not None and metrics_port:
            ops.router_metrics = f"{url_host(proxy[0])}:{metrics_port}"  # /targets leads Prometheus to it
        supervisor.start_router = restart
        now_serving(process)
        supervisor.serve()
    finally:
        current[0].close(plan.options.grace)


def launch(
    plan: LaunchPlan,
    transport: transports.Transport | None = None,
    *,
    check: CheckOptions | None = None,
    serve: bool = False,
    stop: threading.Event | None = None,
    reporter: Reporter | None = None,
    preflight: bool = False,
    hurry: threading.Event | None = None,
    proxy: tuple[str, int] = ("127.0.0.1", 8000),
    metrics: tuple[str, int] | None = None,
    on_supervisor: Callable[[Supervisor], None] | None = None,
    router: Sequence[str] | None = None,
    log_dir: str | None = None,
) -> LaunchResult:
    """Start every rank, wait until all are ready, then check and/or serve, then stop.

    ``check``: run the all-pairs handshake once ready, then, when the plan's
    built-in cores serve NIXL buffers (``options.transfer_bytes``), the
    transfer check: every rank READs every peer's buffer. ``serve``: keep running
    until ``stop`` is set or a rank fails. With ``options.to_completion`` the
    command is finite: wait for every rank to exit (readiness is not awaited);
    the first non-zero exit stops the rest. With neither, stop as soon as every
    rank is ready. Setting ``stop`` ends any phase; setting ``hurry`` while
    stopping SIGKILLs the ranks without waiting out the grace period. Every process is stopped
    before this returns, also when it raises. ``preflight``: first run the
    built-in engine core on the same hosts and ports with the all-pairs check
    (``plan.preflight_plan``); if that fails, its result is returned and the
    command never starts. A P/D plan (hosts with roles) serves behind a proxy
    on ``proxy`` (address, port) that routes each request prefill, then decode; with ``router`` (an argv
    template, ``vllm.router.parse``) that router runs there instead, a part of the job, its output in
    ``log_dir``/router.log.
    ``metrics`` (address, port): serve /health, /metrics and /targets there
    while the job runs (``head.ops``). ``on_supervisor`` is handed the job's
    supervisor once its agents are starting (the control socket of a detached
    head reads it). Both serve from threads started only then: before, the
    head must stay single-threaded for the local transport to fork its agents.
    """
    transport = transport or transports.get(transports.choose([h.host for h in plan.hosts], os.environ))
    if preflight:
        if reporter is not None:
            reporter.progress("preflight: built-in engine cores on the same hosts, addresses and ports")
        result = launch(planmod.preflight_plan(plan), transport, check=CheckOptions(), stop=stop, reporter=reporter, hurry=hurry)
        if not result.ok or (stop is not None and stop.is_set()):
            return result
        if reporter is not None:
            reporter.progress("preflight passed")
    supervisor = Supervisor(plan, transport, reporter, stop, hurry)
    ops = None
    if metrics is not None:
        from .head.ops import OpsEndpoint, OpsError

        try:
            ops = OpsEndpoint(supervisor.job, *metrics)  # bound now: a taken port fails before anything starts
        except OpsError as exc:
            supervisor.job.fail(FailureKind.PROXY, str(exc))
            return supervisor.result()
    try:
        supervisor.start()
        if ops is not None:
            ops.start()
            supervisor.reporter.progress(f"health, metrics and targets on http://{ops.address}/health /metrics /targets")
        if on_supervisor is not None:
            on_supervisor(supervisor)
        if plan.options.to_completion:
            supervisor.wait_exited()
        elif supervisor.wait_ready():
            if check is not None:
                supervisor.check(check)
                if plan.options.transfer_bytes and plan.builtin and supervisor.failure is None:
                    supervisor.transfer_check(check)
            if serve and supervisor.failure is None:
                _serve(supervisor, plan, proxy, ops, router, log_dir)
    except BaseException:
        supervisor.stop("interrupted")
        if ops is not None:
            ops.close()
        raise
    if supervisor.failure is not None:
        reason = supervisor.failure.message
    elif supervisor.stop_requested.is_set():
        reason = "stop requested"
    elif plan.options.to_completion:
        reason = "every rank exited 0"
    else:
        reason = "check complete" if check is not None else "every rank was ready"
    result = supervisor.stop(reason)
    if ops is not None:
        ops.close()
    return result
