"""User command lines: placeholders filled in, everything else verbatim."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from launcher.command import CommandError, render_template
from launcher.vllm.flags import kv_transfer_engine_id


def test_placeholders_leave_json_and_escaped_braces_alone():
    values = {"rank": "3", "host": "h2"}
    args = ['{"kv_connector":"NixlConnector"}', "{{rank}}", "r{rank}-{host}", "{ rank }", "{host_ip}"]
    assert render_template(args, values, leave=frozenset({"host_ip"})) == (
        '{"kv_connector":"NixlConnector"}',
        "{rank}",
        "r3-h2",
        "{ rank }",
        "{host_ip}",
    )


@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="{}"))))
def test_arguments_without_braces_pass_through_verbatim(args):
    assert render_template(args, {"rank": "0"}) == tuple(args)


def test_an_unknown_placeholder_names_its_argument_and_the_escape():
    with pytest.raises(CommandError) as err:
        render_template(["vllm", "--port={prot}"], {"port": "1"})
    assert str(err.value).startswith("unknown placeholder {prot} in argument 1 of the command ('--port={prot}'); known: {rank}")
    assert str(err.value).endswith("write {{prot}} for a literal {prot}")
    assert render_template(["--port={prot}"], {}, strict=False) == ("--port={prot}",)  # the bootstrap's pass


def test_the_kv_transfer_engine_id_is_read_in_both_spellings():
    assert kv_transfer_engine_id(["serve", "--kv-transfer-config", '{"engine_id": "p0"}']) == "p0"
    assert kv_transfer_engine_id(['--kv-transfer-config={"engine_id": 7, "kv_role": "kv_both"}']) == "7"
    assert kv_transfer_engine_id(["--kv-transfer-config", '{"kv_role": "kv_both"}']) is None
