"""Hostile input and hostile environments, on loopback: nothing may kill, hang or subvert a job.

One section per class of the hostile-input issue; each test uses members of
its class beyond the first example found.
"""

import json
import os
import re
import resource
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time

import msgspec
import psutil
import pytest

import launcher
from conftest import REPO, RunningLauncher, launcher_cmd, run_launcher, wait_for, write_hostfile
from launcher import agent, envpolicy, probe, protocol, transports
from launcher.plan import Host, LaunchOptions
from launcher.rankenv import RankIdentity
from launcher.readiness import Log
from support.processes import dead

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]

PY = sys.executable


# --- 2. the head never hangs on an exception it did not foresee --------------------------------


@pytest.mark.parametrize(
    "env, args, name",
    [
        ({"VLLM_WEIRD": "a\udcffb"}, [], "VLLM_WEIRD"),  # copied by the VLLM_ prefix
        ({"MYAPP_OPT": "\udce9t\udce9"}, ["--env-include", "MYAPP_"], "MYAPP_OPT"),  # copied by --env-include
        ({"HF_HOME": "/data/\udcff"}, ["--env", "HF_HOME"], "HF_HOME"),  # --env NAME takes the shell's value
    ],
)
def test_a_variable_that_is_not_utf8_is_refused_at_plan_time_by_name(tmp_path, env, args, name):
    hf = write_hostfile(tmp_path, "localhost\n")
    done = run_launcher("run", "-H", hf, *args, "--to-completion", "--", "true", env=env, timeout=30)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"launcher: error: {name} for localhost (") and "holds bytes that are not UTF-8" in done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


class Broken(transports.Transport):
    """A backend that fails in a way nobody foresaw (not a TransportError, not an OSError)."""

    name = "broken"

    def start(self, host):
        raise KeyError("surprise")


@pytest.mark.parametrize("to_completion", [False, True])
def test_an_unforeseen_exception_in_a_head_thread_is_that_hosts_failure_never_a_hang(to_completion):
    command = ("true",) if to_completion else ()
    plan = launcher.plan_job(
        [Host("localhost"), Host("127.0.0.2")], LaunchOptions(command=command, to_completion=to_completion, ready_timeout=60)
    )
    started = time.monotonic()
    result = launcher.launch(plan, Broken())
    assert time.monotonic() - started < 10  # not the ready timeout, not forever
    assert (result.failure.kind, result.exit_code) == ("transport", 3)
    assert result.failure.message.startswith("localhost: the head failed talking to its agent (KeyError: 'surprise')") or (
        result.failure.message.startswith("127.0.0.2: the head failed talking to its agent (KeyError")
    )


# --- 3. output never blocks control -------------------------------------------------------------


