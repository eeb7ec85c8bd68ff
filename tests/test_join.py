"""Agents that another system starts dial in to the head (``--transport join``), on namespace hosts.

Nothing here goes through SSH: each host's agent is started by hand in its
namespace, as a Kubernetes pod or a systemd unit would start it, and joins
the head on the test network with the job's token.
"""

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import launcher_cmd, wait_for, write_hostfile
from launcher import protocol
from launcher.host import Host
from launcher.transports.join import JoinTransport
from support.netns import NET

HEAD = f"{NET}.1"  # the head's own address on the test network


class JoiningJob:
    """``launcher COMMAND --transport join`` in the background, and the agents started by hand on the hosts."""

    def __init__(self, command, hostfile, *extra, token):
        env = {**os.environ, "LAUNCHER_JOIN_TOKEN": token}
        argv = launcher_cmd(command, "-H", hostfile, "--transport", "join", "--join-listen", f"{HEAD}:0", *extra)
        self.head = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.stderr: list[str] = []
        line = wait_for(lambda: self._line_with("join: listening on"), timeout=30)
        assert line, f"the head never said where it listens: {self.stderr}"
        self.where = re.search(r"listening on (\S+) ", line).group(1)
        self.agents: list[subprocess.Popen] = []

    def _line_with(self, text):
        self.stderr.append(self.head.stderr.readline())
        return self.stderr[-1] if text in self.stderr[-1] else None

    def join(self, host, token):
        """Start ``host``'s agent in its namespace, as the other system would."""
        agent = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, sys.executable, "-m", "launcher.agent", "--join", self.where, "--host", host.name],
            env={**os.environ, "LAUNCHER_JOIN_TOKEN": token},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.agents.append(agent)
        return agent

    def finish(self, timeout=60):
        out, err = self.head.communicate(timeout=timeout)
        self.stderr += err.splitlines()
        for agent in self.agents:
            agent.wait(timeout=30)
        return self.head.returncode, out


@pytest.mark.e2e
def test_agents_started_by_hand_join_and_every_rank_binds_its_own_hosts_address(hosts, tmp_path, port_base):
    token = secrets.token_hex(16)
    hf = write_hostfile(tmp_path, hosts.hostfile(slots=2))
    job = JoiningJob("check", hf, "--port-base", str(port_base), "--json", token=token)
    for host in hosts.hosts:
        job.join(host, token)
    code, out = job.finish()
    doc = json.loads(out)
    assert code == 0 and doc["ok"] and doc["check"]["ok"], job.stderr[-10:]
    assert {(r["host"], r["address"]) for r in doc["ranks"]} == {(h.name, h.address) for h in hosts.hosts}
    assert all(r["state"] == "exited" for r in doc["ranks"]) and len(doc["ranks"]) == 6
    assert all(agent.returncode == 0 for agent in job.agents)  # each left when the head was done with it
    assert token not in "\n".join(job.stderr) + out  # never printed


@pytest.mark.e2e
def test_an_agent_with_the_wrong_token_is_refused_and_its_host_named_in_the_jobs_one_line_error(hosts, tmp_path, port_base):
    token = secrets.token_hex(16)
    hf = write_hostfile(tmp_path, hosts.hostfile(slots=1))
    job = JoiningJob("run", hf, "--port-base", str(port_base), "--join-timeout", "4", token=token)
    good = [job.join(h, token) for h in hosts.hosts[:2]]
    impostor = job.join(hosts.hosts[2], secrets.token_hex(16))
    assert impostor.wait(timeout=30) == 2
    assert "the head refused this join: a wrong token for h3" in impostor.stderr.read()
    code, _ = job.finish()
    said = "\n".join(job.stderr)
    assert code == 3, said  # a host that never joined: lost, as one SSH cannot reach
    assert re.search(rf"join: refused {re.escape(hosts.hosts[2].address)}:\d+: a wrong token for h3", said)
    assert "h3 (" in said and "no agent joined within 4s" in said
    assert all(agent.returncode == 0 for agent in good)  # the joined ones were told to go


