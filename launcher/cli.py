"""``launcher`` command line: argument parsing only; the work is in launcher.api."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import sys
import threading

from . import argtypes, hostfile, operate, readiness, restart, transports
from .api import launch, plan_job
from .check import WIRE_CHOICES, CheckOptions
from .command import PLACEHOLDERS
from .output import console as report
from .output import documents
from .plan import LaunchOptions, PlanError
from .results import EXIT_STDOUT_CLOSED, EXIT_USAGE, LaunchResult
from .version import __version__
from .vllm import disagg, wire
from .vllm import dp as vllm_dp

DEFAULT_HOSTFILE = "hostfile"


def _env_pair(text: str) -> tuple[str, str]:
    """NAME=VALUE, or NAME alone for this environment's value (keeps a secret out of argv)."""
    name, sep, value = text.partition("=")
    if not name or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        shown = f"{name!r}=…" if sep else repr(name)  # never the value: a secret's name may be the mistake
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE or NAME with NAME made of letters, digits and '_', got {shown}")
    if not sep:
        if name not in os.environ:
            raise argparse.ArgumentTypeError(f"{name} is not set in this environment; export it or give {name}=VALUE")
        value = os.environ[name]
    return name, value


class _Parser(argparse.ArgumentParser):
    """argparse, with the error on the first line (the usage is one --help away)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="launcher",
        description="Start vLLM engine-core ranks across hosts without Ray: each rank binds its own host's address.",
    )
    parser.add_argument("--version", action="version", version=f"launcher {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    hosts_common = _Parser(add_help=False)
    hosts_common.add_argument("--hostfile", "-H", help="hostfile to read (default: the Slurm allocation inside one, else ./hostfile)")
    hosts_common.add_argument(
        "--slots", type=argtypes.positive, help="ranks per node for hosts from a Slurm allocation (default: SLURM_TASKS_PER_NODE)"
    )

    plan_common = _Parser(add_help=False, parents=[hosts_common])
    g = plan_common.add_argument_group("job")
    g.add_argument(
        "--port-base",
        type=argtypes.port,
        help="side-channel port base; rank R binds base+R (default: $VLLM_NIXL_SIDE_CHANNEL_PORT or 5600)",
    )
    g.add_argument(
        "--env",
        "-e",
        type=_env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a variable in every rank; NAME alone copies this environment's value, keeping secrets out of ps (repeatable)",
    )
    g.add_argument(
        "--ifname",
        metavar="SPEC",
        help="bind-address interface for hosts whose line sets none: eth, =eth0, ^docker,lo (NCCL_SOCKET_IFNAME syntax)",
    )
    g.add_argument(
        "--cidr", type=argtypes.network, metavar="NET", help="bind-address network for hosts whose line sets none, e.g. 10.1.0.0/16"
    )
    g.add_argument(
        "--env-include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also copy head variables matching NAME, PREFIX_ or a glob (repeatable)",
    )
    g.add_argument(
        "--gpus-per-rank",
        type=argtypes.positive,
        metavar="N",
        help="give each rank its own CUDA_VISIBLE_DEVICES: N of its host's GPUs, in order (from gpus= in the hostfile, "
        "else the host's CUDA_VISIBLE_DEVICES, Slurm's list, or nvidia-smi -L); more than a host has is an error before launch",
    )
    g.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document on stdout (plan: schema launcher.plan/1; check, run: launcher.result/1 at the end); "
        "everything for people goes to stderr",
    )
    c = plan_common.add_argument_group(
        "user command (after --; without one, the built-in engine core runs)",
        "placeholders: " + ", ".join(f"{{{name}}} {what}" for name, what in PLACEHOLDERS.items()),
    )
    c.add_argument(
        "--per-host",
        action="store_true",
        help="one process per host serving all its slots as DP ranks (vllm serve --data-parallel-size-local)",
    )
    c.add_argument(
        "--head-command",
        metavar="'CMD ...'",
        help="the first host's command when it differs (e.g. without --headless); one shell-quoted string",
    )
    c.add_argument(
        "--vllm-dp",
        nargs="?",
        const="internal",
        choices=vllm_dp.MODES,
        metavar="MODE",
        help="for -- vllm serve MODEL ...: write the data-parallel flags per host as vLLM wants them, one process per host: "
        "internal (default: one API server, on the first host; the others headless), hybrid (an API server per host) "
        "or external (a process and an API server per rank, on --port + its local index; vLLM: MoE models only)",
    )
    c.add_argument(
        "--vllm-nodes",
        action="store_true",
        help="for -- vllm serve MODEL ... whose tensor/pipeline parallel workers span the hosts (one node per host, "
        "slots=1 each): write --nnodes, --node-rank, --master-addr and --master-port ({rpc_port}) per host, and "
        "--headless on every host but the first, for vLLM's multiprocessing executor (no Ray)",
    )
    c.add_argument(
        "--prefill",
        metavar="HOSTS",
        help="prefill/decode in one job: these hosts (names of the hostfile, a hostlist such as gpu[1-2]) run prefill "
        "instances of -- vllm serve MODEL ..., one a host; hosts joined by + are one instance (h1+h2: DP over both); "
        "with --decode; or role= and group= in the hostfile",
    )
    c.add_argument("--decode", metavar="HOSTS", help="... and these run decode instances; run serves both behind a proxy")
    c.add_argument("--proxy-port", type=argtypes.port, default=8000, help="where the P/D proxy listens on this machine (default 8000)")
    c.add_argument("--proxy-address", default="127.0.0.1", help="the P/D proxy's address (default 127.0.0.1; 0.0.0.0 for every interface)")
    c.add_argument(
        "--router",
        metavar="ROUTER",
        help="P/D: front the instances with a real router instead of launcher's proxy, on --proxy-address:--proxy-port: "
        "vllm-router (vllm-project's, from this environment's PATH), or a command whose words take {prefill_url} "
        "{decode_url} (the word and its option, once per URL), {prefill_urls} {decode_urls} {address} {port}; it is part "
        "of the job: its exit ends the job, or with --restart on-failure starts it again alone",
    )
    c.add_argument("--rpc-port", type=argtypes.port, default=13345, help="value of {rpc_port} (default 13345)")
    c.add_argument("command_argv", nargs="*", metavar="-- CMD", help="the command each process runs, with placeholders")

    run_common = _Parser(add_help=False, parents=[plan_common])
    r = run_common.add_argument_group("launch")
    r.add_argument("--ready-timeout", type=argtypes.seconds, default=60.0, help="seconds for every rank to become ready (default 60)")
    r.add_argument("--grace", type=argtypes.seconds, default=5.0, help="seconds between SIGTERM and SIGKILL at teardown (default 5)")
    r.add_argument(
        "--heartbeat-timeout", type=argtypes.seconds, default=15.0, help="seconds of silence before a host is declared lost (default 15)"
    )
    r.add_argument("--quiet", "-q", action="store_true", help="do not stream rank output")
    r.add_argument("--log-dir", metavar="DIR", help="also write each rank's output to DIR/rank-N.log")
    ready = r.add_mutually_exclusive_group()
    ready.add_argument("--ready-port", type=argtypes.port, help="a command is ready when this port accepts TCP on its host's address")
    ready.add_argument(
        "--ready-url",
        metavar="URL",
        help="... when GET URL answers 2xx ({host_ip} {port} {rank} filled in), e.g. http://{host_ip}:8000/health",
    )
    ready.add_argument("--ready-log", metavar="REGEX", help="... when a line of its output matches REGEX")
    transports.add_arguments(run_common)  # --transport and each backend's own options

    sub.add_parser("hosts", parents=[hosts_common], help="print the parsed hostfile").set_defaults(handler=_hosts_command)
    sub.add_parser(
        "plan", parents=[plan_common], help="dry run: per rank, host, port, command and environment (secrets masked)"
    ).set_defaults(handler=_plan_command)
    probing = _Parser(add_help=False)
    p = probing.add_argument_group("all-pairs check")
    p.add_argument(
        "--wire",
        choices=WIRE_CHOICES,
        default="auto",
        help=(
            "what each probe speaks: auto (default) = per peer, the handshake generation of the vLLM its command runs "
            "(the built-in core's for it), else a TCP connect; or force one: "
            + "; ".join(g.describe() for g in wire.GENERATIONS)
            + "; or tcp (connect only). A handshake of the wrong generation kills a real vLLM listener"
        ),
    )
    p.add_argument("--handshake-timeout", type=argtypes.seconds, default=5.0, help="seconds per handshake (default 5, as vLLM)")
    p.add_argument(
        "--sample",
        type=argtypes.positive,
        metavar="N",
        help="for very large jobs: check every pair of hosts (through their first ranks) and N more rank pairs at random, not all",
    )
    p.add_argument(
        "--transfer",
        action="store_true",
        help="then move bytes: each built-in engine core becomes a NIXL agent (UCX over its chosen address) and READs "
        "every peer's buffer, verifying every byte (needs NIXL on every host; with a command: run --preflight --transfer)",
    )
    p.add_argument(
        "--transfer-bytes",
        type=argtypes.size,
        default=1 << 20,
        metavar="SIZE",
        help="bytes per NIXL read with --transfer: 4096, 64K, 1M (default), up to 1G",
    )
    p.add_argument(
        "--transfer-memory",
        choices=("auto", "host", "gpu"),
        default="auto",
        help="where --transfer's buffers live: host (DRAM), gpu (each rank's own CUDA device, as vLLM's KV cache; "
        "needs torch or cupy and a NIXL built with CUDA), auto (default: gpu where the rank has a CUDA device)",
    )
    p.add_argument("--plot", metavar="FILE.png", help="also draw the matrix (the transfer matrix with --transfer) as a heatmap PNG")
    check = sub.add_parser("check", parents=[run_common, probing], help="launch, probe every rank pair, print the matrix, stop")
    check.set_defaults(handler=_launch_command, check=True, to_completion=False, preflight=False)
    run = sub.add_parser(
        "run", parents=[run_common, probing], help="launch and serve until Ctrl-C or SIGTERM; any rank failing ends the job"
    )
    run.add_argument(
        "--check",
        action="store_true",
        help="once every rank is ready, run the all-pairs check on the running job (vLLM's own side channels) and serve only if it passes",
    )
    run.add_argument(
        "--to-completion",
        action="store_true",
        help="the command ends on its own (a test, a benchmark): wait for every rank; "
        "exit 0 when all exit 0, else the first failure's code",
    )
    run.add_argument(
        "--preflight",
        action="store_true",
        help="first prove hosts, versions, addresses and ports with the built-in core; start the command only if all pass",
    )
    again = run.add_argument_group(
        "restart (failure groups: every rank of a DP job together; each P/D instance alone)",
        "a group that has never been ready does not restart: its first start fails the job as without --restart",
    )
    again.add_argument(
        "--restart", choices=restart.MODES, default="never", help="on-failure: bring a failed group back (default never: the job ends)"
    )
    again.add_argument(
        "--max-restarts", type=argtypes.positive, default=5, metavar="N", help="give up after N restarts of a group within the window"
    )
    again.add_argument(
        "--restart-window", type=argtypes.duration, default=3600.0, metavar="DURATION", help="the sliding window: 90s, 15m, 1h (default)"
    )
    again.add_argument(
        "--restart-backoff",
        type=argtypes.backoff,
        default=(1.0, 60.0),
        metavar="MIN,MAX",
        help="seconds before a restart: MIN, doubling each time, up to MAX, with jitter (default 1,60)",
    )
    again.add_argument(
        "--restart-peers",
        action="store_true",
        help="P/D: once a replaced prefill is ready again, also restart the decode instances (they hold its old NIXL metadata)",
    )
    ops = run.add_argument_group("operations")
    ops.add_argument(
        "--metrics-port",
        type=argtypes.port,
        metavar="PORT",
        help="serve /health (200 only while every rank is ready), /metrics (Prometheus) and /targets (Prometheus HTTP "
        "service discovery of every vLLM API server of the job) on this port of the head",
    )
    ops.add_argument("--metrics-address", default="127.0.0.1", help="the address --metrics-port listens on (default 127.0.0.1)")
    ops.add_argument(
        "--detach",
        action="store_true",
        help="return once every rank is ready, printing the job id; the head lives on in its own session "
        "(launcher ps, status, logs, stop operate it)",
    )
    run.set_defaults(handler=_launch_command)
    operate.add_parsers(sub, _Parser)
    return parser


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def main(argv: list[str] | None = None, held: list[int] | None = None, ignored: frozenset[int] | None = None) -> int:
    """The command line. ``held``: stop signals that arrived while the entry point imported this module;
    ``ignored``: stop signals ignored when the process started (``nohup``), which stay ignored."""
    if ignored is None:
        ignored = frozenset(s for s in STOP_SIGNALS if signal.getsignal(s) == signal.SIG_IGN)
    args = build_parser().parse_args(argv)
    if held:
        print(f"launcher: stopped by {signal.Signals(held[0]).name} before anything started", file=sys.stderr)
        return 128 + held[0]
    try:
        return args.handler(args, ignored)
    except _INPUT_ERRORS as exc:
        print(f"launcher: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # stdout's reader went away (`launcher plan | head -1`): end quietly, as Unix tools do
        operate.silence_stdout()
        return EXIT_STDOUT_CLOSED


# A user's mistake in a hostfile, an allocation, the options or a log directory: one line, exit 2.
_INPUT_ERRORS = (hostfile.HostfileError, transports.AllocationError, PlanError, transports.TransportError, report.LogDirError)


# --- one handler per subcommand ------------------------------------------------------------------


def _hosts_command(args, _ignored: frozenset[int]) -> int:
    print(report.render_hosts(_hosts(args)))
    return 0


def _plan_command(args, _ignored: frozenset[int]) -> int:
    plan = plan_job(_hosts(args), launch_options(args))
    print(_json(documents.plan_document(plan, sys.executable)) if args.json else report.render_plan(plan, python=sys.executable))
    return 0


def _launch_command(args, ignored: frozenset[int]) -> int:
    """check and run: plan, launch, serve or check, and the verdict."""
    plan = plan_job(_hosts(args), launch_options(args))
    args.router_argv = _router(args, plan)
    if args.log_dir:
        report.prepare_log_dir(args.log_dir)
    _check_probing(args)
    transport = _transport(args, plan)
    if getattr(args, "detach", False):
        return _detach(args, plan, transport, ignored)
    return _launch(args, plan, transport, ignored)


def _detach(args, plan, transport, ignored: frozenset[int]) -> int:
    """Fork the head before anything starts (no thread exists yet); the parent waits for the job's first word."""
    import time

    from .head import jobdir

    if args.to_completion or args.json:
        raise PlanError("--detach serves a job until launcher stop: drop --to-completion and --json (launcher status --json reads it)")
    job = jobdir.JobDir(jobdir.state_root(), plan.job_id)
    record = jobdir.JobRecord(plan.job_id, os.getpid(), time.time(), list(sys.argv), len(plan.hosts), len(plan.ranks))
    try:
        job.create(record)
    except OSError as exc:
        raise PlanError(
            f"cannot create the job's directory {job.path}: {exc.strerror or exc}; set XDG_STATE_HOME to a writable one"
        ) from None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        return operate.await_detached(read_end, job, pid)
    os.close(read_end)
    operate.become_detached(job)
    job.write_record(record._replace(pid=os.getpid()))
    args.log_dir = args.log_dir or job.rank_logs
    code = _launch(args, plan, transport, ignored, detached=operate.Detached(write_end, job))
    os._exit(code)


