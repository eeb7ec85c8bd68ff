"""A rank's way to ready, as the agent sees it: events in, one declaration out, whatever their order."""

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from launcher import protocol, readiness
from launcher.agent.watch import Next, ReadinessWatch

HERE = protocol.Resolved(rank=0, address="198.18.0.11", rule="ifname=eth0")
LOG = readiness.Log(pattern="^Application startup complete")


def test_a_log_rule_is_ready_at_whichever_comes_last_of_its_line_and_its_address():
    line_first = ReadinessWatch(LOG)
    assert not line_first.line("INFO: Application startup complete.")  # not the pattern (anchored)
    assert not line_first.line("Application startup complete.")  # the line, but no address yet
    assert line_first.resolve(HERE) is Next.READY
    address_first = ReadinessWatch(LOG)
    assert address_first.resolve(HERE) is Next.WAIT
    assert not address_first.line("INFO: loading weights")
    assert address_first.line("Application startup complete") and not address_first.line("Application startup complete")


@pytest.mark.parametrize("rule", [readiness.Ports(), readiness.Url(url="http://{host_ip}:8000/health"), readiness.Port(port=8000)])
def test_a_polled_rule_is_probed_once_the_address_is_known_and_declared_once(rule):
    watch = ReadinessWatch(rule)
    assert not watch.probe_held()  # nothing known yet
    assert watch.resolve(HERE) is Next.POLL
    assert watch.probe_held() and not watch.probe_held()


def test_a_rule_that_needs_nothing_more_is_ready_with_its_address():
    assert ReadinessWatch(readiness.WithHead()).resolve(HERE) is Next.POLL  # polled: the head's turn
    assert ReadinessWatch(readiness.Report()).resolve(HERE) is Next.READY


@given(st.permutations(["resolve", "line", "line", "noise"]), st.integers(1, 4))
def test_the_address_and_the_line_racing_on_two_threads_declare_the_rank_exactly_once(order, threads):
    watch = ReadinessWatch(LOG)
    said = []
    steps = {
        "resolve": lambda: said.append(watch.resolve(HERE) is Next.READY),
        "line": lambda: said.append(watch.line("Application startup complete")),
        "noise": lambda: said.append(watch.line("nothing to see")),
    }
    runners = [threading.Thread(target=steps[step]) for step in order for _ in range(threads)]
    for t in runners:
        t.start()
    for t in runners:
        t.join()
    assert said.count(True) == 1


def test_what_was_declared_is_what_peers_are_probed_from():
    watch = ReadinessWatch(readiness.Report())
    assert watch.ready is None
    ready = protocol.Ready(rank=0, address=HERE.address, port=5600, pid=1, rule=HERE.rule, engine_id="e-dp0")
    watch.declared(ready)  # a built-in core's own word
    assert watch.ready == ready and watch.resolve(HERE) is Next.WAIT  # already declared: never twice
