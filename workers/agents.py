"""The Agent interface (a session's context in, a reply out), the built-in Agents, and loading by name."""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping, Protocol, runtime_checkable

import structlog

from shared.errors import ConfigError
from shared.greenlets import on_greenlets

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Utterance:
    role: str  # "user" or "assistant"
    sender_name: str  # in groups: which member said it
    text: str
    sender_id: str = ""
    at: datetime | None = None


@dataclass(frozen=True)
class Conversation:
    """Everything an Agent may see: this session's current generation only, and the new message."""

    channel_id: str
    session_key: str
    chat_kind: str  # "dm" or "group"
    history: tuple[Utterance, ...]
    message: Utterance


@dataclass(frozen=True)
class Handoff:
    """What an Agent returns to hand the conversation to a person: `reason` for the operators (the waiting queue, the
    session's events), `text` for the user (None: the channel's handoff_notice). The Agent does not run again in the
    session until an operator hands it back."""

    reason: str
    text: str | None = None


@runtime_checkable
class Agent(Protocol):
    def reply(self, conversation: Conversation) -> str | Handoff | None:
        """The reply text, None to stay silent, or a Handoff to ask for a person. May be `async def` (awaited on the
        process's agent loop)."""


def reply_of(agent: Agent, conversation: Conversation) -> str | Handoff | None:
    """An Agent's reply, whether its `reply` is plain (`def`) or a coroutine (`async def`)."""
    result = agent.reply(conversation)
    return _await(result) if inspect.isawaitable(result) else result


@functools.cache
def _agent_loop() -> asyncio.AbstractEventLoop:
    """The process's one event loop for async Agents, in a native thread of its own: thousands of coroutines wait
    there for the price of one thread. Under gevent, with the original (unpatched) selector and thread."""
    if on_greenlets():
        from gevent import monkey

        loop = asyncio.SelectorEventLoop(monkey.get_original("selectors", "DefaultSelector")())
        monkey.get_original("_thread", "start_new_thread")(loop.run_forever, ())
    else:
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="async-agents", daemon=True).start()
    return loop


def _await(awaitable: Any) -> Any:
    """Run an Agent's coroutine on the agent loop and wait for it: a thread waits on the future; a greenlet on
    gevent's thread-safe async watcher, which the loop's thread fires when the coroutine is done, so the waiting
    costs it no thread either."""
    future = asyncio.run_coroutine_threadsafe(_as_coroutine(awaitable), _agent_loop())
    if not on_greenlets():
        return future.result()
    import gevent
    from gevent.event import Event

    done, watcher = Event(), gevent.get_hub().loop.async_()
    watcher.start(done.set)
    try:
        future.add_done_callback(lambda _f: watcher.send())
        done.wait()
        return future.result()
    finally:
        watcher.close()


async def _as_coroutine(awaitable: Any) -> Any:
    return await awaitable


class AgentFailed(Exception):
    """The Agent raised on every attempt for one message."""


@dataclass(frozen=True)
class Retrying:
    """An Agent retried in place (the session keeps its lease, so order holds): `attempts` calls at most, waiting
    `backoff_s`, doubled each time, in between; then AgentFailed (the message becomes a dead letter)."""

    agent: Agent
    attempts: int
    backoff_s: float

    def reply(self, conversation: Conversation) -> str | None:
        for attempt in range(1, self.attempts + 1):
            try:
                return reply_of(self.agent, conversation)
            except Exception as exc:  # noqa: BLE001 - any failure of the Agent's code is retried, then dead-lettered
                error = f"{exc.__class__.__name__}: {exc}"
                log.warning("turn.agent_failed", attempt=attempt, error=error)
                if attempt == self.attempts:
                    raise AgentFailed(error) from exc
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        raise AgentFailed("no attempt allowed")


class EchoAgent:
    """Repeats the message; for tests."""

    def reply(self, conversation: Conversation) -> str:
        return f"echo: {conversation.message.text}"


_NAME = re.compile(r"\bmy name is ([A-Za-zÀ-ÿ][\w'-]*)", re.I)
_ORDER = re.compile(r"\border(?: number| no\.?| #)?\s*#?(\d{3,})", re.I)


class DemoAgent:
    """A tiny customer-service Agent that remembers what the user said *in this session*.

    It knows a name and an order number only if they appear in the conversation it is given,
    so a fact leaking between sessions would be visible in its answers.
    """

    def reply(self, conversation: Conversation) -> str:
        said = [u for u in (*conversation.history, conversation.message) if u.role == "user"]
        name = order = None
        for u in said:
            if m := _NAME.search(u.text):
                name = m.group(1)
            if m := _ORDER.search(u.text):
                order = m.group(1)
        text = conversation.message.text.lower()
        who = conversation.message.sender_name if conversation.chat_kind == "group" else name
        greeting = f"{who}, " if who else ""
        if "my name" in text and "?" in text:
            return f"Your name is {name}." if name else "You haven't told me your name yet."
        if "order" in text and "?" in text:
            if order:
                return f"{greeting}your order {order} is on its way and should arrive within 2 days."
            return f"{greeting}I don't have an order number for you yet. What is it?"
        if m := _NAME.search(conversation.message.text):
            return f"Nice to meet you, {m.group(1)}! How can I help?"
        if m := _ORDER.search(conversation.message.text):
            return f"{greeting}thanks, I noted order {m.group(1)}. Ask me about it any time."
        return f"{greeting}thanks for your message. I'm here to help with orders and deliveries."


BUILTIN: dict[str, Any] = {"echo": EchoAgent, "demo": DemoAgent, "openai": "workers.llm:OpenAIChatAgent"}


def load_agent(spec: str, options: Mapping[str, Any] | None = None) -> Agent:
    """An Agent from "echo", "demo", "openai" or "package.module:Attribute" (a class, an instance, or a function).

    `options` (the channel's agent_options) are passed to the class as keyword arguments."""
    options = dict(options or {})
    target: Any = BUILTIN.get(spec, spec)
    if isinstance(target, str):
        target = _import(target)
    if options and not isinstance(target, type):
        raise ConfigError(f"agent {spec!r}: agent_options need a class, not {type(target).__name__}")
    if isinstance(target, type):
        try:
            target = target(**options)
        except TypeError as exc:
            raise ConfigError(f"agent {spec!r}: bad agent_options {sorted(options)}: {exc}") from None
    if isinstance(target, Agent):
        return target
    if callable(target):
        return _FunctionAgent(target)
    raise ConfigError(f"agent {spec!r}: not an Agent (needs reply(conversation) or to be callable)")


def _import(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"agent {spec!r}: use a built-in ({', '.join(BUILTIN)}) or 'package.module:Attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"agent {spec!r}: cannot import {module_name}: {exc}") from None
    try:
        target: Any = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"agent {spec!r}: {module_name} has no attribute {attr!r}") from None
    return target


@dataclass(frozen=True)
class _FunctionAgent:
    fn: Any

    def reply(self, conversation: Conversation) -> str | None:
        return self.fn(conversation)
