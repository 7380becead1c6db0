"""A local stand-in for the three platforms' send APIs: records every reply, answers like the real API.

Point a channel's `api_base` at `StandInPlatforms.base(prefix)`; the prefix (e.g. the channel id) tells
channels apart in the records. Routes, after the prefix:
  POST /{version}/{phone_number_id}/messages   WhatsApp Cloud API
  POST /bot{token}/sendMessage                 Telegram Bot API
  POST /channels/{channel_id}/messages         Discord
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ROUTES = [
    ("whatsapp", re.compile(r"^/(?P<prefix>[^/]+)/(?P<version>v[\d.]+)/(?P<account>[^/]+)/messages$")),
    ("telegram", re.compile(r"^/(?P<prefix>[^/]+)/bot(?P<account>[^/]+)/sendMessage$")),
    ("discord", re.compile(r"^/(?P<prefix>[^/]+)/channels/(?P<chat>[^/]+)/messages$")),
]


@dataclass(frozen=True)
class Sent:
    """One reply as the platform received it."""

    prefix: str
    platform: str
    chat_id: str
    text: str
    at: float
    headers: dict[str, str]
    body: dict[str, Any]


class StandInPlatforms:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.sent: list[Sent] = []
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._fail: list[tuple[int, dict[str, Any], dict[str, str]]] = []  # queued error answers
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args):  # keep test and demo output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                status, answer, headers = standin._handle(self.path, dict(self.headers), raw)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="standin-platforms", daemon=True)

    def start(self) -> StandInPlatforms:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def base(self, prefix: str) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/{prefix}"

    def fail_next(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        """Answer the next request with this error (e.g. a 429 with retry_after)."""
        with self._lock:
            self._fail.append((status, body, headers or {}))

    def _handle(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        try:
            body = json.loads(raw)
        except ValueError:
            return 400, {"error": "body is not JSON"}, {}
        for platform, pattern in ROUTES:
            if m := pattern.match(path):
                break
        else:
            return 404, {"error": f"no route {path}"}, {}
        with self._lock:
            if self._fail:
                return self._fail.pop(0)
            n = next(self._ids)
            if platform == "whatsapp":
                chat, text, answer = body.get("to"), body.get("text", {}).get("body"), {
                    "messaging_product": "whatsapp", "messages": [{"id": f"wamid.standin{n}"}]}
            elif platform == "telegram":
                chat, text, answer = body.get("chat_id"), body.get("text"), {
                    "ok": True, "result": {"message_id": n, "chat": {"id": body.get("chat_id")}, "text": body.get("text")}}
            else:
                chat, text, answer = m.group("chat"), body.get("content"), {"id": str(9_000_000 + n), "content": body.get("content")}
            self.sent.append(Sent(m.group("prefix"), platform, str(chat), str(text), time.time(),
                                  {k.lower(): v for k, v in headers.items()}, body))
            self._lock.notify_all()
        return 200, answer, {}

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Sent]:
        """Block until at least `count` replies arrived; returns them all (raises TimeoutError otherwise)."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self.sent) >= count, timeout):
                raise TimeoutError(f"{len(self.sent)} of {count} replies arrived within {timeout}s")
            return list(self.sent)

    def replies_to(self, prefix: str, chat_id: str) -> list[str]:
        with self._lock:
            return [s.text for s in self.sent if s.prefix == prefix and s.chat_id == str(chat_id)]
