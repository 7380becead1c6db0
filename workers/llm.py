"""An Agent backed by any OpenAI-compatible chat-completions server (hosted, or local vLLM / llama.cpp / Ollama).

    agent = "workers.llm:OpenAIChatAgent"        # configured from OPENAI_BASE_URL, OPENAI_API_KEY, OPENAI_MODEL

or, constructed with options (what a channel's `agent_options` table would pass):

    OpenAIChatAgent(model="gpt-4o-mini", system_prompt="You are Acme's support assistant.", temperature=0.2,
                    base_url="https://api.openai.com/v1", api_key_env="ACME_OPENAI_KEY", timeout_s=60)

Each reply is one POST {base_url}/chat/completions through `HttpSender` (pooled connections, retries with
backoff on network errors, 429 and 5xx, honouring Retry-After). The whole reply, retries included, is bounded
by `budget_s` (keep it below the session lease). When the backend cannot answer, the Agent returns
`fallback_text` instead of raising: the failure is logged as `agent.backend_failed` (error level for a 4xx
other than 429, which is a configuration problem such as a bad key; warning otherwise) and counted in
`FAILURES` / `failures_total()` and in the instance's `failures`.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import unicodedata
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import requests
import structlog
from requests.adapters import HTTPAdapter

from workers.agents import Conversation, Handoff, Utterance
from shared.errors import ConfigError
from shared.outbound import CONNECTIONS_PER_HOST, HttpSender, safe_url

log = structlog.get_logger(__name__)

# handoff_tool = true: the model may call this function to hand the conversation to a person (workers.agents.Handoff).
HANDOFF_TOOL = {"type": "function", "function": {
    "name": "hand_over_to_person",
    "description": "Hand this conversation to a human support agent: when the user asks for a person, or asks for "
                   "something you may not do or decide (a refund, an exception, a complaint). After this call the "
                   "conversation is no longer yours.",
    "parameters": {"type": "object", "properties": {
        "reason": {"type": "string", "description": "Why, in one sentence, for the human agent."},
        "message": {"type": "string", "description": "What to tell the user now (optional)."}},
        "required": ["reason"]}}}
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly and concise customer-service assistant. Answer in the language of the customer. "
    "If you do not know something, say so and offer to hand the conversation over to a human."
)
DEFAULT_FALLBACK_TEXT = "Sorry, I can't answer right now. Please try again in a few minutes."
DEFAULT_TEMPERATURE = 0.3
DEFAULT_TIMEOUT_S = 60.0  # read timeout of one request: a completion can take a while
DEFAULT_BUDGET_S = 90.0  # one reply, all retries and waits included; below the default 120 s session lease
CONNECT_TIMEOUT_S = 3.05

_API_NAME = re.compile(r"[^a-zA-Z0-9_-]+")
_STATUS = re.compile(r"^http (\d{3})\b")
_SECRETISH = re.compile(r"\b(sk-|Bearer\s+)[A-Za-z0-9._*\-]{4,}")
_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


class FailureCounter:
    """Thread-safe count of failed backend calls, by reason (network, http_5xx, http_429, http_4xx, malformed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_reason: dict[str, int] = {}

    def inc(self, reason: str) -> None:
        with self._lock:
            self._by_reason[reason] = self._by_reason.get(reason, 0) + 1

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._by_reason.values())

    def by_reason(self) -> dict[str, int]:
        with self._lock:
            return dict(self._by_reason)


FAILURES = FailureCounter()  # every OpenAIChatAgent in this process


def failures_total() -> int:
    """Failed backend calls (answered with the fallback text) in this process since start."""
    return FAILURES.total


class BudgetExhausted(requests.exceptions.Timeout):
    """The reply's time budget is used up; no further request is attempted."""


class _DeadlineAdapter(HTTPAdapter):
    """Applies the Agent's timeouts to every request, shortened to what is left of the calling thread's budget.

    HttpSender passes its own (platform-sized) timeout; a completion needs a longer read timeout, and all
    attempts of one reply together must end before the session lease does.
    """

    def __init__(self, timeout: tuple[float, float], local: threading.local):
        super().__init__(pool_connections=4, pool_maxsize=CONNECTIONS_PER_HOST)
        self._timeout = timeout
        self._local = local

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        connect, read = self._timeout
        deadline = getattr(self._local, "deadline", None)
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BudgetExhausted("reply time budget used up", request=request)
            connect, read = min(connect, remaining), min(read, remaining)
        return super().send(request, stream=stream, timeout=(connect, read), verify=verify, cert=cert, proxies=proxies)


