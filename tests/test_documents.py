"""--json: one JSON document on stdout (launcher.plan/1, launcher.result/1), people's text on stderr."""

import json
import signal
import subprocess

import pytest

from conftest import launcher_cmd, port_taken, run_launcher, wait_for, write_hostfile
from launcher import plan
from launcher.check import CheckMatrix
from launcher.output import documents
from launcher.plan import Host, LaunchOptions
from launcher.protocol import CheckResult, TransferResult
from launcher.results import Failure, FailureKind, LaunchResult, Phase, RankResult


def test_the_plan_document_says_where_each_process_runs_and_why_each_variable_is_there():
    hosts = [Host("a", slots=2, env=(("HF_TOKEN", "hf_secret_value"),)), Host("b", python="/opt/py/bin/python3")]
    built = plan.build(hosts, LaunchOptions(), {"VLLM_HOST_IP": "10.0.0.1", "NCCL_DEBUG": "INFO"}, "j1")
    doc = json.loads(json.dumps(documents.plan_document(built, "/usr/bin/python3")))
    assert (doc["schema"], doc["job_id"], doc["world_size"], doc["port_base"]) == ("launcher.plan/1", "j1", 3, 5600)
    a, b = doc["hosts"]
    assert [p["ports"] for p in a["processes"]] == [[5600], [5601]] and b["processes"][0]["ports"] == [5602]
    assert b["processes"][0]["argv"] == ["/opt/py/bin/python3", "-m", "launcher.engine_core"]  # the host's python=
    assert a["processes"][0]["argv"][0] == "/usr/bin/python3"
    first = a["processes"][0]
    assert first["env"]["HF_TOKEN"] != "hf_secret_value" and "hf_secret_value" not in json.dumps(doc)  # masked
    assert "VLLM_HOST_IP" in first["dropped"] and "VLLM_HOST_IP" not in first["env"]  # the seed bug, in data
    assert first["copied"]["NCCL_DEBUG"] and first["env"]["NCCL_DEBUG"] == "INFO"


def test_the_result_document_lists_every_expected_pair_with_its_outcome():
    matrix = CheckMatrix((0, 1), {0: "v2", 1: "v2"}, {0: "a", 1: "b"})
    matrix.add(CheckResult(rank=0, peer=1, ok=True, latency_ms=1.5))
    matrix.add(CheckResult(rank=1, peer=0, ok=False, error="198.18.0.11:5600: connect timed out after 2s"))
    transfers = CheckMatrix((0, 1), {}, {0: "a", 1: "b"}, transfer_bytes=4096)
    transfers.add(TransferResult(rank=0, peer=1, ok=True, latency_ms=3.0, mbps=812.5, used="software emulation tcp/eth0"))
    rank = RankResult(0, "a", "198.18.0.11", 5600, 42, Phase.EXITED, 0, None, 0.1234567, 0.5, 1.0)
    failure = Failure(FailureKind.CHECK, "1 of 4 pairs failed the check", 5)
    doc = json.loads(json.dumps(documents.result_document(LaunchResult((rank,), failure, matrix, 1.23456, transfers))))
    assert (doc["ok"], doc["exit_code"], doc["failure"]["kind"], doc["duration"]) == (False, 5, "check", 1.235)
    assert doc["ranks"][0]["state"] == "exited" and doc["ranks"][0]["started_at"] == 0.123
    pairs = {(p["from"], p["to"]): p for p in doc["check"]["pairs"]}
    assert pairs[(0, 1)] == {"from": 0, "to": 1, "ok": True, "latency_ms": 1.5}
    assert pairs[(1, 0)]["error"].endswith("connect timed out after 2s")
    assert pairs[(0, 0)] == {"from": 0, "to": 0, "ok": False, "error": "no result"}
    assert doc["transfer"]["pairs"] == [
        {"from": 0, "to": 1, "ok": True, "latency_ms": 3.0, "mbps": 812.5, "used": "software emulation tcp/eth0"},
        {"from": 1, "to": 0, "ok": False, "error": "no result"},
    ]


@pytest.mark.e2e
def test_check_json_is_the_only_thing_on_stdout(tmp_path, no_leaks, port_base):
    done = run_launcher("check", "-H", write_hostfile(tmp_path, "localhost slots=2"), "--port-base", str(port_base), "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)  # the whole of stdout: rank output and tables went to stderr
    assert doc["ok"] and doc["exit_code"] == 0 and doc["failure"] is None
    assert done.stderr.startswith(f"launcher: job {doc['job_id']}: starting 2 ranks on 1 hosts")  # the id comes first
    assert f"engine core {doc['job_id']}-dp0 listening" in done.stderr
    assert [(r["rank"], r["port"], r["state"]) for r in doc["ranks"]] == [(0, port_base, "exited"), (1, port_base + 1, "exited")]
    assert len(doc["check"]["pairs"]) == 4 and all(p["ok"] for p in doc["check"]["pairs"])
    assert "handshake latency" in done.stderr and "listening on" in done.stderr


@pytest.mark.e2e
def test_a_failed_launch_is_a_document_too_with_the_process_exit_code(tmp_path, no_leaks, port_base):
    with port_taken(port_base + 1):
        done = run_launcher("check", "-H", write_hostfile(tmp_path, "localhost slots=2"), "--port-base", str(port_base), "--json")
    doc = json.loads(done.stdout)
    assert done.returncode == doc["exit_code"] == doc["failure"]["exit_code"] != 0
    assert doc["failure"]["rank"] == 1 and str(port_base + 1) in doc["failure"]["message"]
    assert doc["check"] is None


def sigterm_document(command, tmp_path, port_base, after):
    """The --json document and exit code of ``launcher COMMAND`` sent SIGTERM once a stderr line holds ``after``."""
    argv = launcher_cmd(command, "-H", write_hostfile(tmp_path, "localhost slots=2"), "--port-base", str(port_base), "--json")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = []
    wait_for(lambda: err.append(proc.stderr.readline()) or after in err[-1], timeout=30)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return json.loads(out), proc.returncode


@pytest.mark.e2e
def test_a_run_stopped_by_sigterm_reports_143_in_its_document(tmp_path, no_leaks, port_base):
    doc, code = sigterm_document("run", tmp_path, port_base, after="ranks ready 2/2")
    assert code == doc["exit_code"] == 143
    assert (doc["ok"], doc["stopped_by"]) == (False, "SIGTERM")  # stopped is not "ok": the process says 143
    assert all(r["state"] == "exited" for r in doc["ranks"])


@pytest.mark.e2e
def test_a_check_stopped_before_it_ran_is_no_passed_check(tmp_path, no_leaks, port_base):
    doc, code = sigterm_document("check", tmp_path, port_base, after="agents connected")
    assert code == doc["exit_code"] == 143
    assert doc["ok"] is False and doc["stopped_by"] == "SIGTERM"
    assert doc["check"] is None or not doc["check"]["ok"]  # not run, or cut short: never a passed check
