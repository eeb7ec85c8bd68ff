"""Operating a detached job from any shell: ``run --detach``, ``ps``, ``status``, ``logs``, ``stop``.

``run --detach`` forks the head before it starts anything: the child leaves
the terminal's session (``setsid``), writes everything it says to the job's
``head.log`` and serves the job's control socket (``head.control_socket``);
the parent waits on a pipe until every rank is ready (it prints the job id
and exits 0) or the job failed (it prints the same first line and exits with
the same code a foreground run would). The head keeps every lifeline: killed,
its agents read EOF and stop their hosts, and ``status`` says it was lost and
when. The other commands read the job's directory (``head.jobdir``) and ask
its head; any unique prefix of a job id names a job.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

from .exitcodes import STDOUT_CLOSED

if TYPE_CHECKING:  # the modules below load when a command runs: the head's parser only names these commands
    from .head.jobdir import JobDir

EXIT_NOT_FOUND = 2


# --- run --detach: the two halves of the fork --------------------------------------------------------------


class Detached:
    """The detached head's word to the process that started it: ready, or failed, once."""

    def __init__(self, fd: int, job: JobDir):
        self.fd, self.job = fd, job

    def _say(self, message: dict) -> None:
        if self.fd < 0:
            return
        try:
            os.write(self.fd, json.dumps(message).encode() + b"\n")
        except OSError:
            pass  # the starting process is gone (killed): the job runs on, detached as asked
        os.close(self.fd)
        self.fd = -1

    def ready(self, ranks: int, hosts: int) -> None:
        self._say({"ready": True, "ranks": ranks, "hosts": hosts})

    def ended(self, code: int, first_line: str) -> None:
        self._say({"ready": False, "exit_code": code, "first_line": first_line})


def become_detached(job: JobDir) -> None:
    """In the forked head: a session of its own, stdin from /dev/null, stdout and stderr into head.log."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    log = os.open(job.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(devnull)
    os.close(log)


def await_detached(fd: int, job: JobDir, pid: int) -> int:
    """In the process that ran ``launcher run --detach``: the job's first word, said as a foreground run would."""
    signal.signal(signal.SIGINT, lambda *_: os.kill(pid, signal.SIGINT))  # Ctrl-C while waiting stops the job
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGTERM))
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not chunk:
            break
        data += chunk
    os.close(fd)
    short = job.job_id[:8]
    try:
        message = json.loads(data.partition(b"\n")[0])
    except ValueError:
        print(f"launcher: FAILED: the detached head (pid {pid}) ended before its job was ready; its log: {job.log_path}", file=sys.stderr)
        return 1
    if message.get("ready"):
        print(job.job_id, flush=True)
        print(
            f"launcher: job {job.job_id} ready ({message['ranks']} ranks on {message['hosts']} hosts), detached: head pid {pid}; "
            f"launcher status {short} | launcher logs {short} -f | launcher stop {short}",
            file=sys.stderr,
        )
        return 0
    print(message["first_line"], file=sys.stderr)
    print(f"launcher: the job's log: {job.log_path}", file=sys.stderr)
    return int(message["exit_code"])


# --- ps, status, logs, stop --------------------------------------------------------------------------------


def ps_command(args, _ignored) -> int:
    from .head import jobdir
    from .output.table import format_table

    rows = [("JOB", "STATE", "PID", "STARTED", "HOSTS", "RANKS", "COMMAND")]
    for job in jobdir.every_job(jobdir.state_root()):
        record = job.record()
        if record is None:
            continue
        state, _ = job.state()
        command = " ".join(record.command[1:])
        rows.append(
            (job.job_id, state, str(record.pid), f"{jobdir.age(record.started)} ago", str(record.hosts), str(record.ranks), command[:60])
        )
    print(format_table(rows) if len(rows) > 1 else f"no jobs in {jobdir.state_root()}")
    return 0


def status_command(args, _ignored) -> int:
    from .head.control_socket import ControlError, ask

    job = _find(args.job)
    if job is None:
        return EXIT_NOT_FOUND
    state, when = job.state()
    if state == "running":
        try:
            answer = ask(job.socket_path, {"op": "status"})
        except ControlError as exc:
            print(f"launcher: error: job {job.job_id} is running but does not answer: {exc}", file=sys.stderr)
            return 1
        document = answer.get("status") or {}
    elif state == "ended":
        document = {**(job.result() or {}), "state": "ended"}
    else:
        record = job.record()
        document = {
            "schema": "launcher.status/1",
            "job_id": job.job_id,
            "state": "lost",
            "lost_at": when,
            "head_pid": record and record.pid,
        }
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(render_status(document, when))
    return 0