def api_name(display_name: str) -> str | None:
    """A display name as the API's `name` field (^[a-zA-Z0-9_-]{1,64}$): accents dropped, others → "_"."""
    ascii_name = unicodedata.normalize("NFKD", display_name).encode("ascii", "ignore").decode()
    cleaned = _API_NAME.sub("_", ascii_name).strip("_")[:64]
    return cleaned or None


def _number(name: str, value: Any, *, low: float = 0, high: float | None = None, kind: type = float,
            allow_low: bool = False) -> Any:
    """A numeric option, validated: above `low` (or equal if allow_low), at most `high`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"OpenAIChatAgent: {name} must be a {'whole ' if kind is int else ''}number, got {value!r}")
    if value < low or (value == low and not allow_low) or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else "positive"
        raise ConfigError(f"OpenAIChatAgent: {name} must be {bound}, got {value!r}")
    return kind(value)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"OpenAIChatAgent: {name} must be a string, got {value!r}")
    return value


class OpenAIChatAgent:
    """Replies with a chat completion of the session's context; see the module docstring."""

    def __init__(
        self,
        *,
        system_prompt: str | None = None,
        model: str | None = None,
        temperature: float | None = None,
        base_url: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float | None = None,
        budget_s: float | None = None,
        max_tokens: int | None = None,
        fallback_text: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
        handoff_tool: bool = False,
        env: Mapping[str, str] | None = None,  # for tests; os.environ by default
        sleep: Callable[[float], None] = time.sleep,  # for tests: the back-off waits
    ):
        env = os.environ if env is None else env
        self.model = _text("model", model if model is not None else env.get("OPENAI_MODEL", ""))
        if not self.model:
            raise ConfigError("OpenAIChatAgent: no model: set the option `model` or the variable OPENAI_MODEL")
        self.system_prompt = _text("system_prompt", DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt)
        self.temperature = _number("temperature", DEFAULT_TEMPERATURE if temperature is None else temperature,
                                   high=2, allow_low=True)
        self.max_tokens = None if max_tokens is None else _number("max_tokens", max_tokens, kind=int)
        self.fallback_text = _text("fallback_text", DEFAULT_FALLBACK_TEXT if fallback_text is None else fallback_text)
        self.timeout_s = _number("timeout_s", DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
        self.budget_s = _number("budget_s", DEFAULT_BUDGET_S if budget_s is None else budget_s)
        if extra_body is not None and not isinstance(extra_body, Mapping):
            raise ConfigError(f"OpenAIChatAgent: extra_body must be a table, got {extra_body!r}")
        self.extra_body = dict(extra_body or {})
        if not isinstance(handoff_tool, bool):
            raise ConfigError(f"OpenAIChatAgent: handoff_tool must be true or false, got {handoff_tool!r}")
        self.handoff_tool = handoff_tool
        base = _text("base_url", base_url if base_url is not None else env.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL)
        try:
            parts = urlsplit(base)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0
        except ValueError:
            valid = False
        if not valid:
            raise ConfigError(f"OpenAIChatAgent: base_url must be an http(s) URL, got {base.split('@')[-1]!r}")
        self.base_url = base.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"

        if api_key_env is not None:  # named explicitly: it must be set, like every secret in this project
            self.api_key_env = _text("api_key_env", api_key_env)
            api_key = env.get(api_key_env)
            if not api_key:
                raise ConfigError(f"OpenAIChatAgent: environment variable {api_key_env} (api_key_env) is not set")
        else:  # the default: optional, since local servers usually take no key
            self.api_key_env = DEFAULT_API_KEY_ENV
            api_key = env.get(DEFAULT_API_KEY_ENV) or None
            if api_key is None and urlsplit(self.base_url).hostname not in ("127.0.0.1", "localhost", "::1"):
                log.warning("agent.no_api_key", base_url=safe_url(self.base_url), api_key_env=DEFAULT_API_KEY_ENV)
        self._secrets = tuple(s for s in (api_key,) if s)

        self._local = threading.local()
        self._sleep = sleep
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.sender = HttpSender(headers, sleep=self._budgeted_sleep)
        adapter = _DeadlineAdapter((min(CONNECT_TIMEOUT_S, self.timeout_s), self.timeout_s), self._local)
        self.sender.session.mount("http://", adapter)
        self.sender.session.mount("https://", adapter)
        self.failures = FailureCounter()

    def __repr__(self) -> str:  # never the key
        return f"OpenAIChatAgent(model={self.model!r}, base_url={safe_url(self.base_url)!r})"

    def close(self) -> None:
        self.sender.session.close()

    # -- the request ---------------------------------------------------------------------------------------

    def messages(self, conversation: Conversation) -> list[dict[str, Any]]:
        """The chat messages for this turn: system prompt, this session's history in order, the new message."""
        out: list[dict[str, Any]] = []
        if self.system_prompt:
            out.append({"role": "system", "content": self.system_prompt})
        group = conversation.chat_kind == "group"
        for u in (*conversation.history, conversation.message):
            if u.role == "assistant":
                if self.fallback_text and u.text == self.fallback_text:
                    continue  # our own "can't answer" apology is not context for the model
                out.append({"role": "assistant", "content": u.text})
            else:
                out.append(self._user_message(u, group))
        return out

    @staticmethod
    def _user_message(u: Utterance, group: bool) -> dict[str, Any]:
        who = " ".join(u.sender_name.split()) if group else ""
        if not who:
            return {"role": "user", "content": u.text}
        message: dict[str, Any] = {"role": "user", "content": f"{who}: {u.text}"}
        if name := api_name(who):
            message["name"] = name
        return message

    def payload(self, conversation: Conversation) -> dict[str, Any]:
        body: dict[str, Any] = {**self.extra_body, "model": self.model, "messages": self.messages(conversation),
                                "temperature": self.temperature}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.handoff_tool:
            body["tools"] = [*body.get("tools", []), HANDOFF_TOOL]
        return body

    # -- the Agent -------------------------------------------------------------------------------------------

    def reply(self, conversation: Conversation) -> str | Handoff | None:
        answer: dict[str, Any] = {}

        def keep_body(body: Any) -> None:
            answer["body"] = body

        started = time.monotonic()
        self._local.deadline = started + self.budget_s
        try:
            delivery = self.sender.post(self.url, self.payload(conversation), keep_body)
        finally:
            self._local.deadline = None
        if not delivery.ok:
            error = delivery.error or "unknown"
            status = int(m.group(1)) if (m := _STATUS.match(error)) else None
            if status is None:
                reason = "network"
            elif status == 429:
                reason = "http_429"
            elif status >= 500:
                reason = "http_5xx"
            else:
                reason = "http_4xx"
            return self._failed(conversation, reason, status, error, delivery.attempts)
        if self.handoff_tool and (handoff := self._handoff(answer.get("body"))) is not None:
            log.info("agent.handoff", model=self.model, reason=handoff.reason[:200])
            return handoff
        text = self._completion_text(answer.get("body"))
        if text is None:
            # In HttpSender's form, so the log shows the status and not the answer (it may quote the conversation).
            return self._failed(conversation, "malformed", 200, f"http 200: {str(answer.get('body'))[:200]}",
                                delivery.attempts)
        log.debug("agent.backend_replied", model=self.model, attempts=delivery.attempts,
                  duration_ms=round((time.monotonic() - started) * 1000))
        return text

    @staticmethod
    def _handoff(body: Any) -> Handoff | None:
        """The model's call of hand_over_to_person (choices[0].message.tool_calls), as a Handoff; None if it made
        none. Arguments it got wrong still hand over: asking for a person is what matters."""
        try:
            calls = body["choices"][0]["message"].get("tool_calls") or []
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
        for call in calls if isinstance(calls, list) else []:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or function.get("name") != HANDOFF_TOOL["function"]["name"]:
                continue
            try:
                arguments = json.loads(function.get("arguments") or "{}")
            except ValueError:
                arguments = {}
            arguments = arguments if isinstance(arguments, dict) else {}
            reason, message = arguments.get("reason"), arguments.get("message")
            return Handoff(reason.strip()[:500] if isinstance(reason, str) and reason.strip() else
                           "the model asked for a person",
                           message.strip() if isinstance(message, str) and message.strip() else None)
        return None

    @staticmethod
    def _completion_text(body: Any) -> str | None:
        """choices[0].message.content as text (a <think> preamble removed), or None if the answer is malformed."""
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None
        if isinstance(content, list):  # content parts, as some servers send them
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            return None
        content = _THINK.sub("", content).strip()
        return content or None

    def _failed(self, conversation: Conversation, reason: str, status: int | None, error: str,
                attempts: int) -> str | None:
        FAILURES.inc(reason)
        self.failures.inc(reason)
        for secret in self._secrets:
            error = error.replace(secret, "[redacted]")
        error = _SECRETISH.sub(r"\1[redacted]", error)
        fields = dict(reason=reason, status=status, error=error, attempts=attempts, model=self.model,
                      base_url=safe_url(self.base_url), channel_id=conversation.channel_id)
        if reason == "http_4xx":  # a bad key, model name or request: the operator must fix the configuration
            log.error("agent.backend_failed", **fields)
        else:
            log.warning("agent.backend_failed", **fields)
        return self.fallback_text or None

    def _budgeted_sleep(self, delay: float) -> None:
        """HttpSender's back-off, cut to what is left of this reply's budget."""
        deadline = getattr(self._local, "deadline", None)
        if deadline is not None:
            delay = min(delay, deadline - time.monotonic())
        if delay > 0:
            self._sleep(delay)
