"""A local stand-in for an OpenAI-compatible chat-completions server: records every request, answers like the API.

Point an `OpenAIChatAgent` at `StandInLLM.base()` (e.g. `base_url = "http://127.0.0.1:PORT/v1"`).
Route: POST /{prefix}/chat/completions. Every request is recorded (headers, JSON body) in `requests`;
`fail_next` queues scripted answers (a 500, a 429 with Retry-After, a 401, a 200 that is not JSON, a slow answer)
that are served before the normal canned completion. `latency_s` makes every completion take that long, like a
hosted model (the benchmark's waiting Agent: a thousand requests waiting at once, each on a thread of its own);
`active` and `peak_active` count the requests being answered.

    with StandInLLM(responder=lambda body: "hello") as llm:
        agent = OpenAIChatAgent(base_url=llm.base(), model="m", api_key_env="X", env={"X": "k"})
        ...
        llm.requests[0].body["messages"]
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from cli.standins.server import StandInServer, json_handler


@dataclass(frozen=True)
class LLMRequest:
    """One chat-completions request as the server received it."""

    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # the decoded JSON (None if the body was not JSON)

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", [])) if isinstance(self.body, dict) else []


@dataclass(frozen=True)
class Scripted:
    """A scripted answer: status, body (dict → JSON, bytes → sent as is), extra headers, delay before answering."""

    status: int
    body: Any = None
    headers: dict[str, str] | None = None
    delay_s: float = 0.0
    complete: bool = True  # False: after the delay, answer with the normal completion (a slow success)


def last_user_text(body: dict[str, Any]) -> str:
    """The content of the last user message of a chat-completions request ("" if none)."""
    messages = body.get("messages", [])
    return next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")


def echo_responder(body: dict[str, Any]) -> str:
    """Repeats the user's last message (in a group, "Name: text"): the load generator's tag comes back."""
    return f"echo: {last_user_text(body)}"


def default_responder(body: dict[str, Any]) -> str:
    """A canned reply that shows what the model was given: how many messages and the last user turn."""
    return (f"(stand-in {body.get('model', '?')}) I read {len(body.get('messages', []))} messages. "
            f"You said: {last_user_text(body)}")


class StandInLLM:
    def __init__(self, responder: Callable[[dict[str, Any]], str | dict[str, Any]] = default_responder,
                 host: str = "127.0.0.1", port: int = 0, prefix: str = "v1", latency_s: float = 0.0,
                 record: bool = True):
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s}")
        self.responder = responder
        self.prefix = prefix.strip("/")
        self.latency_s = latency_s  # every normal completion is answered this long after its request arrived
        self.record = record  # False: `requests` stays empty (a long benchmark would hold every conversation)
        self.requests: list[LLMRequest] = []
        self.active = 0  # requests being answered now
        self.peak_active = 0  # the most at once since start (or reset_peak)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._script: list[Scripted] = []

        self.server = StandInServer((host, port), json_handler(
            lambda _method, path, headers, raw: self._handle(path, headers, raw)))
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="standin-llm", daemon=True)

    def start(self) -> StandInLLM:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> StandInLLM:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()

    def base(self) -> str:
        """The base URL to configure (`base_url`), e.g. http://127.0.0.1:PORT/v1."""
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/{self.prefix}"

    def fail_next(self, status: int, body: Any = None, headers: dict[str, str] | None = None,
                  delay_s: float = 0.0) -> None:
        """Answer the next request with this (e.g. 500, or 429 with {"Retry-After": "2"}, or 200 with b"not json")."""
        with self._lock:
            self._script.append(Scripted(status, body if body is not None else {"error": {"message": "scripted"}},
                                         headers, delay_s))

    def slow_next(self, delay_s: float) -> None:
        """Answer the next request normally, but only after `delay_s` seconds."""
        with self._lock:
            self._script.append(Scripted(200, None, None, delay_s, complete=False))

    def reset_peak(self) -> int:
        """The most requests answered at once since the last reset (or start); starts counting again from now."""
        with self._lock:
            peak, self.peak_active = self.peak_active, self.active
        return peak

    def _handle(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, bytes, dict[str, str]]:
        started = time.monotonic()
        with self._lock:
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)
        try:
            return self._answer(path, headers, raw, started)
        finally:
            with self._lock:
                self.active -= 1

    def _answer(self, path: str, headers: dict[str, str], raw: bytes,
                started: float) -> tuple[int, bytes, dict[str, str]]:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with self._lock:
            if self.record:
                self.requests.append(LLMRequest(path, {k.lower(): v for k, v in headers.items()}, body))
            scripted = self._script.pop(0) if self._script else None
        if scripted is not None:
            if scripted.delay_s:
                time.sleep(scripted.delay_s)
            if scripted.complete:
                data = scripted.body if isinstance(scripted.body, bytes) else json.dumps(scripted.body).encode()
                return scripted.status, data, dict(scripted.headers or {})
        if path.rstrip("/") != f"/{self.prefix}/chat/completions":
            return 404, json.dumps({"error": {"message": f"no route {path}"}}).encode(), {}
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return 400, json.dumps({"error": {"message": "body must be JSON with messages"}}).encode(), {}
        n = next(self._ids)
        content = self.responder(body)  # the reply's text, or a whole message (a dict: tool calls)
        message = content if isinstance(content, dict) else {"role": "assistant", "content": content}
        if self.latency_s:
            time.sleep(max(0.0, started + self.latency_s - time.monotonic()))
        answer = {
            "id": f"chatcmpl-standin{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
        return 200, json.dumps(answer).encode(), {}
