"""The P/D proxy the head runs for a prefill/decode job: prefill first, then decode (disagg.py has the protocol).

A small threaded HTTP server from the standard library: ``POST
/v1/completions`` and ``/v1/chat/completions`` go to a prefill instance
(``disagg.prefill_request``), then, with the ``kv_transfer_params`` it
returns, to a decode instance, whose answer is relayed as it comes (a
streamed answer chunk by chunk). ``GET /health`` says how many instances it
routes to. Instances are taken round-robin within each role.

The proxy faces clients: a body must say its length and stay under
``MAX_BODY``, be a JSON object, and an upstream that fails is a 502 with the
reason in OpenAI's error shape, never a traceback.
"""

from __future__ import annotations

import http.client
import http.server
import itertools
import json
import threading
import uuid
from collections.abc import Callable, Sequence

from . import disagg

MAX_BODY = 16 << 20  # a prompt of millions of tokens still fits; a client cannot make the head buffer more
ROUTES = {"/v1/completions", "/v1/chat/completions"}
UPSTREAM_CONNECT = 10.0
UPSTREAM_READ = 600.0  # one generation may take minutes; the client's own timeout ends it sooner
_FORWARDED = ("Authorization", "X-Request-Id")


class ProxyError(Exception):
    """The proxy cannot listen; the message names the address and the fix."""


class PdProxy:
    """Listens on ``address:port`` and routes to ``prefill`` and ``decode`` ("host:port" each)."""

    def __init__(self, prefill: Sequence[str], decode: Sequence[str], address: str, port: int, note: Callable[[str], None] = print):
        self.prefill, self.decode, self.note = list(prefill), list(decode), note
        self._next = {"prefill": itertools.cycle(self.prefill), "decode": itertools.cycle(self.decode)}
        self._lock = threading.Lock()
        self._errors = 0
        handler = type("Handler", (_Handler,), {"proxy": self})
        try:
            self.server = http.server.ThreadingHTTPServer((address, port), handler)
        except OSError as exc:
            raise ProxyError(
                f"the P/D proxy cannot listen on {address}:{port}: {exc.strerror or exc}; give --proxy-port (or --proxy-address)"
            ) from None
        self.server.daemon_threads = True
        self.address = f"{address}:{self.server.server_address[1]}"

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, daemon=True, name="pd-proxy").start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def pick(self, role: str) -> str:
        with self._lock:
            return next(self._next[role])

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
            self._reply(200, {"status": "ok", "prefill_instances": len(self.proxy.prefill), "decode_instances": len(self.proxy.decode)})
        else:
            self._reply(404, _error(f"no route {self.path}; the proxy serves POST {' and '.join(sorted(ROUTES))}"))

    def do_POST(self) -> None:
        if self.path not in ROUTES:
            return self._reply(404, _error(f"no route {self.path}; the proxy serves POST {' and '.join(sorted(ROUTES))}"))
        body = self._read_json()
        if body is None:
            return
        headers = {name: self.headers[name] for name in _FORWARDED if self.headers.get(name)}
        headers.setdefault("X-Request-Id", str(uuid.uuid4()))
        prefill = self.proxy.pick("prefill")
        try:
            status, answer = _post_json(prefill, self.path, disagg.prefill_request(body), headers)
        except OSError as exc:
            return self._upstream_failed(f"prefill instance {prefill}: {exc}")
        if status != 200 or not isinstance(answer, dict):
            return self._upstream_failed(f"prefill instance {prefill} answered {status}", status, answer)
        decode = self.proxy.pick("decode")
        try:
            self._relay(decode, disagg.decode_request(body, answer), headers)
        except OSError as exc:
            self._upstream_failed(f"decode instance {decode}: {exc}")

    # --- helpers -------------------------------------------------------------------

    def _read_json(self) -> dict | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._reply(411, _error("the request needs a Content-Length"))
            return None
        if int(length) > MAX_BODY:
            self._reply(413, _error(f"the request is over {MAX_BODY} bytes"))
            return None
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            self._reply(400, _error("the request body is not JSON"))
            return None
        if not isinstance(body, dict):
            self._reply(400, _error("the request body is not a JSON object"))
            return None
        return body

    def _relay(self, upstream: str, request: dict, headers: dict) -> None:
        """The decode instance's answer, as it comes: status, type, and the body (chunked when streamed)."""
        conn = _connection(upstream)
        try:
            conn.request("POST", self.path, json.dumps(request).encode(), {**headers, "Content-Type": "application/json"})
            reply = conn.getresponse()
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.getheader("Content-Type", "application/json"))
            length = reply.getheader("Content-Length")
            if length is not None:
                self.send_header("Content-Length", length)
                self.end_headers()
                self.wfile.write(reply.read())
                return
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while chunk := reply.read1(65536):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        finally:
            conn.close()

    def _upstream_failed(self, message: str, status: int = 502, answer=None) -> None:
        self.proxy.failed(message)
        if isinstance(answer, dict) and 400 <= status < 500:
            return self._reply(status, answer)  # the instance's own word on a bad request
        self._reply(502, _error(f"P/D proxy: {message}"))

    def _reply(self, status: int, document: dict) -> None:
        data = json.dumps(document).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client went away


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