def test_a_terminal_that_stops_reading_never_stops_heartbeats_or_ctrl_c(tmp_path):
    hf = write_hostfile(tmp_path, "localhost slots=2\n")
    flood = f"{PY} -c \"import sys\nwhile True: sys.stdout.write('x' * 200 + chr(10))\""
    # stdout is a pipe nobody reads: it fills in a moment; stderr is read.
    proc = subprocess.Popen(
        launcher_cmd("run", "-H", hf, "--heartbeat-timeout", "2", "--grace", "1", "--ready-log", "x", "--", "sh", "-c", flood),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    time.sleep(8)  # four heartbeat timeouts with the terminal stalled
    assert proc.poll() is None, "".join(err)  # no false 'host lost'
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    assert proc.wait(20) == 130, "".join(err)
    assert time.monotonic() - started < 10
    assert any("SIGINT: stopping every rank" in line for line in err)
    proc.stdout.close()


def test_a_line_without_end_costs_bounded_memory_and_cr_ends_a_line(tmp_path):
    hf = write_hostfile(tmp_path, "localhost\n")
    huge = (
        f"{PY} -c \"import sys, time; sys.stdout.write('10%\\r20%\\r30%\\n'); "
        "sys.stdout.write('y' * 200_000_000); sys.stdout.flush(); time.sleep(1)\""
    )
    logs = tmp_path / "logs"
    run = RunningLauncher(["-H", hf, "--to-completion", "--log-dir", str(logs), "-q", "--", "sh", "-c", huge])
    peak = {"head": 0, "agent": 0}

    def sample():
        try:
            head = psutil.Process(run.proc.pid)
            peak["head"] = max(peak["head"], head.memory_info().rss)
            for child in head.children(recursive=True):
                if "launcher.agent" in " ".join(child.cmdline()):
                    peak["agent"] = max(peak["agent"], child.memory_info().rss)
        except psutil.Error:
            pass
        return run.proc.poll() is not None

    wait_for(sample, timeout=120, interval=0.05)
    assert run.finish() == 0, run.stderr[-5:]
    lines = (logs / "rank-0.log").read_text().split("\n")
    assert lines[:3] == ["10%", "20%", "30%"]  # a progress bar's redraws arrive as lines
    assert len(lines[3]) == agent.LINE_LIMIT and sum(len(x) for x in lines[3:]) == 200_000_000
    assert peak["agent"] < 100 * 2**20 and peak["head"] < 200 * 2**20, peak


def test_a_closed_stdout_ends_the_job_with_one_line_and_the_sigpipe_code(tmp_path):
    hf = write_hostfile(tmp_path, "localhost slots=2\n")
    cmd = shlex.join(launcher_cmd("run", "-H", hf, "--", "sh", "-c", "while true; do echo tick; sleep 0.05; done"))
    done = subprocess.run(
        ["bash", "-c", f"{cmd} | head -2; echo status=${{PIPESTATUS[0]}} >&2"], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.count("\n") == 2
    assert "status=141" in done.stderr, done.stderr
    assert "launcher: stopped: standard output was closed (its reader went away); all 2 ranks stopped" in done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_a_plan_piped_to_head_ends_quietly(tmp_path):
    hf = write_hostfile(tmp_path, "localhost slots=3000\n")  # far more than a pipe holds
    cmd = shlex.join(launcher_cmd("plan", "-H", hf))
    done = subprocess.run(
        ["bash", "-c", f"{cmd} | head -1; echo status=${{PIPESTATUS[0]}} >&2"], capture_output=True, text=True, timeout=60
    )
    assert "status=141" in done.stderr and "Traceback" not in done.stderr and "Exception ignored" not in done.stderr


# --- 4. signals as a Unix user expects them ----------------------------------------------------


def test_nohup_keeps_running_through_sighup(tmp_path):
    hf = write_hostfile(tmp_path, "localhost\n")
    proc = subprocess.Popen(
        [os.path.join(os.path.dirname(PY), "launcher"), "run", "-H", hf, "--grace", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # what nohup does
    )
    time.sleep(2)
    proc.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 143


def test_a_ctrl_c_at_any_instant_of_start_up_exits_cleanly(tmp_path):
    """From the moment the console script's entry runs (about 30 ms after exec on this machine) a Ctrl-C is
    noted and the launcher stops cleanly; earlier, it lands in CPython's own start-up, which ends the
    process its own way. Never a crash, never a traceback from launcher's code."""
    hf = write_hostfile(tmp_path, "localhost\n")
    script = os.path.join(os.path.dirname(PY), "launcher")
    for delay in [0.0, 0.005, 0.01, 0.02, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12, 0.16, 0.2, 0.3, 0.5, 0.8]:
        proc = subprocess.Popen([script, "run", "-H", hf, "--grace", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=30)[1]
        assert proc.returncode not in (-signal.SIGSEGV, -signal.SIGABRT), (delay, err[-800:])
        assert "launcher/" not in err, (delay, err[-800:])  # no frame of launcher's in any traceback
        if delay >= 0.05:
            assert proc.returncode == 130, (delay, proc.returncode, err[-800:])
            assert "Traceback" not in err and err.startswith("launcher: "), (delay, err[-800:])


# --- 7. files and secrets ----------------------------------------------------------------------


def test_log_files_are_private_and_never_follow_a_planted_symlink(tmp_path):
    hf = write_hostfile(tmp_path, "localhost slots=2\n")
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    target = tmp_path / "victim"
    target.write_text("precious\n")
    (logs / "rank-1.log").symlink_to(target)
    done = run_launcher("run", "-H", hf, "--log-dir", str(logs), "--to-completion", "--", "sh", "-c", "echo hello", timeout=60)
    assert done.returncode == 0, done.stderr
    assert target.read_text() == "precious\n"
    assert f"not writing {logs}/rank-1.log" in done.stderr
    assert stat.S_IMODE(os.stat(logs / "rank-0.log").st_mode) == 0o600 and (logs / "rank-0.log").read_text() == "hello\n"
    fresh = tmp_path / "fresh" / "logs"
    assert run_launcher("run", "-H", hf, "--log-dir", str(fresh), "--to-completion", "--", "true").returncode == 0
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700


@pytest.mark.parametrize("problem", ["group-writable", "other-user", "a-file", "under-a-file"])
def test_an_unsafe_log_dir_is_refused_in_one_line(tmp_path, problem):
    path = tmp_path / "logs"
    if problem == "group-writable":
        path.mkdir()
        os.chmod(path, 0o775)
    elif problem == "other-user":
        path.mkdir(mode=0o700)
        os.chown(path, 65534, 65534)
    elif problem == "a-file":
        path.write_text("")
    else:
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "logs"
    done = run_launcher("run", "-H", write_hostfile(tmp_path, "localhost\n"), "--log-dir", str(path), "--", "true", timeout=30)
    assert done.returncode == 2 and done.stderr.startswith(f"launcher: error: --log-dir {path}") and done.stderr.count("\n") == 1


def test_an_agent_never_echoes_the_bytes_of_a_spec_it_cannot_read():
    secret = "hf_S3CRET_abcdef"
    spec = protocol.encode(
        protocol.AgentSpec(
            job_id="j",
            host="h",
            host_index=0,
            host_is_loopback=True,
            grace=1,
            heartbeat_interval=1,
            heartbeat_timeout=5,
            ranks=[
                protocol.RankLaunch(
                    identity=RankIdentity(
                        job_id="j", rank=0, local_rank=0, local_size=1, world_size=1, host="h", host_index=0, engine_id="e", port_base=1
                    ),
                    argv=["x"],
                    env={"HF_TOKEN": secret},
                    ports=[1],
                )
            ],
        )
    )
    for broken in (spec[:-30] + b"\n", spec.replace(b'"rank":0', b'"rank":"zero"'), b"\xff" + spec):
        done = subprocess.run([PY, "-m", "launcher.agent"], input=broken, capture_output=True, timeout=30, cwd=REPO)
        assert done.returncode == 2 and b"not a launcher message" in done.stderr
        assert secret.encode() not in done.stderr + done.stdout


@pytest.mark.parametrize(
    "name",
    ["HF_TOKEN", "DB_PW", "MY_PASSWORD", "GITHUB_PAT", "X_API_KEY", "PRIVATE_CERT", "SSH_AUTH_SOCK", "OAUTH_CREDENTIALS",
     "GCP_CREDS", "PASSWORD_SALT", "TLS_CERT", "SESSION_COOKIE", "REQUEST_SIGNATURE"],
)  # fmt: skip
def test_secret_looking_names_are_masked_and_ordinary_ones_are_not(name):
    assert envpolicy.masked(name, "value") == "****"
    assert envpolicy.masked("PWD", "/home") == "/home" and envpolicy.masked("KEYBOARD", "us") == "us"
    assert envpolicy.masked("DATABASE_URL", "postgres://al:hunter2@db/x") == "postgres://al:****@db/x"


# --- 9. the sweep kills only this job's processes, only this user's -------------------------------


def test_the_sweep_spares_another_users_process_carrying_the_job_id():
    job = launcher.plan_job([Host("localhost")]).job_id
    assert len(job) == 16  # 64 random bits
    env = {**os.environ, "LAUNCHER_JOB_ID": job}
    mine = subprocess.Popen(["sleep", "60"], env=env)
    theirs = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "60"], env=env)
    other_job = subprocess.Popen(["sleep", "60"], env={**env, "LAUNCHER_JOB_ID": job[:-1] + "x"})
    try:
        wait_for(lambda: psutil.Process(theirs.pid).uids().real == 65534, timeout=5)
        assert agent.sweep_job(job) == [mine.pid]
        mine.wait(5)  # killed (the sweep reaped it: it was our child)
        assert theirs.poll() is None and other_job.poll() is None
    finally:
        for p in (theirs, other_job):
            p.kill()
            p.wait()


def test_log_readiness_still_works_with_chunked_output(tmp_path):
    plan = launcher.plan_job(
        [Host("localhost")],
        LaunchOptions(command=("sh", "-c", "printf 'warm\\rready now\\n'; sleep 30"), readiness=Log(pattern="^ready now$")),
    )
    result = launcher.launch(plan)
    assert result.ok and result.ranks[0].ready_at is not None


# --- 1. the side channel survives anything a peer sends -----------------------------------------


def rank_process(run):
    return psutil.Process(run.ready_rows(1)[0][4])


def dealer(port):
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


@pytest.fixture
def engine_core(tmp_path, port_base):
    run = RunningLauncher(["-H", write_hostfile(tmp_path, "localhost\n"), "--port-base", str(port_base), "-q"])
    rank = rank_process(run)
    yield run, rank, port_base
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 143


def test_deep_nesting_odd_frames_and_oversized_bodies_are_answered_and_the_rank_serves_on(engine_core):
    from conftest import vllm_handshake

    run, rank, port = engine_core
    sock = dealer(port)
    bodies = [
        b"\x91" * 200 + b"\xc0",  # 200 levels of nesting in 201 bytes
        b"\x91" * 5000 + b"\xc0",  # and 5000
        msgspec.msgpack.encode([b"get_meta_msg", [[[[0]]]], 0]),
        b"\xdd\xff\xff\xff\xff",  # an array announcing 4 billion items
        b"\xc6\x7f\xff\xff\xff" + b"x" * 100,  # a binary announcing 2 GiB
        b"x" * 4000,
    ]
    for body in bodies:
        sock.send_multipart([b"", body])
    sock.send_multipart([b"", b"a", b"b", b"c"])  # too many frames
    sock.send_multipart([b"y" * 100_000])  # over MAXMSGSIZE: the peer is disconnected
    time.sleep(0.5)
    assert rank.is_running() and run.proc.poll() is None
    assert vllm_handshake("127.0.0.1", port).endswith("-dp0")


def test_a_flood_of_frames_costs_bounded_memory_and_the_rank_serves_on(engine_core, listening_before):
    from conftest import vllm_handshake

    run, rank, port = engine_core
    before = rank.memory_info().rss
    flood = subprocess.Popen(
        [
            PY,
            "-c",
            f"""
import zmq, time
s = zmq.Context().socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0); s.connect('tcp://127.0.0.1:{port}')
for _ in range(3):
    s.send_multipart([b''] + [b''] * 1_500_000)  # one message of 1.5 million empty frames
    s.send_multipart([b''] + [b'x' * 4000] * 20_000)  # one of 20,000 frames at the frame limit
time.sleep(20)
""",
        ]
    )
    peak = 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        peak = max(peak, rank.memory_info().rss)
        time.sleep(0.02)
    flood.kill()
    flood.wait()
    assert rank.is_running() and run.proc.poll() is None
    assert peak - before < 200 * 2**20, (before >> 20, peak >> 20)  # unbounded, this grew by gigabytes
    assert vllm_handshake("127.0.0.1", port).endswith("-dp0")
    # The port was never given up: the same listening socket throughout (a re-bind once left a window
    # in which another local user could take the port and answer handshakes in the rank's name).
    assert [item.inode for item in probe.listeners(port)] == listening_before


@pytest.fixture
def listening_before(engine_core):
    """The inode of the rank's listening socket before the test's attack."""
    _, _, port = engine_core
    return [item.inode for item in probe.listeners(port)]


def test_a_thousand_idle_peers_do_not_starve_a_real_handshake(engine_core):
    from conftest import vllm_handshake

    run, rank, port = engine_core
    import socket as sockets

    idle = []
    for _ in range(1000):  # half-open: TCP only, never a ZMTP greeting
        s = sockets.socket()
        s.connect(("127.0.0.1", port))
        idle.append(s)
    try:
        assert vllm_handshake("127.0.0.1", port).endswith("-dp0")
        assert rank.is_running()
    finally:
        for s in idle:
            s.close()


IDLE_PEERS = """
import sys, time, zmq
ctx = zmq.Context(); ctx.set(zmq.MAX_SOCKETS, 4096)
peers = []
for _ in range(int(sys.argv[2])):  # each finishes ZMTP's greeting (a DEALER), then says nothing; dropped, it stays away
    s = ctx.socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0); s.setsockopt(zmq.RECONNECT_IVL, -1)
    s.connect(f"tcp://127.0.0.1:{sys.argv[1]}"); peers.append(s)
print("connected", flush=True)
time.sleep(120)
"""


def test_peers_that_greet_and_then_idle_cannot_hold_a_rank_at_its_open_files_limit(tmp_path, port_base):
    """1100 peers that finished ZMTP's greeting held a rank at its 1024-descriptor limit, and every real
    handshake failed while they stayed. Past MAX_CONNECTIONS (here half the limit) the oldest go."""
    from conftest import vllm_handshake

    run = RunningLauncher(
        ["-H", write_hostfile(tmp_path, "localhost\n"), "--port-base", str(port_base), "-q"],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)),
    )
    try:
        rank = rank_process(run)
        peers = subprocess.Popen([PY, "-c", IDLE_PEERS, str(port_base), "1100"], stdout=subprocess.PIPE, text=True)
        try:
            assert peers.stdout.readline().strip() == "connected"
            time.sleep(2.0)  # every greeting done: without the cap the rank is at its limit by now
            assert rank.num_fds() < 600, rank.num_fds()
            assert vllm_handshake("127.0.0.1", port_base).endswith("-dp0")
            assert rank.is_running()
        finally:
            peers.kill()
            peers.wait()
    finally:
        run.proc.send_signal(signal.SIGTERM)
        assert run.finish() == 143


