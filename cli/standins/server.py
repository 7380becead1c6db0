"""The HTTP server under the stand-ins (platforms, LLM): a thread per connection, a listen backlog deep enough for a
thousand clients connecting at once, and a close that also closes the keep-alive connections it accepted."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

# A stand-in's answer to one request: (method, path, headers, body) -> (status, JSON bytes, extra headers)
Answer = Callable[[str, str, dict[str, str], bytes], tuple[int, bytes, dict[str, str]]]


def json_handler(answer: Answer, methods: tuple[str, ...] = ("POST",)) -> type[BaseHTTPRequestHandler]:
    """A keep-alive request handler that answers `methods` with `answer`'s JSON (others: 501, http.server's)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args: Any) -> None:  # keep test and demo output clean
            pass

        def _serve(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, data, headers = answer(self.command, self.path, dict(self.headers), raw)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                pass

    for method in methods:
        setattr(Handler, f"do_{method}", Handler._serve)
    return Handler


class StandInServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default is 5: a burst of connections beyond the backlog is dropped, and each client retries its
    # SYN a second later (a benchmark would measure that second, not the system under test)
    request_queue_size = 2048

    def __init__(self, *args: Any, **kwargs: Any):
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self._closed = False
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        """Stop listening and end every connection still open: a client's pooled keep-alive connection must not go on
        being served by this stopped stand-in (recording into it) after another one took the port."""
        super().server_close()
        with self._open_lock:
            self._closed = True
            still_open, self._open = self._open, set()
        for sock in still_open:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # its handler thread reads EOF and ends
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not self._closed:  # after the close, a handler reading its ended connection is expected to fail
            super().handle_error(request, client_address)
