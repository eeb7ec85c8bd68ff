"""End to end over real sshd, on hosts that are network namespaces (scripts/netns_cluster.py)."""

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import (
    RunningLauncher,
    failed_line,
    launch_hosts,
    launcher_cmd,
    run_json,
    run_launcher,
    standin,
    standin_reports,
    vllm_handshake,
    wait_for,
    write_hostfile,
)
from launcher.check import CheckOptions
from support.netns import NET, NET2, PREFIX

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

HEAD = f"{NET}.1"  # the head's own address on the test network
LEAKED = {"VLLM_NIXL_SIDE_CHANNEL_HOST": HEAD, "VLLM_HOST_IP": HEAD, "CUDA_VISIBLE_DEVICES": "0", "VLLM_DP_MASTER_IP": HEAD}


def check(cluster, hf, *extra, env=None, timeout=90):
    return run_launcher("check", "-H", hf, *cluster.ssh_args(), *extra, env=env, timeout=timeout)


def check_with(config, known, hf, *extra, env=None):
    """``launcher check`` over SSH with this ssh config and known_hosts file (a test's own)."""
    return run_launcher("check", "-H", hf, "--transport", "ssh", "--ssh-config", str(config), "--known-hosts", str(known), *extra,
                        env=env, timeout=60)  # fmt: skip


def test_seed_bug_head_address_leaked_yet_every_rank_binds_its_own_host(hosts, tmp_path):
    hf = write_hostfile(tmp_path, hosts.hostfile(slots=2))
    run = RunningLauncher(
        ["-H", hf, *hosts.ssh_args(), "--env", "HF_TOKEN=s3cr3t-value"],
        env={**os.environ, **LEAKED},
    )
    ready = run.ready_rows(6)
    for rank, host, address, port, pid in ready:
        assert address == hosts.host(host).address  # its own host's address, not the head's
        assert vllm_handshake(address, port).endswith(f"-dp{rank}")  # advertised = bound = reachable
        # Seen from the host itself: its socket table lists this rank's pid on (address, port) only.
        table = hosts.host(host).run("ss", "-Hltnp").stdout
        listening = {m.group(1) for m in re.finditer(rf"LISTEN\s+\d+\s+\d+\s+(\S+)\s.*pid={pid},", table)}
        assert listening == {f"{address}:{port}"}, table
        environ = psutil.Process(pid).environ()  # one PID space across the namespaces
        assert not set(LEAKED) & set(environ), f"leaked into rank {rank}: {set(LEAKED) & set(environ)}"
        assert environ["HF_TOKEN"] == "s3cr3t-value" and environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5600"
    for host in hosts.hosts:  # the secret reached the rank's env, never any argv on any host
        for pid in host.pids():
            try:
                assert "s3cr3t" not in " ".join(psutil.Process(pid).cmdline())
            except psutil.NoSuchProcess:
                pass
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 143


def test_all_pairs_check_across_hosts_is_green(hosts, tmp_path):
    result = launch_hosts(hosts.hostfile(slots=2), hosts, env=LEAKED, check=CheckOptions())
    assert result.ok, result.failure
    assert result.check.ok and len(result.check.results) == 36 and set(result.check.wires.values()) == {"v2"}
    assert {r.host: r.address for r in result.ranks} == {h.name: h.address for h in hosts.hosts}  # never the head's
    assert all(r.state == "exited" and r.exit_code == 0 for r in result.ranks)


def test_a_sampled_check_covers_every_pair_of_hosts_and_the_drawn_rank_pairs(hosts):
    result = launch_hosts(hosts.hostfile(slots=3), hosts, check=CheckOptions(sample=5))
    assert result.ok, result.failure
    pairs = result.check.pairs
    assert len(pairs) == 9 + 5 and {(a, b) for a in (0, 3, 6) for b in (0, 3, 6)} <= pairs  # every pair of hosts
    assert set(result.check.results) == pairs and all(r.ok for r in result.check.results.values())


