"""The turn's policies: what a worker's turn does with a message under the channel's [channels.session] — whether the
Agent answers, whether the turn opens a new session, what fits the context budget, whether a WhatsApp reply is
outside its window. Pure functions of the options and the facts the turn read under the session's lease
(workers/turn.py, workers/dispatch.py); docs/session-policies.md says how a turn applies each. Which session a
message belongs to, and whether it is addressed to the bot, is decided when it is parsed: shared/policies.py."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Sequence, TypeVar

from shared.config import SessionOptions
from shared.messages import GROUP, InboundMessage

@dataclass(frozen=True)
class Plan:
    """What a turn does, decided before the Agent runs."""

    new_session: bool  # the message is /new: it closes its generation, the Agent does not run
    reset: bool  # a reset policy is due: a new generation starts with this turn, its context is empty
    answer: bool  # the Agent runs (group_reply); otherwise the messages are stored as context only
    supersede: bool  # burst = "latest": a reply made stale by a newer waiting message is stored, never sent
    notice: str  # put before the reply of a turn a reset opened ("" = nothing)

    def reply(self, text: str | None) -> str | None:
        """The Agent's reply as it is stored and sent: after a reset, with the notice first."""
        return with_notice(self.notice, text) if self.reset else text


def plan_turn(options: SessionOptions, messages: Sequence[InboundMessage], last_activity: datetime | None,
              new_session: bool) -> Plan:
    """The decisions of a turn of `messages` (oldest first; one, or a burst), the session's last activity before
    them being `last_activity`. A reset is decided under the lease, by the time the ingress received the first
    message (a dormant session past the threshold is resumed and reset)."""
    reset = False
    if not new_session and options.reset != "never" and last_activity is not None:
        first = messages[0]
        at = datetime.fromtimestamp(first.received_at or first.sent_at or time.time(), timezone.utc)
        reset = reset_due(options, last_activity, at)
    return Plan(new_session=new_session, reset=reset, answer=should_answer(options, messages),
                supersede=options.burst == "latest", notice=options.reset_notice)


def should_answer(options: SessionOptions, messages: Sequence[InboundMessage]) -> bool:
    """Whether the Agent runs for these messages (one turn: one message, or a collected burst). With group_reply =
    "mentioned" a group turn is answered only if one of its messages is addressed to the bot; the others are stored
    as context without a reply."""
    return options.group_reply == "always" or any(m.chat_kind != GROUP or m.addressed for m in messages)


def asks_for_person(options: SessionOptions, messages: Sequence[InboundMessage]) -> bool:
    """Whether the user asked for a person: a message that is one of the channel's handoff_keywords (any case)."""
    words = options.handoff_keywords
    return bool(words) and any(m.text.strip().lower() in words for m in messages)


def reset_due(options: SessionOptions, last_activity: datetime, at: datetime) -> bool:
    """Whether a message sent `at` opens a new session under the reset policy, the session's last activity (before
    this message) being `last_activity`. idle: `reset_idle_hours` or more in between; daily: the last activity was
    before the latest `reset_hour` o'clock (in `timezone`) at or before `at`."""
    if options.reset == "idle" and options.reset_idle_hours is not None:
        return at - last_activity >= timedelta(hours=options.reset_idle_hours)
    if options.reset == "daily" and options.reset_hour is not None:
        return last_activity < latest_reset_boundary(options, at)
    return False


def latest_reset_boundary(options: SessionOptions, at: datetime) -> datetime:
    """The latest `reset_hour`:00 local time (in the channel's timezone) at or before `at`. A wall-clock hour that a
    DST change skips or repeats resolves as zoneinfo does (fold=0)."""
    local = at.astimezone(options.zone)
    boundary = local.replace(hour=options.reset_hour or 0, minute=0, second=0, microsecond=0)
    if boundary > local:
        boundary = (local - timedelta(days=1)).replace(hour=options.reset_hour or 0, minute=0, second=0,
                                                       microsecond=0)
    return boundary


def with_notice(notice: str, reply: str | None) -> str | None:
    """The reply to a message that a reset put in a new session: the notice first, in the same reply (one outbox
    row, so it is sent exactly once with it); the notice alone when the Agent stays silent; "" = no notice."""
    if not notice:
        return reply
    return f"{notice}\n\n{reply}" if reply else notice


H = TypeVar("H")


def trim_history(history: Sequence[H], limit: int, chars: int | None, text: Callable[[H], str]) -> list[H]:
    """The context budget: the newest `limit` entries of `history` (oldest first, one generation), and of those the
    newest whose texts together fit in `chars` (None: no character budget). Newest kept, oldest dropped."""
    kept = list(history[-limit:]) if limit else []
    if chars is None:
        return kept
    total, start = 0, len(kept)
    for i in range(len(kept) - 1, -1, -1):
        total += len(text(kept[i]))
        if total > chars:
            break
        start = i
    return kept[start:]


def outside_window(options: SessionOptions, platform: str, user_sent_at: datetime | None, at: datetime) -> bool:
    """WhatsApp's customer-service window: a free-form reply only within `window_hours` of the user's message."""
    if platform != "whatsapp" or user_sent_at is None:
        return False
    return at - user_sent_at > timedelta(hours=options.window_hours)
