"""Driving the launcher as a user does: its command line to its end, or in the background line by line."""

import json
import os
import re
import subprocess
import sys
import threading

from support.processes import wait_for

# A launcher that a test starts gets SIGTERM (an ordered stop) when the process that started it dies (pytest,
# or the shell a test runs it in): a crashed test run must not leave a head serving forever. Set before exec,
# which keeps it.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def launcher_cmd(*args):
    """The launcher's argv (for a shell, quote it with shlex.join)."""
    return [sys.executable, "-c", _DIE_WITH_PARENT, "-m", "launcher.cli", *args]


# --- driving the CLI -------------------------------------------------------------

# A ready row of the rank table: RANK HOST ADDRESS PORT PID ready ... (per host: "0-1 ... 5600-5601")
ROW = re.compile(r"^(\d+)(?:-\d+)?\s+(\S+)\s+(\S+)\s+(\d+)(?:-\d+)?\s+(\d+)\s+ready\b")


def table_rows(text_or_lines):
    """(rank, host, address, port, pid) for every ready row of the launcher's rank table."""
    lines = text_or_lines.splitlines() if isinstance(text_or_lines, str) else text_or_lines
    return [(int(r), h, a, int(p), int(pid)) for r, h, a, p, pid in (m.groups() for m in map(ROW.match, lines) if m)]


def run_launcher(*args, timeout=60, env=None):
    """``launcher ARGS...`` to its end, output captured; ``env`` adds to this process's environment."""
    return subprocess.run(launcher_cmd(*args), capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def run_json(*args, timeout=60, env=None) -> tuple[dict, subprocess.CompletedProcess]:
    """``launcher ARGS... --json`` to its end: (its result or plan document, the finished process)."""
    done = run_launcher(*args, "--json", timeout=timeout, env=env)
    assert done.stdout.strip(), f"no document (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(done.stdout), done


def failed_line(stderr: str) -> str:
    """The one line after ``launcher: FAILED:``: what failed, where, and why."""
    return stderr.split("launcher: FAILED: ", 1)[1].splitlines()[0]


def launch_hosts(text, cluster=None, options=None, env=None, **launch):
    """The Python API on a hostfile's text, to its LaunchResult: over SSH to the namespace cluster when
    given, else as ``--transport auto`` would (loopback). ``env`` adds to this process's environment."""
    import launcher
    from launcher import hostfile, transports
    from launcher.plan import LaunchOptions

    plan = launcher.plan_job(hostfile.parse(text), options or LaunchOptions(), env={**os.environ, **(env or {})})
    transport = transports.get("ssh", config_path=cluster.ssh_config, known_hosts=cluster.known_hosts) if cluster else None
    return launcher.launch(plan, transport, **launch)


def write_hostfile(tmp_path, text):
    path = tmp_path / "hostfile"
    path.write_text(text)
    return str(path)


class RunningLauncher:
    """``launcher run`` in the background, with its output collected line by line."""

    def __init__(self, args, env=None, **popen):
        self.proc = subprocess.Popen(
            launcher_cmd("run", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen
        )
        self.stdout, self.stderr = [], []
        self._threads = [
            threading.Thread(target=self._collect, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._collect, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _collect(stream, lines):
        for line in stream:
            lines.append(line.rstrip("\n"))

    def ready_rows(self, count, timeout=30, after=None):
        """The first ``count`` ready rows (of the table printed after the line ``after``, if given)."""

        def ready():
            lines = list(self.stdout)
            if after is not None:
                lines = lines[lines.index(after) + 1 :] if after in lines else []
            found = table_rows(lines)
            return found if len(found) >= count else (self.proc.poll() is not None and "exited")

        rows = wait_for(ready, timeout)
        assert rows != "exited", f"launcher exited {self.proc.returncode} before {count} ranks were ready: {self.stderr[-8:]}"
        assert rows, f"not ready: {self.stderr[-5:]}"
        return rows

    def finish(self, timeout=30):
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return code