def test_interface_selectors_and_explicit_local_address_are_honoured(hosts):
    text = f"h1 slots=2 cidr={NET2}.0/24\nh2 env:VLLM_NIXL_SIDE_CHANNEL_HOST={NET}.12\nh3 ifname=^eth1\n"
    result = launch_hosts(text, hosts, env=LEAKED)  # ready means bound, and reachable from the head (on both networks)
    assert result.ok, result.failure
    assert [(r.host, r.address, r.rule) for r in result.ranks] == [
        ("h1", f"{NET2}.11", f"cidr={NET2}.0/24 (eth1)"),
        ("h1", f"{NET2}.11", f"cidr={NET2}.0/24 (eth1)"),
        ("h2", f"{NET}.12", "VLLM_NIXL_SIDE_CHANNEL_HOST (explicit)"),
        ("h3", f"{NET}.13", "ifname=^eth1 (eth0)"),
    ]


def test_an_unreachable_listener_shows_red_in_the_matrix_with_the_reason(hosts, tmp_path):
    # h1 binds on the second network, which h2 and h3 have no route to.
    done = check(hosts, write_hostfile(tmp_path, "h1 ifname==eth1\nh2\nh3\n"), "--handshake-timeout", "2")
    assert done.returncode == 5, done.stderr
    matrix = done.stdout.split("handshake latency")[1]
    assert re.search(r"^h1 r0 .*\d", matrix, re.M)
    assert re.search(r"^h2 r1\s+FAIL\s+[\d.]+\s+[\d.]+$", matrix, re.M)
    assert f"r1 (h2) -> r0 (h1): {NET2}.11:5600: Network is unreachable" in matrix
    # Probes leave from each rank's own address: r0's replies cannot route back to 198.19 either.
    assert f"r0 (h1) -> r1 (h2): {NET}.12:5601: connect timed out after 2s" in matrix
    assert "4 of 9 handshakes failed" in matrix


def test_a_non_local_explicit_address_fails_that_host_and_stops_the_others(hosts):
    result = launch_hosts(f"h1 slots=2\nh2\nh3 env:VLLM_NIXL_SIDE_CHANNEL_HOST={NET}.99\n", hosts, check=CheckOptions())
    assert (result.failure.kind, result.failure.rank, result.failure.host, result.exit_code) == ("rank-error", 3, "h3", 78)
    assert result.failure.message.startswith(
        f"rank 3 on h3 exited with code 78: VLLM_NIXL_SIDE_CHANNEL_HOST={NET}.99 is not an address of h3"
    )
    assert f"eth0 {NET}.13/24" in result.failure.message
    assert result.check is None and all(r.state in ("exited", "lost") for r in result.ranks)


def test_remote_python_missing_is_a_clear_error(hosts, tmp_path):
    done = check(hosts, write_hostfile(tmp_path, "h1\nh2 python=/nonexistent/python3\n"))
    assert done.returncode == 3
    failed = failed_line(done.stderr)
    assert failed.startswith("host h2") and "the agent did not start" in failed and "python=" in failed


@pytest.mark.parametrize(
    "line, extra, expected",
    [
        (f"root@{NET}.1 port=1", [], f"connection to root@{NET}.1:1 refused; is sshd running there?"),
        (f"root@{NET}.99", ["--connect-timeout", "1"], f"root@{NET}.99:22"),
    ],
)
def test_hosts_without_sshd_fail_with_one_line(hosts, tmp_path, line, extra, expected):
    done = check(hosts, write_hostfile(tmp_path, f"h1\n{line}\n"), *extra, timeout=60)
    assert done.returncode == 3
    failed = failed_line(done.stderr)
    assert expected in failed and "Traceback" not in done.stderr


