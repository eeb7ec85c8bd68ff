"""The P/D front end as a real router (``run --router``): vllm-project's ``vllm-router``, or any command.

``--router vllm-router`` writes vllm-router's own P/D flags
(``--vllm-pd-disaggregation --prefill URL ... --decode URL ... --host --port``:
its ``--help``, version 0.1.17); it speaks the NixlConnector's protocol as
launcher's proxy does (prefill with ``do_remote_decode``, then decode with the
``kv_transfer_params`` the prefill returned). ``--router 'CMD ...'`` is any
router, its words taking placeholders: ``{prefill_url}`` and ``{decode_url}``
(the word is repeated once per URL, with the option word before it:
``--prefill {prefill_url}`` -> ``--prefill A --prefill B``, as vllm-router
and SGLang's router take them), ``{prefill_urls}`` and ``{decode_urls}`` (a
word that is only the placeholder becomes one word per URL; inside a longer
word, the URLs joined by commas), ``{address}`` and ``{port}`` (where it
must listen: ``--proxy-address``, ``--proxy-port``).

Pure: text in, argv out; the head's ``head.router_process`` runs it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

VLLM_ROUTER = "vllm-router"
PLACEHOLDERS = ("prefill_url", "decode_url", "prefill_urls", "decode_urls", "address", "port")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]*)\}")


class RouterError(ValueError):
    """A --router that cannot be run; the message names the word at fault and the fix."""


def parse(text: str) -> tuple[str, ...]:
    """``--router``'s value -> the router's argv template, checked: its words, known placeholders only, and
    (for a command of one's own) both URL lists, without which a router cannot route."""
    try:
        words = tuple(shlex.split(text))
    except ValueError as exc:
        raise RouterError(f"--router is not one shell-quoted command ({exc}): {text!r}") from None
    if not words:
        raise RouterError("--router is empty: give vllm-router, or a command with {prefill_url} and {decode_url}")
    if words == (VLLM_ROUTER,):
        return words
    for word in words:
        for name in _PLACEHOLDER.findall(word):
            if name not in PLACEHOLDERS:
                known = " ".join("{" + p + "}" for p in PLACEHOLDERS)
                raise RouterError(f"--router: {{{name}}} in {word!r} is no placeholder; the router's are {known}")
    for role in ("prefill", "decode"):
        if not any(f"{{{role}_url}}" in w or f"{{{role}_urls}}" in w for w in words):
            raise RouterError(
                f"--router {words[0]} ...: the command never names {{{role}_url}} or {{{role}_urls}}, so the router would "
                f"not know the instances; pass them, e.g. --router '{words[0]} --prefill {{prefill_url}} --decode {{decode_url}}'"
            )
        if sum(f"{{{role}_url}}" in w for w in words) > 1 or any(
            f"{{{role}_url}}" in w and "{" in w.replace(f"{{{role}_url}}", "") for w in words
        ):
            raise RouterError(f"--router: {{{role}_url}} repeats its word once per URL: give it in one word, with no other placeholder")
    return words


def router_argv(
    template: Sequence[str], prefill: Sequence[str], decode: Sequence[str], address: str, port: int, metrics_port: int = 0
) -> list[str]:
    """The router's command line for these instance URLs (``http://host:port``), listening on ``address:port``;
    vllm-router's Prometheus endpoint on ``metrics_port`` (its default, 29000, would be one port for every job
    on the machine: the second router would fail to bind it)."""
    if tuple(template) == (VLLM_ROUTER,):
        urls = [w for url in prefill for w in ("--prefill", url)] + [w for url in decode for w in ("--decode", url)]
        metrics = ["--prometheus-host", address, "--prometheus-port", str(metrics_port)] if metrics_port else []
        return [VLLM_ROUTER, "--vllm-pd-disaggregation", *urls, "--host", address, "--port", str(port), *metrics]
    lists = {"prefill_urls": list(prefill), "decode_urls": list(decode)}
    each = {"prefill_url": list(prefill), "decode_url": list(decode)}
    values = {"prefill_urls": ",".join(prefill), "decode_urls": ",".join(decode), "address": address, "port": str(port)}
    argv: list[str] = []
    for i, word in enumerate(template):
        repeated = next((name for name in each if "{" + name + "}" in word), None)
        option = i > 0 and template[i - 1].startswith("-") and not _PLACEHOLDER.search(template[i - 1])
        if repeated is not None:
            if option:
                argv.pop()  # the option word goes before every URL
            for url in each[repeated]:
                argv += [template[i - 1]] if option else []
                argv.append(word.replace("{" + repeated + "}", url))
            continue
        whole = _PLACEHOLDER.fullmatch(word)
        if whole and whole.group(1) in lists:
            argv += lists[whole.group(1)]
        else:
            argv.append(_PLACEHOLDER.sub(lambda m: values[m.group(1)], word))
    return argv