def test_join_without_a_token_or_an_address_is_a_one_line_error(tmp_path):
    hf = write_hostfile(tmp_path, "a\n")
    env = {k: v for k, v in os.environ.items() if k != "LAUNCHER_JOIN_TOKEN"}
    for extra, expected in (
        (["--join-listen", "127.0.0.1:0"], "launcher: error: --transport join needs LAUNCHER_JOIN_TOKEN (at least 16 characters)"),
        ([], "launcher: error: --transport join needs --join-listen ADDR:PORT"),
    ):
        done = subprocess.run(
            launcher_cmd("run", "-H", hf, "--transport", "join", *extra), capture_output=True, text=True, env=env, timeout=30
        )
        assert done.returncode == 2 and done.stderr.startswith(expected), done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "name, message",
    [("no.such.module:Backend", "cannot import no.such.module"),
     ("launcher.plan:LaunchPlan", "is not a launcher.transports.Transport subclass"),
     ("nosuch", "unknown transport 'nosuch'")],
)  # fmt: skip
def test_a_backend_from_another_package_is_named_module_colon_class_and_a_wrong_one_is_one_line(tmp_path, name, message):
    hf = write_hostfile(tmp_path, "localhost\n")
    done = subprocess.run(launcher_cmd("run", "-H", hf, "--transport", name, "--", "true"), capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stderr.startswith("launcher: error: ") and message in done.stderr.splitlines()[0], done.stderr


def test_a_backend_from_another_package_runs_a_job(tmp_path):
    """A Transport subclass outside launcher, named on the command line, starts the agents."""
    (tmp_path / "mybackend.py").write_text(
        "from launcher.transports.local import LocalTransport\nclass Mine(LocalTransport):\n    name = 'mine'\n"
    )
    hf = write_hostfile(tmp_path, "localhost slots=2\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        launcher_cmd("run", "-H", hf, "--transport", "mybackend:Mine", "--to-completion", "--json", "--", "true"),
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "starting 2 ranks on 1 hosts (mine)" in done.stderr
    assert json.loads(done.stdout)["ok"]


# --- hostile peers at the join port ---------------------------------------------------------------


@pytest.fixture(scope="module")
def join_port():
    """A join backend waiting for host "a" on loopback, fuzzed across examples."""
    token = secrets.token_hex(16)
    transport = JoinTransport("127.0.0.1:0", token)
    said = []
    transport.say = said.append
    transport.prepare([Host("a")])
    yield transport, token, said
    transport.close()


def knock(port, data: bytes) -> bytes:
    """Connect, read the challenge, send ``data``, return everything the head answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        challenge = sock.makefile("rb").readline()
        assert isinstance(protocol.decode(challenge), protocol.Challenge)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return b""
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=6000),
        st.builds(lambda host, proof: protocol.encode(protocol.Join(host=host, proof=proof)), st.text(max_size=300), st.text(max_size=80)),
    )
)
def test_no_bytes_a_peer_sends_win_a_join_or_cost_the_head_more_than_a_refusal(join_port, data):
    transport, _, said = join_port
    answer = knock(transport.port, data)
    assert transport._waiting["a"].empty()  # nothing but the token's proof joins
    if answer:
        refusal = protocol.decode(answer.splitlines()[0])
        assert isinstance(refusal, protocol.AgentError) and refusal.message.startswith("the head refused this join: ")
    assert all(len(line) < 400 and "\n" not in line for line in said)  # a peer's bytes never flood the terminal


def test_after_the_fuzz_the_rightful_agent_still_joins(join_port):
    transport, token, said = join_port
    pending = threading.active_count()
    with socket.create_connection(("127.0.0.1", transport.port), timeout=10) as sock:
        challenge = protocol.decode(sock.makefile("rb").readline())
        sock.sendall(protocol.encode(protocol.Join(host="a", proof=protocol.join_proof(token, challenge.nonce, "a"))))
        conn = transport.start(Host("a"))
        assert conn.peer == "127.0.0.1" and transport.reached_address(Host("a")) == "127.0.0.1"
        conn.send(b"hello agent\n")
        assert sock.makefile("rb").readline() == b"hello agent\n"  # the connection is now the agent's stdin
    assert wait_for(lambda: threading.active_count() <= pending, timeout=5)  # no handshake thread left behind


@pytest.mark.parametrize("where", ["127.0.0.1:99999", "127.0.0.1", ":80", "[::1]:x"])
def test_an_agent_given_a_bad_join_address_says_so_in_one_line(where):
    done = subprocess.run(
        [sys.executable, "-m", "launcher.agent", "--join", where, "--host", "a"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "LAUNCHER_JOIN_TOKEN": "0123456789abcdef"},
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr == f"launcher agent: --join {where!r}: give the head's ADDRESS:PORT (its --join-listen)\n"
