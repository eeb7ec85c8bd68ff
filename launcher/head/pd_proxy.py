"""The P/D proxy the head runs for a prefill/decode job: prefill first, then decode (disagg.py has the protocol).

A small threaded HTTP server from the standard library: ``POST
/v1/completions`` and ``/v1/chat/completions`` go to a prefill instance
(``disagg.prefill_request``), then, with the ``kv_transfer_params`` it
returns, to a decode instance, whose answer is relayed as it comes (a
streamed answer chunk by chunk). ``GET /health`` says how many instances it
routes to. Instances are taken round-robin within each role.

The proxy faces clients, so everything a client can make it hold is bounded
(``ProxyLimits``): connections (one over the cap gets a 503 at once), the
time a connection may sit idle, the bytes of request bodies in memory at
once, and a body's JSON shape (depth and containers) before it is parsed. A
body must say its length and be a JSON object; an upstream that fails is a
502 with the reason in OpenAI's error shape, never a traceback. Only the
prefill's answer may set the decoder's ``kv_transfer_params``: a client's
own would have the decoder pull KV from an address the client chose.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import itertools
import json
import re
import threading
import uuid
from collections.abc import Callable, Sequence

import msgspec

from ..vllm import disagg
from .httpserve import BoundedServer

MAX_BODY = 16 << 20  # a prompt of millions of tokens still fits; a client cannot make the head buffer more
ROUTES = {"/v1/completions", "/v1/chat/completions"}
UPSTREAM_CONNECT = 10.0
UPSTREAM_READ = 600.0  # one generation may take minutes; the client's own timeout ends it sooner
_FORWARDED = ("Authorization", "X-Request-Id")
_UPSTREAM_ERRORS = (OSError, http.client.HTTPException)  # a cut chunked answer is IncompleteRead, not an OSError
_LENGTH = re.compile(r"[0-9]{1,12}")  # ASCII digits only: '²'.isdigit() is true, and int('²') raises


class ProxyLimits(msgspec.Struct, frozen=True):
    """What one client, or many, can make the proxy hold.

    ``backlog``: connections the kernel queues before the proxy accepts them
    (5, the standard library's default, reset a third of 64 concurrent
    clients). ``connections``: accepted at once, each a thread and two
    descriptors (client and upstream); one more is answered 503 and closed.
    ``idle``: seconds a client may take to send a request, or to read a
    reply. ``bodies``: bytes of request bodies held at once. ``depth`` and
    ``containers``: a body's JSON nesting and its lists and objects, checked
    before parsing (16 MiB of ``[]`` is 8 million lists: over a gigabyte).
    """

    backlog: int = 1024
    connections: int = 256
    idle: float = 60.0
    bodies: int = 256 << 20
    depth: int = 64
    containers: int = 20000


class ProxyError(Exception):
    """The proxy cannot listen; the message names the address and the fix."""


class PdProxy:
    """Listens on ``address:port`` and routes to ``prefill`` and ``decode`` ("host:port" each)."""

    def __init__(
        self,
        prefill: Sequence[str],
        decode: Sequence[str],
        address: str,
        port: int,
        note: Callable[[str], None] = print,
        limits: ProxyLimits = ProxyLimits(),
    ):
        self.prefill, self.decode, self.note, self.limits = list(prefill), list(decode), note, limits
        self._next = {"prefill": itertools.cycle(self.prefill), "decode": itertools.cycle(self.decode)}
        self._down: dict[str, str] = {}  # upstream -> why it takes no requests now (its instance is restarting)
        self.requests: collections.Counter[tuple[str, str, bool]] = collections.Counter()  # (role, upstream, ok) -> requests
        self._lock = threading.Lock()
        self._errors = 0
        self._body_bytes = 0
        self._serving: threading.Thread | None = None
        handler = type("Handler", (_Handler,), {"proxy": self, "timeout": limits.idle})
        try:
            self.server = BoundedServer((address, port), handler, backlog=limits.backlog, connections=limits.connections, who="the proxy")
        except OSError as exc:
            raise ProxyError(
                f"the P/D proxy cannot listen on {address}:{port}: {exc.strerror or exc}; give --proxy-port (or --proxy-address)"
            ) from None
        self.address = f"{address}:{self.server.server_address[1]}"

    def start(self) -> None:
        self._serving = self.server.serve_in_background("pd-proxy")

    def close(self) -> None:
        if self._serving is not None:  # shutdown() waits for a serve_forever that has started
            self.server.shutdown()
        self.server.server_close()

    def pick(self, role: str) -> str | None:
        """The next instance of ``role`` round-robin, skipping those down; None when every one is down."""
        with self._lock:
            for _ in range(len(self.prefill if role == "prefill" else self.decode)):
                upstream = next(self._next[role])
                if upstream not in self._down:
                    return upstream
            return None

    def count(self, role: str, upstream: str, ok: bool) -> None:
        with self._lock:
            self.requests[(role, upstream, ok)] += 1

    def set_down(self, upstreams: Sequence[str], why: str) -> None:
        """Route nothing to these until ``set_up``: a request that would need one is answered 503 with ``why``."""
        with self._lock:
            self._down.update(dict.fromkeys(upstreams, why))

    def set_up(self, upstreams: Sequence[str]) -> None:
        with self._lock:
            for upstream in upstreams:
                self._down.pop(upstream, None)

    def health(self) -> tuple[int, dict]:
        """200 while each role has an instance to route to, else 503; with the instances down and why."""
        with self._lock:
            down = dict(self._down)
        routable = all(any(u not in down for u in upstreams) for upstreams in (self.prefill, self.decode))
        document = {
            "status": "ok" if routable else "unavailable",
            "prefill_instances": len(self.prefill),
            "decode_instances": len(self.decode),
            "down": down,
        }
        return (200 if routable else 503), document

    def why_down(self, role: str) -> str:
        with self._lock:
            reasons = [f"{u}: {why}" for u, why in self._down.items() if u in (self.prefill if role == "prefill" else self.decode)]
        return f"no {role} instance takes requests now ({'; '.join(reasons)}); try again"

    @property
    def failures(self) -> int:
        """Requests that failed upstream so far (a client that went away is not one)."""
        return self._errors

    def hold_body(self, size: int) -> bool:
        """Reserve room for a request body of ``size`` bytes; False while bodies already fill ``limits.bodies``."""
        with self._lock:
            if self._body_bytes + size > self.limits.bodies:
                return False
            self._body_bytes += size
            return True

    def release_body(self, size: int) -> None:
        with self._lock:
            self._body_bytes -= size

    def failed(self, message: str) -> None:
        """A request that failed upstream: said once, then every hundredth (a dead decoder fails every request)."""
        with self._lock:
            self._errors += 1
            say = self._errors == 1 or self._errors % 100 == 0
        if say:
            self.note(f"P/D proxy: {message} ({self._errors} failed requests so far)")


class _Handler(http.server.BaseHTTPRequestHandler):
    proxy: PdProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # the job's output is for the job
        pass

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(*self.proxy.health())
        else:
            self._reply(404, _error(f"no route {self.path}; the proxy serves POST {' and '.join(sorted(ROUTES))}"))

    def do_POST(self) -> None:
        self._status_sent = False  # one handler serves every request of a kept-alive connection
        if self.path not in ROUTES:
            self.close_connection = True  # its body is unread
            return self._reply(404, _error(f"no route {self.path}; the proxy serves POST {' and '.join(sorted(ROUTES))}"))
        length = self._body_length()
        if length is None:
            return
        if not self.proxy.hold_body(length):
            self.close_connection = True  # its body is still unread
            return self._reply(503, _error("the proxy holds as many request bodies as it may; try again"), retry=True)
        try:
            body = self._read_json(length)
            if body is not None:
                self._route(body)
        finally:
            self.proxy.release_body(length)

    def _route(self, body: dict) -> None:
        headers = {name: self.headers[name] for name in _FORWARDED if self.headers.get(name)}
        headers.setdefault("X-Request-Id", str(uuid.uuid4()))
        prefill = self.proxy.pick("prefill")
        if prefill is None:
            return self._reply(503, _error(self.proxy.why_down("prefill")), retry=True)
        try:
            status, answer = _post_json(prefill, self.path, disagg.prefill_request(body), headers)
        except _UPSTREAM_ERRORS as exc:
            self.proxy.count("prefill", prefill, False)
            return self._upstream_failed(f"prefill instance {prefill}: {exc}")
        ok = status == 200 and isinstance(answer, dict)
        self.proxy.count("prefill", prefill, ok)
        if not ok:
            return self._upstream_failed(f"prefill instance {prefill} answered {status}", status, answer)
        decode = self.proxy.pick("decode")
        if decode is None:
            return self._reply(503, _error(self.proxy.why_down("decode")), retry=True)
        try:
            self._relay(decode, disagg.decode_request(body, answer), headers)
            self.proxy.count("decode", decode, True)
        except _ClientGone:
            self.close_connection = True  # not the decoder's failure: nobody is left to tell
        except _UPSTREAM_ERRORS as exc:
            self.proxy.count("decode", decode, False)
            if self._status_sent:  # a status line is out: end the connection, the client sees a cut stream
                self.close_connection = True
                self.proxy.failed(f"decode instance {decode}: {exc} (mid-answer)")
            else:
                self._upstream_failed(f"decode instance {decode}: {exc}")

    # --- helpers -------------------------------------------------------------------

    _status_sent = False

    def _body_length(self) -> int | None:
        length = self.headers.get("Content-Length")
        if length is None or not _LENGTH.fullmatch(length.strip()):
            self.close_connection = True
            self._reply(411, _error("the request needs a Content-Length of ASCII digits"))
            return None
        if int(length) > MAX_BODY:
            self.close_connection = True
            self._reply(413, _error(f"the request is over {MAX_BODY} bytes"))
            return None
        return int(length)

    def _read_json(self, length: int) -> dict | None:
        raw = self.rfile.read(length)
        if len(raw) < length:
            self.close_connection = True  # the client went away mid-body
            return None
        problem = json_shape_problem(raw, self.proxy.limits)
        if problem:
            self._reply(400, _error(f"the request body {problem}"))
            return None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            self._reply(400, _error("the request body is not JSON"))
            return None
        if not isinstance(body, dict):
            self._reply(400, _error("the request body is not a JSON object"))
            return None
        return body

    def _relay(self, upstream: str, request: dict, headers: dict) -> None:
        """The decode instance's answer, as it comes: status, type, and the body (chunked when streamed).

        ``_UPSTREAM_ERRORS`` are the upstream's; the client's own going away is ``_ClientGone``."""
        conn = _connection(upstream)
        try:
            conn.request("POST", self.path, json.dumps(request).encode(), {**headers, "Content-Type": "application/json"})
            reply = conn.getresponse()
            length = reply.getheader("Content-Length")
            head = [("Content-Type", reply.getheader("Content-Type", "application/json"))]
            if length is not None:
                data = reply.read()
                self._to_client(reply.status, [*head, ("Content-Length", str(len(data)))], data)
                return
            self._to_client(reply.status, [*head, ("Transfer-Encoding", "chunked")])
            while chunk := reply.read1(65536):
                self._to_client(None, [], b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self._to_client(None, [], b"0\r\n\r\n")
        finally:
            conn.close()

    def _to_client(self, status: int | None, headers: list[tuple[str, str]], data: bytes = b"") -> None:
        """Write to the client (a status line once): its failure is ``_ClientGone``, never an upstream's."""
        try:
            if status is not None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self._status_sent = True
            if data:
                self.wfile.write(data)
                self.wfile.flush()
        except OSError as exc:
            raise _ClientGone() from exc

    def _upstream_failed(self, message: str, status: int = 502, answer=None) -> None:
        self.proxy.failed(message)
        if isinstance(answer, dict) and 400 <= status < 500:
            return self._reply(status, answer)  # the instance's own word on a bad request
        self._reply(502, _error(f"P/D proxy: {message}"))

    def _reply(self, status: int, document: dict, retry: bool = False) -> None:
        data = json.dumps(document).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        try:
            self._to_client(status, [*headers, ("Retry-After", "1")] if retry else headers, data)
        except _ClientGone:
            self.close_connection = True