def render_status(document: dict, when: float | None) -> str:
    from .head import jobdir
    from .output.table import format_table

    job_id, state = document.get("job_id", "?"), document.get("state", "?")
    if state == "lost":
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if when else "an unknown time"
        return (
            f"job {job_id}: lost: its head (pid {document.get('head_pid')}) stopped answering at {at} "
            f"({jobdir.age(when) if when else '?'} ago) without ending the job; its agents stopped every rank when it went"
        )
    if state == "ended":
        failure = document.get("failure")
        how = (
            f"FAILED: {failure['message']}" if failure else ("stopped by " + document["stopped_by"] if document.get("stopped_by") else "ok")
        )
        head = f"job {job_id}: ended, exit {document.get('exit_code')} ({how})"
    else:
        health = document.get("health")
        ready = document.get("time_to_ready")
        head = (
            f"job {job_id}: {state}, up {_duration(document.get('uptime', 0))}"
            + (f", ready in {ready:.1f}s" if ready is not None else "")
            + (", healthy" if health is None else f", not healthy: {health}")
            + f", restarts {len(document.get('restarts', []))}"
        )
    rows = [("RANK", "HOST", "ADDRESS", "PORT", "PID", "STATE", "READY AT", "EXIT")]
    for r in document.get("ranks", []):
        ready_at = "-" if r.get("ready_at") is None else f"{r['ready_at']:.1f}s"
        code = "-" if r.get("exit_code") is None else str(r["exit_code"])
        rows.append(
            (str(r["rank"]), r["host"], r.get("address") or "-", str(r["port"]), str(r.get("pid") or "-"), r["state"], ready_at, code)
        )
    lines = [head, format_table(rows)]
    for r in document.get("restarts", []):
        back = f", ready again after {r['ready_after']:.1f}s" if r.get("ready_after") is not None else ", not ready yet"
        lines.append(f"restart {r['attempt']} of {r['unit']} at {r['at']:.1f}s: {r['cause']} (backoff {r['backoff']:.1f}s{back})")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def logs_command(args, _ignored) -> int:
    job = _find(args.job)
    if job is None:
        return EXIT_NOT_FOUND
    path = job.log_path if args.rank is None else os.path.join(job.rank_logs, f"rank-{args.rank}.log")
    if not os.path.exists(path) and not args.follow:
        print(f"launcher: error: {path} does not exist (rank {args.rank} printed nothing, or the job has no such rank)", file=sys.stderr)
        return EXIT_NOT_FOUND
    try:
        _follow(path, job) if args.follow else _copy(path)
    except KeyboardInterrupt:
        return 130
    return 0


def _copy(path: str) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            sys.stdout.buffer.write(chunk)
    sys.stdout.flush()


def _follow(path: str, job: JobDir) -> None:
    """Print the file and what is appended to it, as ``tail -F``: reopened when a restart starts a new one,
    until the job is no longer running and nothing more comes."""
    handle, inode, quiet_since = None, None, None
    while True:
        if handle is None or _inode(path) not in (None, inode):
            if handle is not None:
                _drain(handle)
                handle.close()
            try:
                handle = open(path, "rb")
                inode = os.fstat(handle.fileno()).st_ino
            except OSError:
                handle = None
        wrote = _drain(handle) if handle is not None else False
        if wrote:
            quiet_since = None
        elif job.state()[0] != "running":
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > 0.5:
                return
        time.sleep(0.1)


def _drain(handle) -> bool:
    data = handle.read()
    if data:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return bool(data)


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def stop_command(args, _ignored) -> int:
    from .head.control_socket import ControlError, ask

    job = _find(args.job)
    if job is None:
        return EXIT_NOT_FOUND
    state, _ = job.state()
    if state != "running":
        print(f"launcher: job {job.job_id} is not running ({state})", file=sys.stderr)
        return 0
    try:
        answer = ask(job.socket_path, {"op": "stop", "now": args.now})
    except ControlError as exc:
        print(f"launcher: error: {exc}", file=sys.stderr)
        return 1
    if not answer.get("ok"):
        print(f"launcher: error: the head refused: {answer.get('error')}", file=sys.stderr)
        return 1
    print(f"launcher: stopping job {job.job_id} ...", file=sys.stderr)
    deadline = time.monotonic() + args.wait
    while job.state()[0] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    state, _ = job.state()
    result = job.result() or {}
    if state == "running":
        print(
            f"launcher: job {job.job_id} still running after {args.wait:g}s; launcher stop --now {job.job_id[:8]} kills at once",
            file=sys.stderr,
        )
        return 1
    print(f"launcher: job {job.job_id} {state}, exit {result.get('exit_code', '?')}", file=sys.stderr)
    return 0


def _find(prefix: str | None) -> JobDir | None:
    from .head import jobdir

    try:
        return jobdir.find(jobdir.state_root(), prefix)
    except jobdir.JobDirError as exc:
        print(f"launcher: error: {exc}", file=sys.stderr)
        return None


def main(argv: list[str]) -> int:
    """``launcher ps|status|logs|stop ...`` without loading the head (the console script's fast path): a status
    answers in a few tens of milliseconds."""
    import argparse

    parser = argparse.ArgumentParser(prog="launcher")
    add_parsers(parser.add_subparsers(dest="command", required=True), argparse.ArgumentParser)
    args = parser.parse_args(argv)
    try:
        return args.handler(args, frozenset())
    except BrokenPipeError:  # `launcher ps | head -1`: end quietly, as Unix tools do
        silence_stdout()
        return STDOUT_CLOSED


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush cannot fail again on a closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def add_parsers(sub, parser_class) -> None:
    """The subcommands that operate detached jobs."""
    sub.add_parser("ps", help="this user's jobs on this machine (launcher run --detach)").set_defaults(handler=ps_command)
    status = sub.add_parser("status", help="a job's ranks, uptime, time to ready and restarts (a unique id prefix is enough)")
    status.add_argument("job", nargs="?", help="job id or a unique prefix (default: the running job, or the newest)")
    status.add_argument("--json", action="store_true", help="print the launcher.status/1 document")
    status.set_defaults(handler=status_command)
    logs = sub.add_parser("logs", help="what a job's head said, or one rank's output; -f follows it")
    logs.add_argument("job", nargs="?", help="job id or a unique prefix")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing what comes, until the job ends")
    logs.add_argument("--rank", type=int, help="this rank's output (rank-N.log: the current attempt)")
    logs.set_defaults(handler=logs_command)
    stop = sub.add_parser("stop", help="stop a detached job as Ctrl-C stops a foreground one")
    stop.add_argument("job", nargs="?", help="job id or a unique prefix")
    stop.add_argument("--now", action="store_true", help="SIGKILL every rank at once, without the grace period")
    stop.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the job to end (default 120)")
    stop.set_defaults(handler=stop_command)