def launch_options(args) -> LaunchOptions:
    """The job's options, from the parsed command line (plan takes no launch options: their defaults)."""
    launching = {}
    if args.command != "plan":
        launching = dict(
            ready_timeout=args.ready_timeout,
            grace=args.grace,
            heartbeat_timeout=args.heartbeat_timeout,
            readiness=_readiness(args),
            to_completion=args.to_completion,
            restart=_restart_policy(args),
        )
    return LaunchOptions(
        port_base=args.port_base,
        env=tuple(args.env),
        env_include=tuple(args.env_include),
        command=tuple(args.command_argv),
        head_command=_head_command(args.head_command),
        per_host=args.per_host,
        ifname=args.ifname,
        cidr=args.cidr,
        rpc_port=args.rpc_port,
        transfer_bytes=args.transfer_bytes if getattr(args, "transfer", False) else None,
        transfer_memory=getattr(args, "transfer_memory", "auto"),
        gpus_per_rank=args.gpus_per_rank,
        vllm_dp=args.vllm_dp,
        vllm_nodes=args.vllm_nodes,
        **launching,
    )


def _restart_policy(args) -> restart.RestartPolicy:
    if getattr(args, "restart", "never") == "never":
        return restart.RestartPolicy()
    low, high = args.restart_backoff
    return restart.RestartPolicy(
        mode=args.restart,
        max_restarts=args.max_restarts,
        window=args.restart_window,
        backoff_min=low,
        backoff_max=high,
        peers=args.restart_peers,
    )


