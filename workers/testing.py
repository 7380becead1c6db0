"""Test helpers for Agent authors: play a conversation through the real turn (TurnRunner + a temporary SQLite store).

    from workers.testing import run_conversation

    def test_remembers_the_order():
        replies = run_conversation(MyAgent(), ["my order 48213 is late", "where is my order?"])
        assert "48213" in replies[-1]

Each call uses a fresh SQLite database, so sessions never leak between tests. The Agent is given exactly what a
worker gives it in production: this session's current generation as `history`, oldest first, and the new message.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from workers.agents import Agent, Conversation, load_agent, reply_of
from shared.channels.base import TEMPLATES
from shared.config import ChannelConfig, SessionOptions, Settings
from shared.db import engine_for
from shared.outbound import Fence
from shared.messages import DM, GROUP, NEW_SESSION, Delivery, InboundMessage
from shared.migrate import upgrade
from workers.store import Store
from workers.runner import TurnRunner

CHANNEL_ID = "test"
DEFAULT_USER = "Ana"


@dataclass
class RecordingChannel:
    """A platform that accepts every reply (or refuses all, with ok=False) and remembers (chat, text)."""

    config: ChannelConfig
    sent: list[tuple[str, str]] = field(default_factory=list)
    threads: list[str | None] = field(default_factory=list)  # the thread_id of each sent reply
    reply_ids: list[int | None] = field(default_factory=list)  # the stored reply id of each sent reply
    ok: bool = True
    capabilities: frozenset[str] = frozenset({TEMPLATES})

    def send(self, chat_id: str, chat_kind: str, text: str, fence: Fence | None = None,
             thread_id: str | None = None, reply_id: int | None = None) -> Delivery:
        if fence is not None:
            fence.check()  # like a real channel: a holder that lost the session sends nothing
        self.sent.append((chat_id, text))
        self.threads.append(thread_id)
        self.reply_ids.append(reply_id)
        if not self.ok:
            return Delivery(ok=False, error="http 400: refused")
        return Delivery(ok=True, platform_message_ids=(f"sent.{len(self.sent)}",))

    def send_template(self, chat_id: str, chat_kind: str, name: str, language: str,
                      fence: Fence | None = None) -> Delivery:
        """A WhatsApp message template (outside the customer-service window), recorded as "template:<name>:<lang>"."""
        return self.send(chat_id, chat_kind, f"template:{name}:{language}", fence)


def settings_for(database_url: str, channels: Iterable[ChannelConfig], lease_seconds: float = 5.0) -> Settings:
    """Settings for running turns in-process against `database_url` (no broker, no secrets)."""
    return Settings(
        database_url=database_url, broker_url="memory://localhost/", redis_url=None, partitions=16,
        lease_seconds=lease_seconds, visibility_timeout=max(lease_seconds * 2, 300), worker_concurrency=1,
        log_format="console", log_level="INFO", config_path=Path("<test>"), channels={c.id: c for c in channels},
    )


@dataclass
class _Watched:
    """Wraps the Agent under test: records what it was given, and the exception it raised (re-raised after the turn)."""

    agent: Agent
    seen: list[Conversation]
    errors: list[BaseException] = field(default_factory=list)

    def reply(self, conversation: Conversation) -> str | None:
        self.seen.append(conversation)
        try:
            return reply_of(self.agent, conversation)  # awaited here if the Agent is async
        except Exception as exc:
            self.errors.append(exc)
            raise


def run_conversation(
    agent: Agent | Callable[[Conversation], str | None] | str,
    messages: Iterable[str | tuple[str, str]],
    *,
    chat_kind: str | None = None,
    history_limit: int = 50,
    seen: list[Conversation] | None = None,
) -> list[str | None]:
    """Send `messages` in order to one session and return the reply to each (None when the Agent stayed silent).

    A message is a text (from the user "Ana"), or (member name, text) for a group member; with tuples the chat
    is a group unless `chat_kind` says otherwise. "/new" starts a new session, as the platforms' command does.
    `agent` is an Agent, a reply function, or a name for `load_agent` ("demo", "package.module:Attribute").
    `seen`, if given, receives the Conversation the Agent was given at each turn.
    An exception raised by the Agent is raised here (the worker would retry it, then dead-letter the message).
    """
    messages = list(messages)
    items = [(DEFAULT_USER, m) if isinstance(m, str) else tuple(m) for m in messages]
    kind = chat_kind or (GROUP if any(not isinstance(m, str) for m in messages) else DM)
    if isinstance(agent, str):
        agent = load_agent(agent)
    elif not hasattr(agent, "reply"):
        fn = agent
        agent = type("_FunctionAgent", (), {"reply": staticmethod(fn)})()
    watched = _Watched(agent, seen if seen is not None else [])

    with tempfile.TemporaryDirectory(prefix="chatsessions-test-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'sessions.db'}"
        upgrade(url)
        try:
            config = ChannelConfig(id=CHANNEL_ID, platform="whatsapp", agent="test", api_base="http://unused",
                                   secrets={}, options={}, session=SessionOptions(history_limit=history_limit))
            store = Store(url)
            store.sync_channels([config])
            channel = RecordingChannel(config)
            runner = TurnRunner(settings_for(url, [config]), store, {CHANNEL_ID: channel}, {CHANNEL_ID: watched},
                                agent_attempts=1, agent_backoff_s=0)
            chat_id = "chat-1"
            replies: list[str | None] = []
            for seq, (name, text) in enumerate(items, start=1):
                before = len(channel.sent)
                runner.handle(_inbound(chat_id, kind, name, text, seq))
                if watched.errors:
                    raise watched.errors[0]
                new = [text for _, text in channel.sent[before:]]
                replies.append("\n".join(new) if new else None)
            return replies
        finally:
            engine_for(url).dispose()


_ids = itertools.count(1)


def _inbound(chat_id: str, kind: str, name: str, text: str, seq: int) -> InboundMessage:
    return InboundMessage(
        channel_id=CHANNEL_ID, platform="whatsapp", session_key=f"{CHANNEL_ID}:{kind}:{chat_id}", chat_id=chat_id,
        chat_kind=kind, sender_id=f"id-{name}", sender_name=name, text=text,
        platform_message_id=f"test.{next(_ids)}", sent_at=time.time(),
        command=NEW_SESSION if text.strip() == "/new" else None, seq=seq,
    )