class _ClientGone(Exception):
    """The client closed its connection, or stopped reading past the idle limit."""


# A JSON string whole (escapes included), a bracket, or a quote that opens a string never closed.
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]|"')


def json_shape_problem(raw: bytes, limits: ProxyLimits) -> str | None:
    """Why ``raw`` would cost too much to parse (nested past ``limits.depth``, or more than
    ``limits.containers`` lists and objects), or None. Brackets inside strings do not count; the
    scan is linear and stops at the first excess."""
    opens = raw.count(b"[") + raw.count(b"{")
    if opens <= limits.depth:
        return None  # neither too deep nor too many, whatever strings hold
    depth = containers = brackets = 0
    for token in _JSON_TOKEN.finditer(raw):
        kind = raw[token.start()]
        if kind == 0x22:  # '"'
            if token.end() - token.start() == 1:
                return "is not JSON (a string is never closed)"
            continue
        brackets += 1
        if brackets > 2 * limits.containers:
            return f"has more than {limits.containers} lists and objects"
        if kind in (0x5B, 0x7B):  # '[' '{'
            depth += 1
            containers += 1
            if depth > limits.depth:
                return f"is nested more than {limits.depth} deep"
            if containers > limits.containers:
                return f"has more than {limits.containers} lists and objects"
        else:
            depth -= 1
    return None


def _connection(upstream: str) -> http.client.HTTPConnection:
    host, _, port = upstream.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=UPSTREAM_CONNECT)
    conn.connect()
    conn.sock.settimeout(UPSTREAM_READ)
    return conn


def _post_json(upstream: str, path: str, request: dict, headers: dict) -> tuple[int, object]:
    conn = _connection(upstream)
    try:
        conn.request("POST", path, json.dumps(request).encode(), {**headers, "Content-Type": "application/json"})
        reply = conn.getresponse()
        data = reply.read(MAX_BODY + 1)
        try:
            return reply.status, json.loads(data)
        except ValueError:
            return reply.status, None
    finally:
        conn.close()


def _error(message: str) -> dict:
    return {"error": {"message": message, "type": "launcher_pd_proxy"}}
