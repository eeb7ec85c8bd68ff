"""Usage errors: exit 2, the error on the first line, never a traceback."""

import subprocess

import pytest

from conftest import launcher_cmd, write_hostfile


@pytest.mark.parametrize(
    "args, first_line",
    [
        (["plan", "--env", "NOPE_UNSET_VAR"], "launcher plan: error: argument --env/-e: NOPE_UNSET_VAR is not set in this environment; export it or give NOPE_UNSET_VAR=VALUE"),
        (["run", "--ready-port", "0"], "launcher run: error: argument --ready-port: 0 is not a TCP port (1..65535)"),
        (["run", "--ready-log", "(", "--", "x"], "launcher: error: --ready-log '(' is not a regular expression: missing ), unterminated subpattern at position 0"),
        (["plan", "--", "vllm", "--port={prot}"], "launcher: error: unknown placeholder {prot} in argument 1 of the command ('--port={prot}')"),
        (["run", "--ready-port", "80", "--ready-log", "x"], "launcher run: error: argument --ready-log: not allowed with argument --ready-port"),
        ([], "launcher: error: the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_lead_with_one_line(tmp_path, args, first_line):
    hf = write_hostfile(tmp_path, "localhost slots=2\n")
    done = subprocess.run(launcher_cmd(*args[:1], *(["-H", hf] if args else []), *args[1:]), capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.splitlines()[0].startswith(first_line), done.stderr
    assert "Traceback" not in done.stderr


def test_a_hostfile_error_is_exactly_one_line(tmp_path):
    hf = write_hostfile(tmp_path, "localhost slots=0\n")
    done = subprocess.run(launcher_cmd("check", "-H", hf), capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"launcher: error: {hf}:1: slots must be at least 1, got 0 (line: 'localhost slots=0')"]
