"""Usage errors: exit 2, the error on the first line, never a traceback."""

import pytest

from conftest import run_launcher, write_hostfile


@pytest.mark.parametrize(
    "args, first_line",
    [
        (
            ["plan", "--env", "NOPE_UNSET_VAR"],
            "launcher plan: error: argument --env/-e: NOPE_UNSET_VAR is not set in this environment; "
            "export it or give NOPE_UNSET_VAR=VALUE",
        ),
        (["run", "--ready-port", "0"], "launcher run: error: argument --ready-port: 0 is not a TCP port (1..65535)"),
        (
            ["run", "--ready-log", "(", "--", "x"],
            "launcher: error: --ready-log '(' is not a regular expression: missing ), unterminated subpattern at position 0",
        ),
        (
            ["plan", "--", "vllm", "--port={prot}"],
            "launcher: error: unknown placeholder {prot} in argument 1 of the command ('--port={prot}')",
        ),
        (
            ["run", "--ready-port", "80", "--ready-log", "x"],
            "launcher run: error: argument --ready-log: not allowed with argument --ready-port",
        ),
        ([], "launcher: error: the following arguments are required: COMMAND"),
        (
            ["plan", "--head-command", "vllm 'x", "--", "vllm"],
            'launcher: error: --head-command is not one shell-quoted command (No closing quotation): "vllm \'x"',
        ),
        (
            ["plan", "--env", "X={foo}}"],
            "launcher: error: X='{foo}}' (--env) uses {foo}, which an environment value cannot take",
        ),
        (
            ["plan", "--env", "MY_TOKEN=s3cr3t{x}}"],
            "launcher: error: MY_TOKEN='****' (--env) uses {x}",
        ),
        (
            ["check", "--handshake-timeout", "inf"],
            "launcher check: error: argument --handshake-timeout: inf must be more than 0 and at most 604800 seconds (a week)",
        ),
        (
            ["run", "--ready-timeout", "1e300"],
            "launcher run: error: argument --ready-timeout: 1e300 must be more than 0 and at most 604800 seconds (a week)",
        ),
        (
            ["run", "--ready-url", "localhost:8000/health", "--", "vllm"],
            "launcher: error: --ready-url 'localhost:8000/health' is not an http(s) URL; for example http://{host_ip}:8000/health",
        ),
    ],
)
def test_usage_errors_lead_with_one_line(tmp_path, args, first_line):
    hf = write_hostfile(tmp_path, "localhost slots=2\n")
    done = run_launcher(*args[:1], *(["-H", hf] if args else []), *args[1:], timeout=30)
    assert done.returncode == 2
    assert done.stderr.splitlines()[0].startswith(first_line), done.stderr
    assert "Traceback" not in done.stderr


def test_a_hostfile_error_is_exactly_one_line(tmp_path):
    hf = write_hostfile(tmp_path, "localhost slots=0\n")
    done = run_launcher("check", "-H", hf, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"launcher: error: {hf}:1: slots must be at least 1, got 0 (line: 'localhost slots=0')"]


# --- no traceback for any mistake on the command line ------------------------------

import contextlib  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from launcher import cli  # noqa: E402

HOSTFILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hostfile")
OPTIONS = ["--port-base", "--env", "--env-include", "--ifname", "--cidr", "--head-command", "--rpc-port", "--slots", "--per-host"]
words = st.text(alphabet=st.sampled_from("ab{}_=-'\" 0123456789.:/[]\n"), max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(OPTIONS), words), max_size=4), st.lists(words, max_size=4))
def test_plan_answers_any_command_line_with_a_plan_or_a_one_line_error(options, command):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli.main(["plan", "-H", HOSTFILE, *[w for pair in options for w in pair], "--", *command])
        except SystemExit as exc:
            code = exc.code
    assert code in (0, 2), err.getvalue()
    if code == 2:
        assert err.getvalue().startswith("launcher"), err.getvalue()
        assert "Traceback" not in err.getvalue()
    else:
        assert out.getvalue().startswith("job ")
