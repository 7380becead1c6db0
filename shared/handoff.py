"""Handing a conversation to a person, the operators' side: the waiting queue, taking a session over, an operator's
reply, handing it back. The CLI (`sessions waiting|takeover|reply|handback`) and the operator console use these.

A takeover and a hand-back change the session row at once (one owner: the row's lock decides between two operators
racing for it). An operator's reply does not: it is an inbox message of its own (OPERATOR_REPLY), published on the
session's partition by the caller, so the worker holding the session stores and sends it after every message
before it — fenced, exactly once, chunked, paced, with WhatsApp's window applied, like the Agent's replies. The turn
side (what a turn does in each mode) is workers/turn.py.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable

from sqlalchemy import select

from shared import audit
from shared.accounts import OPERATOR_NAME
from shared.db import as_utc, iso, transaction
from shared.errors import ChatSessionsError
from shared.messages import OPERATOR_REPLY, InboundMessage
from shared.models import AGENT, HUMAN, RETURNED, TAKEN_OVER, WAITING, Channel, ChatSession, Message, SessionEvent

REPLY_LIMIT = 10_000  # characters; a platform's limit is met by chunking


class HandoffError(ChatSessionsError):
    """An operator's action that cannot be done (the message says why)."""


class TakenBy(HandoffError):
    """Another operator has the session."""

    def __init__(self, key: str, operator: str):
        super().__init__(f"session {key!r} is taken by {operator}")
        self.operator = operator


@dataclass(frozen=True)
class Handover:
    """A session that is not the Agent's: waiting for a person, or with one."""

    key: str
    channel_id: str
    mode: str  # WAITING or HUMAN
    operator: str | None
    since: datetime | None  # waiting: when a person was asked for; human: the operator's last action
    reason: str | None

    def to_dict(self) -> dict:
        return asdict(self) | {"since": iso(self.since)}


def operator_name(name: str) -> str:
    """An operator's name, checked: it is shown to users and stored with their replies."""
    name = (name or "").strip()
    if not OPERATOR_NAME.fullmatch(name):
        raise HandoffError(f"operator name {name[:40]!r}: 1-100 letters, digits, spaces, . ' - (starting with a "
                           "letter or digit)")
    return name


def handovers(url: str, mode: str = WAITING, operator: str | None = None, limit: int = 200) -> list[Handover]:
    """The waiting queue (mode WAITING), oldest request first; or the sessions operators have (HUMAN), of one
    operator if named."""
    with transaction(url) as s:
        q = select(ChatSession).where(ChatSession.mode == mode)
        if operator is not None:
            q = q.where(ChatSession.operator == operator)
        rows = s.scalars(q.order_by(ChatSession.mode_at, ChatSession.id).limit(limit)).all()
        return [Handover(r.key, r.channel_id, r.mode, r.operator, as_utc(r.mode_at), r.handoff_reason) for r in rows]


def _locked(s, key: str) -> ChatSession:
    row = s.scalars(select(ChatSession).where(ChatSession.key == key).with_for_update()).first()
    if row is None:
        raise HandoffError(f"no session {key!r}")
    return row


def _event(s, row: ChatSession, event: str, at: datetime, actor: str, detail: str | None) -> None:
    s.add(SessionEvent(session_id=row.id, generation=row.generation, event=event, at=at, actor=actor, detail=detail))


def take_over(url: str, key: str, operator: str, via: str = audit.CLI) -> str:
    """Give the session to `operator`: the Agent stops answering it. Returns the mode it was in. TakenBy if another
    operator has it (two racing: the row's lock lets one in, the other finds it taken)."""
    operator, t = operator_name(operator), datetime.now(timezone.utc)
    with transaction(url) as s:
        row = _locked(s, key)
        if row.mode == HUMAN and row.operator != operator:
            raise TakenBy(key, row.operator or "another operator")
        before = row.mode
        if before != HUMAN:
            # Waiting, the user was told a person is coming; taken from the Agent, they are told at their next message.
            row.notice_sent = before == WAITING and row.notice_sent
            _event(s, row, TAKEN_OVER, t, operator, f"from {before}")
            audit.record(s, t, operator, TAKEN_OVER, key, via, f"from {before}")
        row.mode, row.operator, row.mode_at = HUMAN, operator, t
        return before


def hand_back(url: str, key: str, actor: str, operator: str | None = None, via: str = audit.CLI) -> bool:
    """Return the session to the Agent (its next turn sees the whole generation, operators' replies included).
    With `operator`, only if that operator has it (TakenBy otherwise). False if it was the Agent's already."""
    t = datetime.now(timezone.utc)
    with transaction(url) as s:
        row = _locked(s, key)
        if row.mode == AGENT:
            return False
        if operator is not None and row.mode == HUMAN and row.operator != operator:
            raise TakenBy(key, row.operator or "another operator")
        detail = f"from {row.mode}" + (f" ({row.operator})" if row.operator else "")
        _event(s, row, RETURNED, t, actor, detail)
        audit.record(s, t, actor, RETURNED, key, via, detail)
        row.mode, row.operator, row.mode_at, row.handoff_reason, row.notice_sent = AGENT, None, t, None, False
        return True


def operator_reply(url: str, key: str, operator: str, text: str,
                   publish: Callable[[list[InboundMessage]], object] | None = None,
                   via: str = audit.CLI) -> InboundMessage:
    """The inbox message of `operator`'s reply in the session they have. It goes to the channel, chat and topic of
    the user's last message (a per-person session spans channels). With `publish`, it is published before the audit
    entry commits (a reply the broker refused leaves no entry); without, the caller publishes it."""
    operator, text = operator_name(operator), (text or "").strip()
    if not text:
        raise HandoffError("the reply is empty")
    if len(text) > REPLY_LIMIT:
        raise HandoffError(f"the reply is longer than {REPLY_LIMIT} characters")
    with transaction(url) as s:
        row = s.scalars(select(ChatSession).where(ChatSession.key == key)).first()
        if row is None:
            raise HandoffError(f"no session {key!r}")
        if row.mode != HUMAN:
            raise HandoffError(f"session {key!r} is {'waiting for' if row.mode == WAITING else 'not with'} an "
                               "operator: take it over first")
        if row.operator != operator:
            raise TakenBy(key, row.operator or "another operator")
        last = s.execute(select(Message.channel_id, Message.chat_id, Message.chat_kind, Message.thread_id,
                                Message.created_at)
                         .where(Message.session_id == row.id, Message.role == "user")
                         .order_by(Message.position.desc()).limit(1)).first()
        channel_id, chat_id, chat_kind, thread_id, said_at = last or (row.channel_id, row.chat_id, row.chat_kind,
                                                                      None, None)
        platform = s.scalar(select(Channel.platform).where(Channel.id == channel_id)) or ""
        message = InboundMessage(
            channel_id=channel_id, platform=platform, session_key=key, chat_id=chat_id or row.chat_id,
            chat_kind=chat_kind or row.chat_kind, sender_id=f"operator:{operator}", sender_name=operator, text=text,
            platform_message_id=f"operator:{secrets.token_urlsafe(12)}",
            sent_at=as_utc(said_at).timestamp() if said_at else time.time(), command=OPERATOR_REPLY,
            thread_id=thread_id)
        audit.record(s, datetime.now(timezone.utc), operator, audit.REPLY, key, via,
                     f"{message.platform_message_id}, {len(text)} characters")
        if publish is not None:
            publish([message])
    return message
