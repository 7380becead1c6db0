"""Reading sessions for people: by filter and page (`sessions list`, the session browser), one session with its
messages, inbox and dead letters (`sessions show --json`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone, timedelta
from typing import Any

from sqlalchemy import func, select

from shared.db import as_utc, iso, transaction
from shared.models import (
    ChatSession,
    DeadLetter,
    InboxItem,
    Message,
    SessionEvent,
)
from shared.partitioning import partition_of


@dataclass(frozen=True)
class SessionInfo:
    id: int
    key: str
    channel_id: str
    chat_kind: str
    chat_id: str
    status: str
    generation: int
    message_count: int
    last_seq: int
    lease_until: datetime | None
    created_at: datetime
    last_activity_at: datetime
    mode: str = "agent"  # handoff: agent, waiting or human
    operator: str | None = None
    mode_at: datetime | None = None
    handoff_reason: str | None = None

    def to_dict(self, partitions: int | None = None) -> dict[str, Any]:
        d = asdict(self)
        for k in ("lease_until", "created_at", "last_activity_at", "mode_at"):
            d[k] = iso(d[k])
        if partitions:
            d["partition"] = partition_of(self.key, partitions)
        return d


SESSION_COLUMNS = (ChatSession.id, ChatSession.key, ChatSession.channel_id, ChatSession.chat_kind,
                    ChatSession.chat_id, ChatSession.status, ChatSession.generation, ChatSession.message_count,
                    ChatSession.last_seq, ChatSession.lease_until, ChatSession.created_at,
                    ChatSession.last_activity_at, ChatSession.mode, ChatSession.operator, ChatSession.mode_at,
                    ChatSession.handoff_reason)


def session_info(row: Any) -> SessionInfo:
    values = list(row)
    for i in (9, 10, 11, 14):
        values[i] = as_utc(values[i])
    return SessionInfo(*values)


@dataclass(frozen=True)
class Page:
    sessions: list[SessionInfo]
    total: int
    page: int
    limit: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.limit))


def find_sessions(url: str, *, channel: str | None = None, status: str | None = None,
                  idle_minutes: float | None = None, page: int = 1, limit: int = 50) -> Page:
    """Sessions, most recently active first, filtered by channel, status and idle time (at least
    `idle_minutes` without a message); one page of `limit`."""
    if page < 1 or limit < 1:
        raise ValueError("page and limit must be at least 1")
    conditions = []
    if channel:
        conditions.append(ChatSession.channel_id == channel)
    if status:
        conditions.append(ChatSession.status == status)
    if idle_minutes is not None:
        conditions.append(ChatSession.last_activity_at < datetime.now(timezone.utc) - timedelta(minutes=idle_minutes))
    with transaction(url) as s:
        total = s.scalar(select(func.count()).select_from(ChatSession).where(*conditions)) or 0
        rows = s.execute(select(*SESSION_COLUMNS).where(*conditions)
                         .order_by(ChatSession.last_activity_at.desc(), ChatSession.id.desc())
                         .offset((page - 1) * limit).limit(limit)).all()
    return Page([session_info(r) for r in rows], total, page, limit)


def get_session(url: str, key: str) -> SessionInfo | None:
    with transaction(url) as s:
        row = s.execute(select(*SESSION_COLUMNS).where(ChatSession.key == key)).first()
    return session_info(row) if row else None


def message_dict(m: Message) -> dict[str, Any]:
    return {
        "id": m.id, "generation": m.generation, "position": m.position, "role": m.role,
        "sender_id": m.sender_id, "sender_name": m.sender_name, "text": m.text,
        "platform_message_id": m.platform_message_id, "seq": m.ingress_seq, "created_at": iso(m.created_at),
        "in_reply_to": m.in_reply_to, "delivery_status": m.delivery_status, "delivery_error": m.delivery_error,
        "delivery_attempts": m.delivery_attempts, "delivered_at": iso(m.delivered_at),
    }


def _payload(raw: str) -> Any:
    """A stored InboundMessage as JSON (None if a row holds something else)."""
    try:
        return json.loads(raw)
    except ValueError:
        return None


def dead_letter_dict(d: DeadLetter) -> dict[str, Any]:
    return {"id": d.id, "channel_id": d.channel_id, "session_key": d.session_key,
            "platform_message_id": d.platform_message_id, "error": d.error, "attempts": d.attempts,
            "created_at": iso(d.created_at), "message": _payload(d.payload)}


def inbox_dict(item: Any) -> dict[str, Any]:
    return {"id": item.id, "seq": item.seq, "platform_message_id": item.platform_message_id,
            "created_at": iso(item.created_at), "message": _payload(item.payload)}


def event_dict(e: SessionEvent) -> dict[str, Any]:
    """A lifecycle event, JSON-ready; handoff events say who made them and why."""
    return {"generation": e.generation, "event": e.event, "at": iso(e.at), "actor": e.actor, "detail": e.detail}


def session_detail(url: str, key: str, partitions: int | None = None) -> dict[str, Any] | None:
    """Everything stored about one session, JSON-ready: the row, its messages of every generation,
    lifecycle events, messages waiting in its inbox and its dead letters."""
    with transaction(url) as s:
        row = s.execute(select(*SESSION_COLUMNS).where(ChatSession.key == key)).first()
        if row is None:
            return None
        info = session_info(row)
        messages = s.scalars(select(Message).where(Message.session_id == info.id).order_by(Message.position)).all()
        events = s.scalars(select(SessionEvent).where(SessionEvent.session_id == info.id)
                           .order_by(SessionEvent.id)).all()
        letters = s.scalars(select(DeadLetter).where(DeadLetter.session_key == key).order_by(DeadLetter.id)).all()
        inbox = s.scalars(select(InboxItem).where(InboxItem.session_id == info.id)
                          .order_by(InboxItem.seq, InboxItem.id)).all()
        return {
            "session": info.to_dict(partitions),
            "messages": [message_dict(m) for m in messages],
            "events": [event_dict(e) for e in events],
            "inbox": [inbox_dict(i) for i in inbox],
            "dead_letters": [dead_letter_dict(d) for d in letters],
        }