def check_options(args) -> CheckOptions | None:
    """The all-pairs check's options: check always runs it, run with --check."""
    if not args.check:
        return None
    return CheckOptions(wire=args.wire, timeout=args.handshake_timeout, sample=args.sample)


def _hosts(args) -> list:
    hosts = _listed_hosts(args)
    if getattr(args, "prefill", None) or getattr(args, "decode", None):
        try:
            hosts = disagg.assign_roles(hosts, _instances(args.prefill), _instances(args.decode))
        except disagg.RoleError as exc:
            raise PlanError(str(exc)) from None
    return hosts


def _listed_hosts(args) -> list:
    if args.hostfile is None:
        found = transports.allocation_hosts(os.environ, args.slots)
        if found is not None:
            return found
    if args.slots is not None:
        raise PlanError("--slots applies to the nodes of a Slurm allocation; a hostfile gives slots=N on each line")
    return hostfile.read(args.hostfile or DEFAULT_HOSTFILE)


def _instances(text: str | None) -> list[list[str]]:
    """--prefill/--decode: instances separated by commas, each one host (or a Slurm hostlist, gpu[1-4]: one
    instance a host) or hosts joined by + (h1+h2, gpu[1-2]+gpu[3-4]: one instance over all of them)."""
    import hostlist

    found: list[list[str]] = []
    for item in _top_level_items(text or ""):
        try:
            parts = [hostlist.expand_hostlist(part) for part in item.split("+")]
        except hostlist.BadHostlist as exc:
            raise PlanError(f"{item!r} is not a host list like gpu1,gpu2, gpu[1-2] or h1+h2 ({exc})") from None
        if any(not part for part in parts):
            raise PlanError(f"{item!r} has an empty host name; join the hosts of one instance with + (h1+h2)")
        names = [name for part in parts for name in part]
        found += [names] if "+" in item else [[name] for name in names]
    return found


