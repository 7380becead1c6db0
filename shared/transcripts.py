"""The read model of stored conversations, for people: a session's transcript with its lifecycle events, and the
dead letters (messages whose turn failed for good) — the CLI and the session browser read them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select

from shared.db import transaction
from shared.messages import InboundMessage
from shared.models import AGENT, HUMAN, NEW_GENERATION, WAITING, ChatSession, DeadLetter, Message, SessionEvent


@dataclass(frozen=True)
class SessionSummary:
    key: str
    channel_id: str
    status: str
    generation: int
    message_count: int
    created_at: datetime
    last_activity_at: datetime
    mode: str = AGENT  # who answers: agent, waiting (for a person) or human (an operator has it)
    operator: str | None = None


@dataclass(frozen=True)
class TranscriptLine:
    at: datetime
    generation: int
    kind: str  # "user", "assistant" or "event"
    sender_name: str  # a message's sender (the Agent, an operator, the notice); an event's actor (handoff)
    text: str  # a message's text; an event's name
    delivery_status: str | None = None
    delivery_error: str | None = None  # why a reply was not delivered (failed)
    detail: str | None = None  # an event's why (handoff)


def transcript(url: str, session_key: str) -> tuple[SessionSummary, list[TranscriptLine]] | None:
    """A session's messages of every generation, interleaved with its lifecycle events, in order."""
    with transaction(url) as s:
        session = s.scalars(select(ChatSession).where(ChatSession.key == session_key)).first()
        if session is None:
            return None
        summary = SessionSummary(session.key, session.channel_id, session.status, session.generation,
                                 session.message_count, session.created_at, session.last_activity_at, session.mode,
                                 session.operator)
        messages = s.scalars(select(Message).where(Message.session_id == session.id).order_by(Message.position)).all()
        events = s.scalars(select(SessionEvent).where(SessionEvent.session_id == session.id)
                           .order_by(SessionEvent.id)).all()
    lines = [TranscriptLine(m.created_at, m.generation, m.role, m.sender_name, m.text, m.delivery_status,
                            m.delivery_error) for m in messages]
    lines += [TranscriptLine(e.at, e.generation, "event", e.actor or "", e.event, detail=e.detail) for e in events]
    # Events sort before messages stored in the same instant (a generation starts before its first message).
    lines.sort(key=lambda line: (line.at, line.kind != "event" or line.text == NEW_GENERATION))
    return summary, lines


@dataclass(frozen=True)
class DeadLetterRow:
    id: int
    channel_id: str
    session_key: str
    platform_message_id: str
    error: str
    attempts: int
    created_at: datetime
    message: InboundMessage


def dead_letters(url: str, limit: int = 100, letter_id: int | None = None) -> list[DeadLetterRow]:
    with transaction(url) as s:
        q = select(DeadLetter).order_by(DeadLetter.id)
        if letter_id is not None:
            q = q.where(DeadLetter.id == letter_id)
        rows = s.scalars(q.limit(limit)).all()
        return [DeadLetterRow(r.id, r.channel_id, r.session_key, r.platform_message_id, r.error, r.attempts,
                              r.created_at, InboundMessage.from_dict(json.loads(r.payload))) for r in rows]


def drop_dead_letter(url: str, letter_id: int, unchanged_since: datetime | None = None) -> bool:
    """Delete a dead letter; with `unchanged_since` (its created_at when read) only if no worker has
    dead-lettered the message again since — a replayed letter that failed again must stay visible."""
    with transaction(url) as s:
        q = delete(DeadLetter).where(DeadLetter.id == letter_id)
        if unchanged_since is not None:
            q = q.where(DeadLetter.created_at == unchanged_since)
        return bool(s.execute(q).rowcount)


def format_transcript(key: str, url: str) -> str:
    """A session's transcript as text, for a terminal (`sessions show`, the demo)."""
    found = transcript(url, key)
    if found is None:
        raise LookupError(f"no session {key!r}")
    summary, lines = found
    mode = {WAITING: ", waiting for a person", HUMAN: f", with {summary.operator}"}.get(summary.mode, "")
    out = [f"session {summary.key}  [{summary.status}, generation {summary.generation}{mode}]"]
    for line in lines:
        at = line.at.strftime("%H:%M:%S")
        if line.kind == "event":
            who = f" by {line.sender_name}" if line.sender_name else ""
            why = f": {line.detail}" if line.detail else ""
            out.append(f"  {at}  -- {line.text}{who}{why} (generation {line.generation})")
        elif line.kind == "user":
            out.append(f"  {at}  g{line.generation} {line.sender_name}: {line.text}")
        else:
            status = f"  [{line.delivery_status}]" if line.delivery_status != "sent" else ""
            if line.delivery_status == "failed" and line.delivery_error:
                status = f"  [failed: {line.delivery_error}]"
            out.append(f"  {at}  g{line.generation}   {line.sender_name}: {line.text}{status}")
    return "\n".join(out)