def test_wrong_key_is_refused_with_one_line(hosts, tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text(f"Host h2\n  HostName {hosts.host('h2').address}\n  User root\n")
    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    done = check_with(config, hosts.known_hosts, write_hostfile(tmp_path, "h2\n"), "--identity", str(wrong), env={"SSH_AUTH_SOCK": ""})
    assert done.returncode == 3
    assert f"authentication failed for root@{NET}.12:22 (tried {wrong})" in done.stderr


def test_changed_host_key_is_always_refused(hosts, tmp_path):
    known = tmp_path / "known_hosts"
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, blob = (tmp_path / "other.pub").read_text().split()[:2]
    known.write_text(f"{NET}.12 {kind} {blob}\n")
    config = tmp_path / "ssh_config"
    config.write_text(open(hosts.ssh_config).read().replace(hosts.known_hosts, str(known)))
    for flags in ([], ["--accept-new-host-keys"]):
        done = check_with(config, known, write_hostfile(tmp_path, "h2\n"), *flags)
        assert done.returncode == 3
        assert f"HOST KEY CHANGED for {NET}.12" in done.stderr and f"ssh-keygen -R {NET}.12" in done.stderr


def test_unknown_host_key_is_refused_unless_new_keys_are_accepted(hosts, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("")
    config = tmp_path / "ssh_config"
    config.write_text(open(hosts.ssh_config).read().replace(hosts.known_hosts, str(known)))
    hf = write_hostfile(tmp_path, "h1\nh3\n")
    done = check_with(config, known, hf)
    assert done.returncode == 3
    assert re.search(rf"host key of {re.escape(NET)}\.1[13] is unknown .* --accept-new-host-keys", done.stderr)
    done = check_with(config, known, hf, "--accept-new-host-keys")
    assert done.returncode == 0, done.stderr
    recorded = known.read_text()
    assert f"{NET}.11 ssh-ed25519" in recorded and f"{NET}.13 ssh-ed25519" in recorded
    done = check_with(config, known, hf)  # now known
    assert done.returncode == 0, done.stderr


def test_a_dropped_ssh_connection_stops_that_hosts_ranks_and_ends_the_job(hosts, tmp_path):
    run = RunningLauncher(["-H", write_hostfile(tmp_path, hosts.hostfile(slots=1)), *hosts.ssh_args(), "--grace", "2"])
    ready = run.ready_rows(3)
    h2 = hosts.host("h2")
    sessions = [p for p in h2.pids() if p != hosts.sshd["h2"].pid and psutil.Process(p).name() == "sshd"]
    assert sessions
    for pid in sessions:
        os.kill(pid, signal.SIGKILL)
    assert run.finish() == 3
    assert any(line.startswith("launcher: FAILED: host h2 lost") for line in run.stderr)
    assert not psutil.pid_exists(ready[1][4]) or psutil.Process(ready[1][4]).status() == psutil.STATUS_ZOMBIE


def test_proxyjump_reaches_a_host_through_another(hosts, tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text(
        open(hosts.ssh_config).read()
        + f"Host far\n  HostName {hosts.host('h3').address}\n  User root\n  ProxyJump h1\n"
        + f"  IdentityFile {hosts.client_key}\n  UserKnownHostsFile {hosts.known_hosts}\n"
    )
    hf = write_hostfile(tmp_path, "far\nh2\n")
    doc, done = run_json("check", "-H", hf, "--transport", "ssh", "--ssh-config", str(config), "--known-hosts", hosts.known_hosts)
    assert done.returncode == 0 and doc["check"]["ok"], done.stderr
    assert [(r["host"], r["address"]) for r in doc["ranks"]] == [("far", f"{NET}.13"), ("h2", f"{NET}.12")]


def test_a_silent_partition_is_noticed_by_heartbeats_on_both_sides(hosts, tmp_path):
    run = RunningLauncher(
        ["-H", write_hostfile(tmp_path, hosts.hostfile(slots=1)), *hosts.ssh_args(), "--heartbeat-timeout", "2", "--grace", "1"]
    )
    ready = run.ready_rows(3)
    link = f"{PREFIX}-v2"  # h2's cable to the bridge: no FIN or RST will ever arrive
    subprocess.run(["ip", "link", "set", link, "down"], check=True)
    try:
        assert run.finish(timeout=30) == 3
        assert any(line.startswith("launcher: FAILED: host h2 lost: no word from its agent") for line in run.stderr)
        # The agent on h2 heard no heartbeat either, and stopped its rank by itself.
        assert wait_for(lambda: not psutil.pid_exists(ready[1][4]), 5.0)
    finally:
        subprocess.run(["ip", "link", "set", link, "up"], check=True)


def test_a_starved_host_flooding_output_is_not_declared_lost_and_a_partition_still_is(hosts, tmp_path):
    """A false 'host lost' is worse than a late one: hold the job up through CPU starvation and an output
    flood for four heartbeat timeouts, then cut the host off for real."""
    h2 = hosts.host("h2")
    hogs = [subprocess.Popen(["ip", "netns", "exec", h2.netns, sys.executable, "-c", "while True: pass"]) for _ in range(4)]
    flood = "echo go; exec yes 'the quick brown fox jumps over the lazy dog'"
    run = RunningLauncher(
        [
            "-H",
            write_hostfile(tmp_path, "h1\nh2\n"),
            *hosts.ssh_args(),
            "--heartbeat-timeout",
            "3",
            "--grace",
            "1",
            "-q",
            "--ready-log",
            "^go$",
            "--",
            "sh",
            "-c",
            flood,
        ]
    )
    try:
        run.ready_rows(2, timeout=60)
        time.sleep(12)
        assert run.proc.poll() is None, run.stderr[-6:]
        assert not any("lost" in line for line in run.stderr), run.stderr[-6:]
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    subprocess.run(["ip", "link", "set", f"{PREFIX}-v2", "down"], check=True)
    try:
        assert run.finish(timeout=30) == 3
        assert any(line.startswith("launcher: FAILED: host h2 lost: no word from its agent") for line in run.stderr)
    finally:
        subprocess.run(["ip", "link", "set", f"{PREFIX}-v2", "up"], check=True)
    # Cut off from its head, h2's agent stops the flood and leaves on its own: its heartbeat timeout, then its
    # ranks' grace, then its output's last write to a dead SSH channel (seconds more when two suites share 2 CPUs).
    assert wait_for(lambda: not hosts.stray_pids(), timeout=30), hosts.stray_pids()


# --- user commands: `launcher run -- vllm serve ...` with the stand-in vLLM ------------

# The README's recipe, as vLLM's own docs give it: the API-server host names no start rank.
API_DP_ARGS = (
    "--data-parallel-size",
    "{world_size}",
    "--data-parallel-size-local",
    "{local_size}",
    "--data-parallel-address",
    "{head_ip}",
    "--data-parallel-rpc-port",
    "{rpc_port}",
)
DP_ARGS = (*API_DP_ARGS, "--data-parallel-start-rank", "{host_first_rank}")


def test_vllm_multi_node_dp_with_the_heads_variables_leaking_binds_every_host_its_own(hosts, tmp_path):
    hf = write_hostfile(tmp_path, "h1 slots=2\nh2 slots=2\nh3 slots=1\n")
    api = shlex.join(standin(*API_DP_ARGS, "--port", "8000", "--tag", "it's {host}"))
    run = RunningLauncher(
        [
            "-H",
            hf,
            *hosts.ssh_args(),
            "--per-host",
            "--preflight",
            "--ready-timeout",
            "30",
            "--head-command",
            api,
            "--",
            *standin(*DP_ARGS, "--headless", "--tag", "it's {host}"),
        ],
        env={**os.environ, **LEAKED, "VLLM_DP_RANK": "7", "VLLM_DP_SIZE": "9"},
    )
    assert len(run.ready_rows(5)) == 5  # the preflight's built-in cores, one per DP rank, then its check:
    rows = run.ready_rows(3, after="all 25 handshakes ok")
    assert [(r[0], r[1], r[2]) for r in rows] == [(0, "h1", f"{NET}.11"), (2, "h2", f"{NET}.12"), (4, "h3", f"{NET}.13")]
    for dp, host in [(0, "h1"), (1, "h1"), (2, "h2"), (3, "h2"), (4, "h3")]:  # vLLM's port rule: base + DP index
        assert vllm_handshake(hosts.host(host).address, 5600 + dp).endswith(f"_dp{dp}")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 143
    assert any("preflight passed" in line for line in run.stderr)

    seen = standin_reports(run.stdout)
    for (_, host), got in seen.items():
        own = hosts.host(host).address
        assert (got["side_channel_host"], got["vllm_host_ip"]) == (own, own), host  # never the head's NET.1
        assert got["env"]["GLOO_SOCKET_IFNAME"] == "eth0"  # gloo (torch.distributed on CPU) binds the same interface
        argv = got["argv"]
        assert argv[argv.index("--data-parallel-address") + 1] == f"{NET}.11"  # {head_ip}: h1's own address
        assert got["tags"] == [f"it's {host}"] and got["headless"] == (host != "h1")
    assert {host: got["dp_ranks"] for (_, host), got in seen.items()} == {"h1": [0, 1], "h2": [2, 3], "h3": [4]}
    assert {got["dp_size"] for got in seen.values()} == {5} and {got["lb_mode"] for got in seen.values()} == {"internal"}


def test_a_start_rank_on_the_api_server_host_is_refused_as_vllm_refuses_it(hosts, tmp_path):
    # vLLM 0.32 infers hybrid load balancing from it, then refuses the headless hosts.
    hf = write_hostfile(tmp_path, "h1 slots=2\nh2 slots=2\n")
    done = subprocess.run(
        launcher_cmd(
            "run",
            "-H",
            hf,
            *hosts.ssh_args(),
            "--per-host",
            "--head-command",
            shlex.join(standin(*DP_ARGS)),
            "--",
            *standin(*DP_ARGS, "--headless"),
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert failed_line(done.stderr) == (
        "rank 0 on h1 exited with code 1; last output: "
        "RuntimeError: Remote engine 2 must not use --headless in external or hybrid dp lb mode"
    )


def test_a_vllm_failing_on_one_host_ends_the_job_everywhere_with_its_code(hosts, tmp_path):
    hf = write_hostfile(tmp_path, "h1 slots=2\nh2 slots=2 env:STANDIN_EXIT=3\nh3 slots=2\n")
    done = subprocess.run(
        launcher_cmd("run", "-H", hf, *hosts.ssh_args(), "--per-host", "--", *standin(*DP_ARGS, "--headless")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    assert failed_line(done.stderr).startswith("rank 2 on h2 exited with code 3")


def test_a_sigkilled_agent_leaves_nothing_its_ranks_detached(hosts, tmp_path):
    # The rank starts a grandchild in a session of its own: PR_SET_PDEATHSIG is
    # not inherited across fork, so only the head's sweep can find it.
    detach = "setsid sleep 1000 & echo up; exec sleep 1000"
    run = RunningLauncher(["-H", write_hostfile(tmp_path, "h1\nh2\n"), *hosts.ssh_args(), "--ready-log", "^up$", "--", "sh", "-c", detach])
    rank_pid = run.ready_rows(2)[1][4]
    h2 = hosts.host("h2")
    detached = wait_for(lambda: [p for p in h2.pids() if p != rank_pid and psutil.Process(p).cmdline() == ["sleep", "1000"]])
    assert detached and os.getsid(detached[0]) == detached[0]
    agent = next(p for p in h2.pids() if "launcher.agent" in " ".join(psutil.Process(p).cmdline()))
    os.kill(agent, signal.SIGKILL)
    assert run.finish() == 3
    assert any(line.startswith("launcher: FAILED: host h2 lost: its agent ended") for line in run.stderr)
    assert any(f"swept 1 processes this job left on h2 (pids {detached[0]})" in line for line in run.stderr), run.stderr[-5:]
    # ...and the `hosts` fixture checks that h1 and h2 hold nothing but their sshd.


# A rank that ignores SIGTERM and leaves two grandchildren, one in its own session.
STUBBORN = "trap '' TERM; setsid sleep 1000 & sleep 1000 & echo up; wait"


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_a_signalled_head_leaves_nothing_on_any_host_even_stubborn_ranks(hosts, tmp_path, signum, code):
    run = RunningLauncher(
        [
            "-H",
            write_hostfile(tmp_path, hosts.hostfile(slots=1)),
            *hosts.ssh_args(),
            "--grace",
            "1",
            "--ready-log",
            "^up$",
            "--",
            "sh",
            "-c",
            STUBBORN,
        ]
    )
    run.ready_rows(3)
    assert all(len(hosts.host(h).pids()) >= 5 for h in ("h1", "h2", "h3"))  # sshd, session, agent, rank, 2 grandchildren
    run.proc.send_signal(signum)
    assert run.finish() == code
    # Within the grace period and 2 s, every host holds nothing but its sshd (SIGKILL: the agents see EOF).
    assert wait_for(lambda: not hosts.stray_pids(), timeout=1 + 2), hosts.stray_pids()


def test_a_working_directory_full_of_shell_metacharacters_is_used_verbatim(hosts, tmp_path):
    odd = tmp_path / "d;touch${IFS}PWNED;$(id)'q\"ü"
    odd.mkdir()
    done = check(hosts, write_hostfile(tmp_path, f"h1 cwd={shlex.quote(str(odd))}\n"))  # quoted as a shell quotes
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.rglob("PWNED")) and not os.path.exists("PWNED")  # nothing ran as shell
    # and the built-in core really ran there: a missing directory is a one-line error naming it
    missing = check(hosts, write_hostfile(tmp_path, f"h1 cwd={shlex.quote(str(odd) + 'x')}\n"))
    first = failed_line(missing.stderr)
    assert missing.returncode == 3 and "the agent did not start: bash: line 1: cd: " in first and "No such file or directory" in first
    assert first.endswith("fix cwd= for this host in the hostfile (the directory must exist there)")


# --- SSH trust, as strict as OpenSSH's ----------------------------------------------------------


def trust_setup(hosts, tmp_path, user="", system="", extra=""):
    """An ssh config for h2 whose user and system known_hosts files hold ``user`` and ``system``."""
    (tmp_path / "user_known").write_text(user)
    (tmp_path / "system_known").write_text(system)
    config = tmp_path / "trust_config"
    config.write_text(
        f"Host h2\n  HostName {NET}.12\n  User root\n  IdentityFile {hosts.client_key}\n"
        f"  UserKnownHostsFile {tmp_path / 'user_known'}\n  GlobalKnownHostsFile {tmp_path / 'system_known'}\n{extra}"
    )
    return config


def h2_key(hosts):
    return next(line.split()[1:3] for line in open(hosts.known_hosts) if line.startswith(f"{NET}.12 "))


def run_h2(tmp_path, config, *flags, command=("sh", "-c", "echo conn=$SSH_CONNECTION")):
    known = tmp_path / "user_known"
    args = ["run", "--to-completion", "-H", write_hostfile(tmp_path, "h2\n"), "--transport", "ssh", "--ssh-config", str(config)]
    return run_launcher(*args, "--known-hosts", str(known), *flags, "--", *command, timeout=60)


def test_keys_in_the_system_known_hosts_file_are_trusted(hosts, tmp_path):
    kind, blob = h2_key(hosts)
    done = run_h2(tmp_path, trust_setup(hosts, tmp_path, system=f"{NET}.12 {kind} {blob}\n"))
    assert done.returncode == 0, done.stderr


def test_a_key_pinned_with_another_type_makes_any_other_key_a_changed_key_even_when_accepting_new(hosts, tmp_path):
    rsa = tmp_path / "rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(rsa)], check=True)
    kind, blob = (tmp_path / "rsa.pub").read_text().split()[:2]
    done = run_h2(tmp_path, trust_setup(hosts, tmp_path, user=f"{NET}.12 {kind} {blob}\n"), "--accept-new-host-keys")
    assert done.returncode == 3, done.stderr
    assert f"HOST KEY CHANGED for {NET}.12: it presents a ssh-ed25519 key, known_hosts pins ssh-rsa at " in done.stderr
    assert (tmp_path / "user_known").read_text().count("\n") == 1  # nothing recorded


def test_a_revoked_key_is_refused_even_where_it_is_pinned(hosts, tmp_path):
    kind, blob = h2_key(hosts)
    config = trust_setup(hosts, tmp_path, user=f"{NET}.12 {kind} {blob}\n", system=f"@revoked * {kind} {blob}\n")
    done = run_h2(tmp_path, config, "--accept-new-host-keys")
    assert done.returncode == 3 and f"key {NET}.12 presents is REVOKED" in done.stderr, done.stderr


def test_a_host_trusted_only_through_a_certificate_authority_is_refused_with_the_way_out(hosts, tmp_path):
    kind, blob = h2_key(hosts)
    done = run_h2(tmp_path, trust_setup(hosts, tmp_path, system=f"@cert-authority {NET}.* {kind} {blob}\n"))
    assert done.returncode == 3, done.stderr
    assert "trusted through an @cert-authority line" in done.stderr and f"ssh-keyscan {NET}.12 >> " in done.stderr


def test_proxycommand_is_used_and_proxyjump_goes_through_every_hop_in_order(hosts, tmp_path):
    kind, blob = h2_key(hosts)
    user = f"{NET}.12 {kind} {blob}\n"
    via_command = trust_setup(hosts, tmp_path, user=user, extra=f"  ProxyCommand ssh -q -F {hosts.ssh_config} -W %h:%p h1\n")
    done = run_h2(tmp_path, via_command)
    assert done.returncode == 0, done.stderr
    assert f"[r0 h2] conn={NET}.11 " in done.stdout  # h2's sshd saw the connection come from h1
    # ProxyJump h1,h3: through h1, then h3; h2 sees h3.
    jumps = trust_setup(hosts, tmp_path, user=user, extra="  ProxyJump h1,h3\n")
    jumps.write_text(jumps.read_text() + open(hosts.ssh_config).read())
    done = run_h2(tmp_path, jumps)
    assert done.returncode == 0, done.stderr
    assert f"[r0 h2] conn={NET}.13 " in done.stdout


def test_accepting_new_keys_creates_a_private_ssh_directory_like_ssh(hosts, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "plain_config"
    config.write_text(
        f"Host h2\n  HostName {NET}.12\n  User root\n  IdentityFile {hosts.client_key}\n  GlobalKnownHostsFile /nonexistent\n"
    )
    args = ["run", "--to-completion", "-H", write_hostfile(tmp_path, "h2\n"), "--transport", "ssh", "--ssh-config", str(config)]
    done = run_launcher(*args, "--accept-new-host-keys", "--", "true", timeout=60, env={"HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert (os.stat(home / ".ssh").st_mode & 0o777, os.stat(home / ".ssh" / "known_hosts").st_mode & 0o777) == (0o700, 0o600)
    assert (home / ".ssh" / "known_hosts").read_text() == f"{NET}.12 {' '.join(h2_key(hosts))}\n"


def test_a_second_test_run_takes_hosts_of_its_own_and_never_sweeps_a_live_runs(hosts, tmp_path):
    """Two runs of the README's test command at once (two terminals, or a contributor's run beside CI)."""
    here = "import sys; sys.path.insert(0, sys.argv[1]); from support import netns"
    support = os.path.join(os.path.dirname(__file__))
    unnamed = {k: v for k, v in os.environ.items() if k != "LAUNCHER_NETNS_PREFIX"}
    second = subprocess.run([sys.executable, "-c", f"{here}; print(netns.PREFIX)", support], env=unnamed, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() not in ("", PREFIX)  # a prefix, hosts and subnets of its own, taken without being asked
    # Named this run's prefix, a second run may not sweep these live hosts to build its own.
    build = f"{here}; netns.NetnsCluster(1, workdir=sys.argv[2]).up()"
    clash = subprocess.run(
        [sys.executable, "-c", build, support, str(tmp_path / "clash")],
        env={**os.environ, "LAUNCHER_NETNS_PREFIX": PREFIX},
        capture_output=True,
        text=True,
    )
    assert clash.returncode != 0
    assert f"the test hosts {PREFIX}-h* belong to a run that is still going (pid {os.getpid()})" in clash.stderr, clash.stderr[-800:]
    assert "LAUNCHER_NETNS_PREFIX" in clash.stderr.splitlines()[-1]
    for host in hosts.hosts:  # untouched: every host still answers over its own sshd
        assert host.run("true").returncode == 0
    assert check(hosts, write_hostfile(tmp_path, hosts.hostfile(slots=1))).returncode == 0
