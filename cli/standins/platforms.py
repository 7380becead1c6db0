"""A local stand-in for the three platforms' send APIs: records every reply, answers like the real API.

Point a channel's `api_base` at `StandInPlatforms.base(prefix)`; the prefix (e.g. the channel id) tells
channels apart in the records. Routes, after the prefix:
  POST /{version}/{phone_number_id}/messages   WhatsApp Cloud API
  POST /bot{token}/sendMessage                 Telegram Bot API
  POST /channels/{channel_id}/messages         Discord

The account and setup endpoints (getMe, setWebhook, the Graph API's phone number and subscribed_apps, Discord's
application and commands) answer from `accounts` (cli/standins/accounts.py), where a test registers its bots.

Discord's Create Message deduplicates like the real one: with `nonce` and `enforce_nonce: true`, a create from the same
author (bot token) with a nonce seen in the last `nonce_window_s` returns the first message and posts nothing (the
absorbed creates are kept in `deduplicated`); a nonce Discord would refuse (not an int64 or a string of at most 25
characters) is a 400. `delay_answers` makes a platform slow to answer a message it has already created.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from cli.standins.accounts import Accounts
from cli.standins.server import StandInServer, json_handler

NONCE_WINDOW_S = 120.0  # Discord: "checked for uniqueness in the past few minutes"; the low end of "a few"
NONCE_CHARS = 25
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


def discord_nonce_error(body: dict[str, Any]) -> dict[str, Any] | None:
    """Discord's 400 for a nonce it refuses: an integer (int64) or a string of at most 25 characters."""
    if "nonce" not in body or body["nonce"] is None:
        return None
    nonce = body["nonce"]
    if isinstance(nonce, str) and len(nonce) <= NONCE_CHARS:
        return None
    if isinstance(nonce, int) and not isinstance(nonce, bool) and -2**63 <= nonce < 2**63:
        return None
    error = ({"code": "BASE_TYPE_MAX_LENGTH", "message": f"Must be {NONCE_CHARS} or fewer in length."}
             if isinstance(nonce, str) else {"message": "Must be an integer or a string."})
    return {"code": 50035, "message": "Invalid Form Body", "errors": {"nonce": {"_errors": [error]}}}


class StandInPlatforms:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, nonce_window_s: float = NONCE_WINDOW_S):
        self.sent: list[Sent] = []
        self.deduplicated: list[Sent] = []  # Discord creates answered with an earlier message of the same nonce
        self.nonce_window_s = nonce_window_s
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._fail: list[tuple[int, dict[str, Any], dict[str, str]]] = []  # queued error answers
        self._nonces: dict[tuple[str, Any], tuple[float, dict[str, Any]]] = {}  # (author, nonce) -> (at, answer)
        self._delays: dict[str, float] = {}  # prefix -> seconds between creating a message and answering
        self.accounts = Accounts()  # the bots, numbers and applications the setup endpoints know

        def answer(method: str, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, bytes, dict[str, str]]:
            status, body, extra = self._handle(path, headers, raw, method)
            return status, json.dumps(body).encode(), extra

        self.server = StandInServer((host, port), json_handler(answer, ("GET", "PUT", "POST")))
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="standin-platforms",
                                        daemon=True)

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

    def delay_answers(self, prefix: str, seconds: float) -> None:
        """Answer this prefix's requests `seconds` after the message was created (recorded): the window in which a
        sender that stops never learns that its message went out."""
        with self._lock:
            self._delays[prefix] = seconds

    def _handle(self, path: str, headers: dict[str, str], raw: bytes,
                method: str = "POST") -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            account = self.accounts.answer(method, path, headers, raw)
        if account is not None:
            return account[0], account[1], {}
        if method != "POST":
            return 404, {"error": f"no route {method} {path}"}, {}
        try:
            body = json.loads(raw)
        except ValueError:
            return 400, {"error": "body is not JSON"}, {}
        for platform, pattern in ROUTES:
            if m := pattern.match(path):
                break
        else:
            return 404, {"error": f"no route {path}"}, {}
        answer = self._create(platform, m, {k.lower(): v for k, v in headers.items()}, body)
        time.sleep(self._delays.get(m.group("prefix"), 0.0))
        return answer

    def _create(self, platform: str, m: re.Match[str], headers: dict[str, str],
                body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Record the message (or not) and return the platform's answer."""
        with self._lock:
            if self._fail:
                return self._fail.pop(0)
            nonce_key = None
            if platform == "discord":
                if (refused := discord_nonce_error(body)) is not None:
                    return 400, refused, {}
                if body.get("enforce_nonce") is True and body.get("nonce") is not None:
                    nonce_key = (headers.get("authorization", ""), body["nonce"])
                    seen = self._nonces.get(nonce_key)
                    if seen is not None and time.time() - seen[0] <= self.nonce_window_s:
                        self.deduplicated.append(Sent(m.group("prefix"), platform, m.group("chat"),
                                                      str(body.get("content")), time.time(), headers, body))
                        return 200, seen[1], {}
            n = next(self._ids)
            if platform == "whatsapp":
                chat, text, answer = body.get("to"), body.get("text", {}).get("body"), {
                    "messaging_product": "whatsapp", "messages": [{"id": f"wamid.standin{n}"}]}
            elif platform == "telegram":
                chat, text, answer = body.get("chat_id"), body.get("text"), {
                    "ok": True, "result": {"message_id": n, "chat": {"id": body.get("chat_id")}, "text": body.get("text")}}
            else:
                chat, text, answer = m.group("chat"), body.get("content"), {
                    "id": str(9_000_000 + n), "channel_id": m.group("chat"), "content": body.get("content"),
                    "nonce": body.get("nonce")}
                if nonce_key is not None:
                    self._remember_nonce(nonce_key, answer)
            self.sent.append(Sent(m.group("prefix"), platform, str(chat), str(text), time.time(), headers, body))
            self._lock.notify_all()
        return 200, answer, {}

    def _remember_nonce(self, key: tuple[str, Any], answer: dict[str, Any]) -> None:
        """Keep the nonce for the window; entries past it are dropped, oldest first (a long bench stays small)."""
        now = time.time()
        while self._nonces:
            oldest = next(iter(self._nonces))
            if now - self._nonces[oldest][0] <= self.nonce_window_s:
                break
            del self._nonces[oldest]
        self._nonces.pop(key, None)  # re-inserted at the end: the dict stays in time order
        self._nonces[key] = (now, answer)

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Sent]:
        """Block until at least `count` replies arrived; returns them all (raises TimeoutError otherwise)."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self.sent) >= count, timeout):
                raise TimeoutError(f"{len(self.sent)} of {count} replies arrived within {timeout}s")
            return list(self.sent)

    def replies_to(self, prefix: str, chat_id: str) -> list[str]:
        with self._lock:
            return [s.text for s in self.sent if s.prefix == prefix and s.chat_id == str(chat_id)]