def _top_level_items(text: str) -> list[str]:
    """``text`` split at the commas outside a hostlist's brackets: "a[1,3]+b,c" -> ["a[1,3]+b", "c"]."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item]


def _router(args, plan) -> tuple[str, ...] | None:
    """--router: its argv template, checked before anything starts (a P/D job, a command this machine has)."""
    text = getattr(args, "router", None)
    if text is None:
        return None
    from .vllm import router as routers

    try:
        template = routers.parse(text)
    except routers.RouterError as exc:
        raise PlanError(str(exc)) from None
    if not any(plan.roles) or args.command != "run":
        raise PlanError("--router fronts a P/D job: launcher run --prefill HOSTS --decode HOSTS --router ... -- vllm serve MODEL")
    if shutil.which(template[0]) is None:
        hint = "pip install vllm-router in this environment" if template == (routers.VLLM_ROUTER,) else "give its path"
        raise PlanError(f"--router: {template[0]} is not an executable on this machine's PATH; {hint}")
    return template


def _head_command(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:
        raise PlanError(f"--head-command is not one shell-quoted command ({exc}): {text!r}") from None


def _readiness(args) -> readiness.Readiness | None:
    if args.ready_port:
        return readiness.Port(port=args.ready_port)
    if args.ready_url:
        if not args.ready_url.startswith(("http://", "https://")):
            raise PlanError(f"--ready-url {args.ready_url!r} is not an http(s) URL; for example http://{{host_ip}}:8000/health")
        return readiness.Url(url=args.ready_url)
    if args.ready_log:
        try:
            re.compile(args.ready_log)
        except re.error as exc:
            raise PlanError(f"--ready-log {args.ready_log!r} is not a regular expression: {exc}") from None
        return readiness.Log(pattern=args.ready_log)
    return None


def _check_probing(args) -> None:
    """--transfer and --plot need what a check needs, and --plot needs matplotlib here; said before anything starts."""
    checking = args.command == "check" or args.check or args.preflight
    if args.transfer and args.command_argv and not (args.command == "run" and args.preflight):
        raise PlanError(
            "--transfer moves bytes between built-in engine cores, not a command's: use 'run --preflight --transfer -- CMD' "
            "(the preflight moves them on the same hosts and addresses before the command starts), or 'check --transfer' alone"
        )
    if args.transfer and not checking:
        raise PlanError("run --transfer needs --check or --preflight: the transfer check runs after the all-pairs check")
    if args.plot:
        from .output import plot

        if not checking:
            raise PlanError("run --plot needs --check or --preflight: it draws the check's matrix")
        if not plot.available():
            raise PlanError(f"--plot needs matplotlib, which is not installed here: {plot.INSTALL_HINT}")
        where = os.path.dirname(os.path.abspath(args.plot))
        if not os.access(where, os.W_OK | os.X_OK):
            raise PlanError(f"--plot {args.plot}: cannot write in {where}; give a path in a directory you can write")


def _transport(args, plan) -> transports.Transport:
    name = transports.choose([h.host for h in plan.hosts], os.environ) if args.transport == "auto" else args.transport
    return transports.from_args(name, args, os.environ)


class StopRequests:
    """What stops a running job from outside: SIGINT, SIGTERM or SIGHUP (the first stops every rank with its
    grace, the second kills at once; one ignored when the process started, as under ``nohup``, stays
    ignored), or a closed stdout (its reader went away)."""

    def __init__(self):
        self.stop, self.hurry = threading.Event(), threading.Event()
        self.received: list[int] = []  # the signals, in order
        self.closed: str | None = None  # the stream whose reader went away
        self._say = None

    def install(self, ignored: frozenset[int], say) -> None:
        self._say = say
        for signum in STOP_SIGNALS:
            if signum not in ignored:
                signal.signal(signum, self._on_signal)

    def stream_closed(self, stream: str) -> None:
        self.closed = self.closed or stream
        self.stop.set()

    def ask(self, signum: int, now: bool = False) -> None:
        """``launcher stop``: what the signal would do (``now``: as the second one, no grace)."""
        self._on_signal(signum, None)
        if now:
            self._on_signal(signum, None)

    def _on_signal(self, signum, _frame) -> None:
        self.received.append(signum)
        if self.stop.is_set():
            self.hurry.set()  # asked twice: no more grace
        else:
            self.stop.set()
            self._say(f"{signal.Signals(signum).name}: stopping every rank (again to kill at once)")

    @property
    def signal(self) -> int | None:
        """The signal that stopped the job, if one did."""
        return self.received[0] if self.received else None


def _launch(args, plan, transport, ignored: frozenset[int], detached: operate.Detached | None = None) -> int:
    requests = StopRequests()
    # With --json, stdout carries the document alone: tables and rank output go to stderr.
    out = sys.stderr if args.json else sys.stdout
    on_ready = (lambda: detached.ready(len(plan.ranks), len(plan.hosts))) if detached else None
    reporter = report.ConsoleReporter(
        out=out, quiet_output=args.quiet, log_dir=args.log_dir, on_closed=requests.stream_closed, on_ready=on_ready
    )
    requests.install(ignored, reporter.progress)
    supervisors: list = []  # the job's, once its agents are starting: what the control socket reads
    control = _control_socket(detached, supervisors, requests) if detached else None

    def started(supervisor) -> None:
        supervisors.append(supervisor)
        if control is not None:
            control.start()

    for warning in plan.warnings:
        reporter.progress(f"warning: {warning}")
    try:
        result = launch(
            plan,
            transport,
            check=check_options(args),
            serve=args.command == "run",
            stop=requests.stop,
            reporter=reporter,
            preflight=args.preflight,
            hurry=requests.hurry,
            proxy=(args.proxy_address, args.proxy_port),
            metrics=(args.metrics_address, args.metrics_port) if getattr(args, "metrics_port", None) else None,
            on_supervisor=started,
            router=getattr(args, "router_argv", None),
            log_dir=args.log_dir,
        )
        if args.plot:
            _plot(result, args.plot, reporter)
        code = report.verdict(result, plan, reporter, stopped_by=requests.signal, closed=requests.closed)
    finally:
        drained = reporter.close()
        if control is not None:
            control.close()
    # This process's verdict: a signal or a closed stdout decides it too, and a job stopped before its
    # check ran is no passed check.
    document = documents.result_document(result)
    stopped_by = signal.Signals(requests.signal).name if requests.signal else None
    document.update(ok=code == 0, exit_code=code, stopped_by=stopped_by)
    if detached is not None:
        detached.job.write_result(document)
        detached.ended(code, report.failure_line(result) if result.failure else f"launcher: ended, exit {code}")
    if args.json and requests.closed is None:
        print(_json(document), flush=True)
    if requests.closed == "stdout":
        operate.silence_stdout()
    if not drained:
        os._exit(code)  # the terminal never read the last lines; an exit-time flush would wait for it too
    return code


def _control_socket(detached: operate.Detached, supervisors: list, requests: StopRequests):
    """The detached head's control socket: status from the job's state, stop as Ctrl-C stops a foreground job."""
    from .head.control_socket import ControlServer

    def answer(request: dict) -> dict:
        if request["op"] == "status":
            if not supervisors:
                return {"ok": True, "status": {"schema": documents.STATUS_SCHEMA, "job_id": detached.job.job_id, "state": "starting"}}
            supervisor = supervisors[-1]
            job = supervisor.job
            status = documents.status_document(supervisor.result(), state="running", health=job.health(), time_to_ready=job.first_ready_at)
            return {"ok": True, "status": status}
        if request["op"] == "stop":
            requests.ask(signal.SIGINT, now=bool(request.get("now")))
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {str(request['op'])[:40]!r}; the ops are status and stop"}

    return ControlServer(detached.job.socket_path, answer, detached.job.touch_alive)


def _json(document: dict) -> str:
    import json  # here: only --json needs it

    return json.dumps(document, indent=2, ensure_ascii=False)


def _plot(result: LaunchResult, path: str, reporter: report.ConsoleReporter) -> None:
    from .output import plot

    matrix = result.transfer or result.check
    if matrix is None:
        reporter.progress(f"no heatmap written to {path}: the job ended before its check")
        return
    try:
        plot.write_heatmap(matrix, path)
    except OSError as exc:
        reporter.progress(f"cannot write the heatmap to {path}: {exc.strerror or exc}")
        return
    reporter.progress(f"heatmap written to {path}")


if __name__ == "__main__":
    sys.exit(main())