def test_fuzzed_messages_leave_the_rank_alive_bounded_and_answering(engine_core):
    """Hypothesis-fuzzed multipart messages, each followed by a real handshake, sent from a process of its
    own (pyzmq crashed pytest's process once while sending these: a client crash fails this test only)."""
    run, rank, port = engine_core
    done = subprocess.run(
        [PY, os.path.join(REPO, "tests", "support", "sidechannel_fuzz.py"), str(port), str(rank.pid)],
        capture_output=True, text=True, errors="replace", timeout=300, env={**os.environ, "PYTHONPATH": REPO},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["examples"] >= 100 and report["answered"] == report["examples"], report
    assert rank.is_running() and run.proc.poll() is None


def test_a_job_of_many_hosts_gets_the_open_files_it_needs():
    """A link holds a descriptor or two: 1000 hosts would end at the usual soft limit of 1024."""
    script = (
        "import resource\n"
        "from launcher.head.supervisor import _room_for_links\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096))\n"  # as root, or wherever the hard limit allows
        "_room_for_links(10)\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
        "_room_for_links(1000)\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1024", "4096"]  # a small job leaves the limit alone; a large one gets the hard limit


def test_the_head_forks_local_agents_unless_a_secret_the_allowlist_drops_is_about(tmp_path):
    """Paths such as SSL_CERT_FILE look secret by name and are masked, but a path is no secret: it keeps the fork."""
    from launcher.transports.local import _secrets_dropped

    cert = tmp_path / "ca.pem"
    cert.write_text("x")
    env = {"SSL_CERT_FILE": str(cert), "HF_TOKEN": "hf_x", "PATH": "/bin", "MY_DB_PASSWORD": "p", "SESSION_KEY": "/no/such/file"}
    assert _secrets_dropped(env, envpolicy.login_environment(env)) == ["MY_DB_PASSWORD", "SESSION_KEY"]  # HF_ is allowlisted


def process_memory(pid: int) -> bytes:
    """Every readable mapping of a process (we are root), as a core dump would hold it."""
    chunks = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or line.rstrip().endswith(("[vvar]", "[vsyscall]", "[vvar_vclock]")):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                chunks.append(mem.read(end - start))
            except (OSError, ValueError, OverflowError):
                continue
    return b"".join(chunks)


@pytest.mark.e2e
def test_a_secret_the_allowlist_drops_is_in_no_process_of_the_job_not_even_in_its_memory(tmp_path, no_leaks, port_base):
    """Local agents and built-in ranks are forked, and a fork's memory is a copy of its parent's: with a
    secret about that ranks must not get, the agent is exec'd, so no copy of the head's environment exists."""
    marker = "zz-" + os.urandom(8).hex()
    run = RunningLauncher(
        ["-H", write_hostfile(tmp_path, "localhost slots=2\n"), "--port-base", str(port_base)],
        env={**os.environ, "MY_DB_PASSWORD": marker},
    )
    try:
        run.ready_rows(2)
        job = psutil.Process(run.proc.pid).children(recursive=True)
        assert len(job) >= 3, job  # the agent and its two ranks
        assert marker.encode() in process_memory(run.proc.pid)  # the head has it: the scan finds what is there
        holding = [(p.pid, " ".join(p.cmdline())) for p in job if marker.encode() in process_memory(p.pid)]
        assert holding == []
    finally:
        run.proc.send_signal(signal.SIGINT)
        assert run.finish() == 130


def detached_pid(path) -> int:
    """The pid that a rank's detached process (``setsid sh -c 'echo $$ > path; ...'``) wrote, once written."""
    assert wait_for(path.exists, 10)
    return int(path.read_text())


@pytest.mark.e2e
def test_a_stalled_local_agent_is_killed_and_what_its_ranks_left_is_swept(tmp_path, no_leaks, port_base):
    """The chaos loop's one leak: SIGSTOP a local agent, the head kills it at its heartbeat timeout, and
    the detached process its rank had started kept running. The head now sweeps after any agent it kills."""
    left = tmp_path / "detached.pid"
    rank = f"setsid sh -c 'echo $$ > {left}; exec sleep 300' & echo go; exec sleep 300"
    run = RunningLauncher(
        ["-H", write_hostfile(tmp_path, "localhost\n"), "--port-base", str(port_base), "--heartbeat-timeout", "2", "--grace", "1",
         "--ready-log", "^go$", "--", "sh", "-c", rank],
    )  # fmt: skip
    run.ready_rows(1)
    detached = detached_pid(left)
    agents = [p for p in psutil.Process(run.proc.pid).children() if "launcher.agent" in " ".join(p.cmdline())]
    assert len(agents) == 1, agents
    agents[0].send_signal(signal.SIGSTOP)
    assert run.finish(timeout=60) == 3
    assert any(line.startswith("launcher: FAILED: host localhost lost") for line in run.stderr), run.stderr[-5:]
    assert any(f"swept 1 processes this job left on localhost (pids {detached})" in line for line in run.stderr), run.stderr[-8:]
    assert wait_for(lambda: dead(detached), 5)


def test_a_port_another_user_holds_is_never_taken_for_the_ranks_own_by_a_launcher_that_is_not_root(port_base, monkeypatch):
    """A non-root agent cannot see who holds another user's socket (psutil names no pid): that once counted
    as the rank's own, so a squatter made the job "ready" while vLLM hung. Proof is now the listening
    socket's inode in the rank's own tree, which /proc shows any user."""
    from launcher import probe

    monkeypatch.setattr(probe, "port_holder", lambda *args, **kwargs: None)  # what a non-root agent learns of the holder
    squatter = listening_as(65534, port_base)
    mine = subprocess.Popen(
        [PY, "-c", "import socket,sys,time; s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); "
         "print(1, flush=True); time.sleep(60)", str(port_base + 1)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        mine.stdout.readline()
        assert probe.foreign_listener("127.0.0.1", [port_base + 1], {mine.pid}) is None  # its own: the inode is in its tree
        assert (
            probe.foreign_listener("127.0.0.1", [port_base], {mine.pid})
            == f"port {port_base} at 127.0.0.1 is held by another user (uid 65534)"
        )
        assert probe.foreign_listener("127.0.0.1", [port_base + 2], {mine.pid}) == f"nothing listens on port {port_base + 2} at 127.0.0.1"
    finally:
        mine.kill()
        mine.wait()
        os.close(squatter)


def listening_as(uid: int, port: int) -> int:
    """A process of ``uid`` listening on 127.0.0.1:``port`` until the returned fd is closed (a fork: no
    interpreter of ours need be readable by that user)."""
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: system calls only, then _exit
        try:
            import socket as sockets

            os.close(ready_r)
            os.close(hold_w)  # else its own copy keeps the hold open forever
            os.setgid(uid)
            os.setuid(uid)
            s = sockets.socket()
            s.bind(("127.0.0.1", port))
            s.listen()
            os.write(ready_w, b"1")
            os.read(hold_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(hold_r)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True).start()
    return hold_w


@pytest.mark.e2e
def test_an_agent_stopped_before_its_first_word_is_killed_and_its_host_swept(tmp_path, no_leaks, port_base):
    """Found by scripts/chaos.py: a local agent stopped right after it forked its first rank, before it said
    anything. The head heard of no rank, failed at the ready timeout, killed the agent, and swept nothing:
    the rank died with its agent, but what it had started in a session of its own ran on. Here the first
    rank stops its agent itself, while the agent is still starting the others."""
    left = tmp_path / "detached.pid"
    rank = f"if [ {{local_rank}} = 0 ]; then kill -STOP $PPID; setsid sh -c 'echo $$ > {left}; exec sleep 300' & fi; exec sleep 300"
    run = RunningLauncher(
        ["-H", write_hostfile(tmp_path, "localhost slots=4\n"), "--port-base", str(port_base), "--ready-timeout", "3", "--grace", "1",
         "--ready-log", "^never$", "--", "sh", "-c", rank],
    )  # fmt: skip
    detached = detached_pid(left)
    assert run.finish(timeout=60) == 4  # not ready in time
    assert any("agents connected" in line for line in run.stderr) is False, run.stderr  # it never said a word
    said = [line for line in run.stderr if line.startswith("launcher:")]
    assert wait_for(lambda: dead(detached), 5), said  # swept: nothing of the job is left
    # The sweep names what it killed; ranks that had not yet died with their agent may be among them.
    swept = [int(pid) for line in said for found in re.findall(r"\(pids ([0-9 ]+)\)", line) for pid in found.split()]
    assert detached in swept, said
