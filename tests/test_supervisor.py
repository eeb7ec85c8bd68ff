"""The head's I/O half, against scripted agents: ``HostLink`` (one host's threads) and ``Supervisor`` (the loop).

No processes, no SSH: ``support.scripted`` plays each agent from a script, so
what the head does with noise, a link cut mid-line, a full event queue, the
heartbeat clock or a lost host is shown in milliseconds, and each case can
fail only through the head's own code.
"""

import queue
import threading
import time

import pytest

from launcher import plan as planning
from launcher import protocol
from launcher.head import job as jobs
from launcher.head.link import HostLink
from launcher.head.reporter import Reporter
from launcher.head.supervisor import Supervisor
from launcher.host import Host
from launcher.plan import LaunchOptions
from launcher.results import FailureKind, Phase
from support.scripted import ScriptedTransport, hello, serve_ranks


def make_plan(hosts=2, slots=1, **options):
    return planning.build([Host(f"h{i}", slots=slots) for i in range(hosts)], LaunchOptions(**options), {}, "j")


def events_of(link_queue: queue.Queue, until: type, timeout: float = 5.0) -> list:
    """What a link put on the queue, up to and including the first ``until``."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, event = link_queue.get(timeout=0.1)
        except queue.Empty:
            continue
        seen.append(event)
        if isinstance(event, until):
            return seen
    raise AssertionError(f"no {until.__name__} within {timeout}s; saw {seen}")


class Told(Reporter):
    """A reporter that keeps what it was told."""

    def __init__(self):
        self.lines: list[str] = []

    def progress(self, text: str) -> None:
        self.lines.append(text)


# --- HostLink --------------------------------------------------------------------------------------


def test_a_link_turns_noise_and_a_line_cut_short_into_events_and_ends_with_the_agents_last_words():
    def script(agent):
        agent.receive()
        agent.say(protocol.Hello(hostname="h0", pid=1, python="p", version="v"))
        agent.say_raw(b"Welcome to h0! (motd)\n")
        agent.say_raw(b'{"type":"started","ra')  # the connection drops mid-message
        agent._stderr.append("Connection to h0 closed by remote host.")
        agent.end(255)

    plan, events = make_plan(hosts=1), queue.Queue()
    link = HostLink(0, plan.hosts[0], ScriptedTransport(script), events)
    link.start(
        lambda: protocol.AgentSpec(
            job_id="j", host="h0", host_index=0, host_is_loopback=False, ranks=[], grace=1, heartbeat_interval=1, heartbeat_timeout=5
        )
    )
    seen = events_of(events, jobs.LinkClosed)
    kinds = [type(e).__name__ for e in seen]
    assert kinds == ["LinkOpened", "Hello", "Noise", "Noise", "LinkClosed"]
    assert seen[2].text == "Welcome to h0! (motd)" and seen[3].text == '{"type":"started","ra'
    assert seen[-1].last_words == ("Connection to h0 closed by remote host.",)


def test_a_transport_that_cannot_start_the_agent_becomes_that_hosts_link_failure():
    plan, events = make_plan(hosts=1), queue.Queue()
    link = HostLink(0, plan.hosts[0], ScriptedTransport(serve_ranks, refuse=frozenset({"h0"})), events)
    link.start(lambda: None)
    (failed,) = events_of(events, jobs.LinkFailed)
    assert failed.message == "h0: connection refused (scripted); check that sshd runs there"


def test_a_job_over_before_the_spec_could_go_abandons_the_link_and_closes_the_agents_input():
    transport, events = ScriptedTransport(serve_ranks), queue.Queue()
    link = HostLink(0, make_plan(hosts=1).hosts[0], transport, events)
    link.start(lambda: None)
    assert [type(e) for e in events_of(events, jobs.LinkAbandoned)] == [jobs.LinkOpened, jobs.LinkAbandoned]
    (agent,) = transport.agents("h0")
    assert agent.stdin_closed.is_set() and agent.sent == []  # no spec ever reached it


def test_a_full_event_queue_holds_the_reader_back_without_dropping_a_line_until_released():
    def script(agent):
        agent.receive()
        for i in range(50):
            agent.say(protocol.Output(rank=0, stream="stdout", line=f"line {i}"))
        agent.end()

    events = queue.Queue(maxsize=5)
    link = HostLink(0, make_plan(hosts=1).hosts[0], ScriptedTransport(script), events)
    link.start(
        lambda: protocol.AgentSpec(
            job_id="j", host="h0", host_index=0, host_is_loopback=False, ranks=[], grace=1, heartbeat_interval=1, heartbeat_timeout=5
        )
    )
    time.sleep(0.3)
    assert events.full()  # the reader waits: 50 lines are not 50 events in memory
    lines = [e.line for e in events_of(events, jobs.LinkClosed) if isinstance(e, protocol.Output)]
    assert lines == [f"line {i}" for i in range(50)]  # in order, none lost

    stuck = HostLink(0, make_plan(hosts=1).hosts[0], ScriptedTransport(script), queue.Queue(maxsize=1))
    stuck.start(
        lambda: protocol.AgentSpec(
            job_id="j", host="h0", host_index=0, host_is_loopback=False, ranks=[], grace=1, heartbeat_interval=1, heartbeat_timeout=5
        )
    )
    time.sleep(0.3)
    stuck.released.set()  # nobody reads any more: the reader drops what it holds and ends
    stuck.close()
    stuck.join(timeout=3.0)
    assert not any(t.is_alive() for t in stuck.threads)


@pytest.mark.parametrize("kills_agent", [False, True])
def test_finish_terminates_an_agent_that_does_not_exit_and_says_whether_a_sweep_is_due(kills_agent):
    transport = ScriptedTransport(lambda agent: agent.hang(), kills_agent=kills_agent)
    link = HostLink(0, make_plan(hosts=1).hosts[0], transport, queue.Queue())
    link.start(
        lambda: protocol.AgentSpec(
            job_id="j", host="h0", host_index=0, host_is_loopback=False, ranks=[], grace=1, heartbeat_interval=1, heartbeat_timeout=5
        )
    )
    time.sleep(0.2)
    link.close()
    assert link.finish(gone=True) is kills_agent
    assert transport.agents("h0")[0].terminated.is_set()


def test_a_sweep_is_a_fresh_agent_told_the_job_id_and_its_report_names_the_pids():
    def script(agent):
        order = agent.receive()
        if isinstance(order, protocol.Sweep) and order.job_id == "j":
            agent.say(protocol.Swept(pids=[4242, 4243]))

    told, transport = [], ScriptedTransport(script)
    link = HostLink(0, make_plan(hosts=1).hosts[0], transport, queue.Queue())
    link.sweep("j", told.append)
    first = link.sweeper
    link.sweep("j", told.append)  # the job's loss and the stop's kill both ask: one sweep, whose report is waited for
    assert link.sweeper is first
    link.sweeper.join(5.0)
    assert told == ["swept 2 processes this job left on h0 (pids 4242 4243)"] and len(transport.agents("h0")) == 1


# --- Supervisor ----------------------------------------------------------------------------------------


def test_a_job_of_scripted_agents_gets_ready_stops_on_request_and_returns_every_ranks_end():
    transport, told = ScriptedTransport(serve_ranks), Told()
    sup = Supervisor(make_plan(hosts=3, slots=2), transport, told)
    sup.start()
    assert sup.wait_ready(timeout=10.0)
    assert [r.phase for r in sup.ranks.values()] == [Phase.READY] * 6
    assert {r.address for r in sup.ranks.values()} == {"127.0.0.1", "127.0.0.2", "127.0.0.3"}
    result = sup.stop("job finished")
    assert result.ok and result.exit_code == 0 and result.job_id == "j"
    assert [(r.state, r.exit_code) for r in result.ranks] == [(Phase.EXITED, -15)] * 6
    for host in ("h0", "h1", "h2"):
        (agent,) = transport.agents(host)  # no sweep: every agent exited by itself
        assert isinstance(agent.sent[0], protocol.AgentSpec) and any(isinstance(m, protocol.Stop) for m in agent.sent)
    assert told.lines[0].startswith("job j: starting 6 ranks on 3 hosts (scripted)")


def test_heartbeats_run_on_their_own_clock_and_a_silent_agent_is_lost_without_a_sweep():
    def silent_after_hello(agent):
        spec = agent.receive()
        if spec.host_index == 1:
            agent.say(hello(spec, "127.0.0.2"))
            agent.hang()  # then nothing, ever: a partitioned host
            return
        serve_ranks_from(agent, spec)

    transport = ScriptedTransport(silent_after_hello)
    sup = Supervisor(make_plan(hosts=2, heartbeat_interval=0.1, heartbeat_timeout=0.6), transport, Told())
    sup.start()
    t0 = time.monotonic()
    assert not sup.wait_ready(timeout=10.0)
    took = time.monotonic() - t0
    assert sup.failure.kind is FailureKind.HOST_LOST and sup.failure.host == "h1"
    assert "no word from its agent" in sup.failure.message and took < 5.0
    (h0,) = transport.agents("h0")
    beats = sum(isinstance(m, protocol.Heartbeat) for m in h0.sent)
    assert beats >= 3  # the healthy host heard the head every 0.1 s while the pump waited
    sup.stop("lost")
    assert len(transport.agents("h1")) == 1  # silence is no evidence of ranks to sweep


def test_an_agent_that_dies_with_ranks_running_has_its_host_swept():
    swept = threading.Event()

    def dies(agent):
        spec = agent.receive()
        if isinstance(spec, protocol.Sweep):
            agent.say(protocol.Swept(pids=[777]))
            swept.set()
            return
        if spec.host_index == 0:
            serve_ranks_from(agent, spec)
            return
        agent.say(hello(spec, "127.0.0.2"))
        agent.say(protocol.Started(rank=spec.ranks[0].identity.rank, pid=9))
        agent.end(137)  # SIGKILLed: its rank runs on, unreported

    transport, told = ScriptedTransport(dies), Told()
    sup = Supervisor(make_plan(hosts=2), transport, told)
    sup.start()
    assert not sup.wait_ready(timeout=10.0)
    assert sup.failure.kind is FailureKind.HOST_LOST
    sup.stop("lost")
    assert swept.wait(5.0) and "swept 1 processes this job left on h1 (pids 777)" in told.lines


def serve_ranks_from(agent, spec):
    """``serve_ranks`` for an agent whose spec the script already read."""
    agent._to_agent.queue.appendleft(spec)
    serve_ranks(agent)
