"""A threaded HTTP server from the standard library, bounded for the clients it faces: the P/D proxy's and the ops endpoint's.

A deep accept queue (the standard library's 5 reset a third of 64
concurrent clients), a cap on live connections (each is a thread: one over
the cap is answered 503 at once, never blocking the accept loop), and never
a traceback on the head's terminal.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading


class BoundedServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler, *, backlog: int, connections: int, who: str):
        self.request_queue_size = backlog  # read by server_activate's listen()
        self.slots = threading.BoundedSemaphore(connections)
        self._refusal = json.dumps({"error": {"message": f"{who} serves {connections} connections at once; try again"}}).encode()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        # The standard library's, with the slot given back before the close: a client that sees its connection
        # closed (an idle one dropped) may connect again at once, and must not meet a cap its old slot still fills.
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.slots.release()
            self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:  # never a traceback on the head's terminal
        pass

    def _refuse(self, request: socket.socket) -> None:
        data = self._refusal
        try:
            request.setblocking(False)
            request.send(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
            )
        except OSError:
            pass
        finally:
            request.close()

    def serve_in_background(self, name: str) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, daemon=True, name=name)
        thread.start()
        return thread
