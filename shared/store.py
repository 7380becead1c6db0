"""Session storage operations. Each function is one short transaction; the fencing token guards every write.

A message is accepted into its session's inbox; the session's lease holder takes the inbox in `seq` order,
one turn at a time, and never holds a transaction while the Agent runs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Iterable

from sqlalchemy import and_, case, delete, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from shared.config import ChannelConfig
from shared.db import engine_for, transaction
from shared.errors import ChatSessionsError
from shared.messages import Delivery, InboundMessage
from shared.models import (
    ACTIVE,
    CREATED,
    DORMANT,
    FAILED,
    NEW_GENERATION,
    PENDING,
    RESUMED,
    SENT,
    WENT_DORMANT,
    Channel,
    ChatSession,
    DeadLetter,
    InboxItem,
    Message,
    SessionEvent,
)


class LeaseBusy(ChatSessionsError):
    """Another holder owns the session's lease; it drains the session's inbox, this caller need not."""


class LeaseLost(ChatSessionsError):
    """The fencing token changed: another holder took the session over; this holder must stop."""


class AlreadyStored(ChatSessionsError):
    """The platform message is already stored: a redelivery, not a new turn."""


@dataclass(frozen=True)
class Accepted:
    session_id: int
    new: bool  # False: the message is already in the inbox (a redelivery)


@dataclass(frozen=True)
class Claim:
    session_id: int
    channel_id: str
    token: int  # the fencing token: every write of this holder checks it
    generation: int
    last_seq: int
    chat_id: str
    chat_kind: str


@dataclass(frozen=True)
class StoredMessage:
    role: str
    sender_id: str
    sender_name: str
    text: str
    at: datetime


@dataclass(frozen=True)
class Turn:
    """The next inbox message of a claimed session, with the context the Agent may see."""

    claim: Claim  # refreshed: generation and last_seq as of this turn
    item_id: int
    message: InboundMessage
    history: list[StoredMessage]
    stored: bool  # the message is already in the conversation (a redelivery): nothing to run


@dataclass(frozen=True)
class PendingReply:
    id: int
    channel_id: str
    chat_id: str
    chat_kind: str
    text: str


def now() -> datetime:
    return datetime.now(timezone.utc)


def _insert(url: str):
    if engine_for(url).dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def _as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones in the session's zone."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _held_by(claim: Claim):
    return and_(ChatSession.id == claim.session_id, ChatSession.lease_token == claim.token)


def _lease_free(t: datetime):
    return or_(ChatSession.lease_until.is_(None), ChatSession.lease_until < t)


class Store:
    def __init__(self, database_url: str):
        self.url = database_url
        self.insert = _insert(database_url)

    def sync_channels(self, channels: Iterable[ChannelConfig]) -> None:
        """Make the channels table match the config (rows are kept for channels that left it)."""
        with transaction(self.url) as s:
            for c in channels:
                stmt = self.insert(Channel).values(id=c.id, platform=c.platform, agent=c.agent, created_at=now())
                s.execute(stmt.on_conflict_do_update(index_elements=["id"], set_={"platform": c.platform, "agent": c.agent}))

    # -- accepting ----------------------------------------------------------------------------------------------

    def accept(self, msg: InboundMessage) -> Accepted:
        """Record a message in its session's inbox (creating the session, or waking a dormant one).

        After this commits the message is durable: the broker's copy may be acknowledged.
        """
        t = now()
        with transaction(self.url) as s:
            upsert = self.insert(ChatSession).values(
                channel_id=msg.channel_id, key=msg.session_key, chat_kind=msg.chat_kind, chat_id=msg.chat_id,
                status=ACTIVE, generation=1, message_count=0, last_seq=0, lease_token=0,
                created_at=t, last_activity_at=t,
            )
            row = s.execute(upsert.on_conflict_do_update(index_elements=["key"], set_={"last_activity_at": t})
                            .returning(ChatSession.id, ChatSession.status, ChatSession.generation,
                                       ChatSession.created_at)).one()
            if _as_utc(row.created_at) == t:  # inserted just now, not updated
                s.add(SessionEvent(session_id=row.id, generation=row.generation, event=CREATED, at=t))
            elif row.status == DORMANT:
                s.execute(update(ChatSession).where(ChatSession.id == row.id).values(status=ACTIVE))
                s.add(SessionEvent(session_id=row.id, generation=row.generation, event=RESUMED, at=t))
            # A redelivery of an answered message goes through the inbox too: its turn, in seq order,
            # only records that this seq is settled, so later messages don't wait for it.
            inserted = s.execute(self.insert(InboxItem).values(
                session_id=row.id, channel_id=msg.channel_id, platform_message_id=msg.platform_message_id,
                seq=msg.seq, payload=json.dumps(msg.to_dict()), created_at=t,
            ).on_conflict_do_nothing(index_elements=["channel_id", "platform_message_id"])).rowcount
            return Accepted(row.id, new=bool(inserted))

    # -- the lease ----------------------------------------------------------------------------------------------

    def claim(self, session_id: int, lease_seconds: float) -> Claim:
        """Take the session's lease with a new fencing token; LeaseBusy if another holder has it."""
        t = now()
        with transaction(self.url) as s:
            row = s.execute(
                update(ChatSession)
                .where(ChatSession.id == session_id, _lease_free(t))
                .values(lease_token=ChatSession.lease_token + 1, lease_until=t + timedelta(seconds=lease_seconds))
                .returning(ChatSession.id, ChatSession.channel_id, ChatSession.lease_token, ChatSession.generation,
                           ChatSession.last_seq, ChatSession.chat_id, ChatSession.chat_kind)
            ).first()
        if row is None:
            raise LeaseBusy(str(session_id))
        return Claim(*row)

    def release(self, claim: Claim) -> None:
        with transaction(self.url) as s:
            s.execute(update(ChatSession).where(_held_by(claim)).values(lease_until=None))

    def renew(self, claim: Claim, lease_seconds: float) -> None:
        """Extend the lease if this holder still has it (the fencing check before a send); LeaseLost if not."""
        with transaction(self.url) as s:
            renewed = s.execute(update(ChatSession).where(_held_by(claim))
                                .values(lease_until=now() + timedelta(seconds=lease_seconds))).rowcount
        if not renewed:
            raise LeaseLost(str(claim.session_id))

    # -- turns --------------------------------------------------------------------------------------------------

    def next_turn(self, claim: Claim, lease_seconds: float, history_limit: int, force: bool = False) -> Turn | None:
        """The inbox message whose turn it is (lowest seq, right after last_seq), with its context; renews the
        lease. None if the inbox is empty or its head waits for an earlier message (unless `force`)."""
        t = now()
        with transaction(self.url) as s:
            row = s.execute(
                update(ChatSession).where(_held_by(claim))
                .values(lease_until=t + timedelta(seconds=lease_seconds))
                .returning(ChatSession.generation, ChatSession.last_seq)
            ).first()
            if row is None:
                raise LeaseLost(str(claim.session_id))
            claim = replace(claim, generation=row.generation, last_seq=row.last_seq)
            head = s.execute(select(InboxItem.id, InboxItem.seq, InboxItem.payload)
                             .where(InboxItem.session_id == claim.session_id)
                             .order_by(InboxItem.seq, InboxItem.id).limit(1)).first()
            if head is None or (head.seq > claim.last_seq + 1 and not force):
                return None
            message = InboundMessage.from_dict(json.loads(head.payload))
            if s.scalar(select(exists().where(Message.channel_id == message.channel_id,
                                              Message.platform_message_id == message.platform_message_id))):
                return Turn(claim, head.id, message, [], stored=True)
            history = s.execute(
                select(Message.role, Message.sender_id, Message.sender_name, Message.text, Message.created_at)
                .where(Message.session_id == claim.session_id, Message.generation == claim.generation)
                .order_by(Message.position.desc()).limit(history_limit)
            ).all()
        return Turn(claim, head.id, message, [StoredMessage(*r) for r in reversed(history)], stored=False)

    def commit_turn(self, turn: Turn, reply: str | None, *, new_generation: bool = False) -> None:
        """Move the message from the inbox into the conversation with its reply (the outbox entry), all or
        nothing. LeaseLost if the fencing token moved, AlreadyStored if the platform id is already stored."""
        claim, msg, t = turn.claim, turn.message, now()
        generation = claim.generation + 1 if new_generation else claim.generation
        count = 2 if reply else 1
        try:
            with transaction(self.url) as s:
                row = s.execute(
                    update(ChatSession).where(_held_by(claim))
                    .values(message_count=ChatSession.message_count + count, last_activity_at=t,
                            generation=generation, status=ACTIVE, last_seq=_max_seq(msg.seq))
                    .returning(ChatSession.message_count)
                ).first()
                if row is None:
                    raise LeaseLost(msg.session_key)
                s.execute(delete(InboxItem).where(InboxItem.id == turn.item_id))
                position = row.message_count - count
                inbound = Message(
                    session_id=claim.session_id, generation=claim.generation, position=position, role="user",
                    sender_id=msg.sender_id, sender_name=msg.sender_name, text=msg.text, channel_id=msg.channel_id,
                    platform_message_id=msg.platform_message_id, ingress_seq=msg.seq, created_at=t,
                )
                s.add(inbound)
                s.flush()
                if new_generation:
                    s.add(SessionEvent(session_id=claim.session_id, generation=generation, event=NEW_GENERATION, at=t))
                if reply:
                    s.add(Message(
                        session_id=claim.session_id, generation=claim.generation, position=position + 1,
                        role="assistant", sender_id="agent", sender_name="Agent", text=reply,
                        channel_id=msg.channel_id, created_at=t, in_reply_to=inbound.id, delivery_status=PENDING,
                    ))
        except IntegrityError as exc:
            if "platform" in str(exc.orig).lower():
                raise AlreadyStored(msg.platform_message_id) from None
            raise

    def discard(self, turn: Turn) -> None:
        """Drop an inbox message that turned out to be stored already (a redelivery)."""
        with transaction(self.url) as s:
            if s.execute(update(ChatSession).where(_held_by(turn.claim))
                         .values(last_seq=_max_seq(turn.message.seq))).rowcount:
                s.execute(delete(InboxItem).where(InboxItem.id == turn.item_id))

    def dead_letter(self, turn: Turn, error: str, attempts: int) -> None:
        """Set a failed message aside (fenced, like a commit) so the session goes on with its next message."""
        msg = turn.message
        with transaction(self.url) as s:
            if not s.execute(update(ChatSession).where(_held_by(turn.claim))
                             .values(last_seq=_max_seq(msg.seq))).rowcount:
                raise LeaseLost(msg.session_key)
            s.execute(delete(InboxItem).where(InboxItem.id == turn.item_id))
            s.execute(self.insert(DeadLetter).values(
                channel_id=msg.channel_id, session_key=msg.session_key, platform_message_id=msg.platform_message_id,
                payload=json.dumps(msg.to_dict()), error=error[:4000], attempts=attempts, created_at=now(),
            ).on_conflict_do_update(index_elements=["channel_id", "platform_message_id"],
                                    set_={"error": error[:4000], "attempts": attempts, "created_at": now()}))

    def has_ready(self, session_id: int) -> bool:
        """Whether the session's inbox head may run now (checked after a release, so nothing is stranded)."""
        with transaction(self.url) as s:
            return bool(s.scalar(select(exists().where(
                InboxItem.session_id == session_id, ChatSession.id == session_id,
                InboxItem.seq <= ChatSession.last_seq + 1))))

    def stalled(self, grace_s: float, order_wait_s: float, limit: int = 500) -> list[tuple[int, str, bool]]:
        """Sessions whose inbox waits with nobody holding the lease: (session id, key, force past a gap).

        A holder that died leaves its inbox here once its lease expires; a head waiting more than
        `order_wait_s` for an earlier message that never came is forced through (a logged gap).
        """
        t = now()
        with transaction(self.url) as s:
            rows = s.execute(
                select(ChatSession.id, ChatSession.key, func.min(InboxItem.created_at))
                .join(InboxItem, InboxItem.session_id == ChatSession.id)
                .where(_lease_free(t), InboxItem.created_at < t - timedelta(seconds=grace_s))
                .group_by(ChatSession.id, ChatSession.key).limit(limit)
            ).all()
        cutoff = t - timedelta(seconds=order_wait_s)
        return [(r[0], r[1], _as_utc(r[2]) < cutoff) for r in rows]

    # -- the outbox ---------------------------------------------------------------------------------------------

    def pending_replies(self, session_id: int) -> list[PendingReply]:
        """Unsent replies of a session, in order (the outbox)."""
        with transaction(self.url) as s:
            rows = s.execute(
                select(Message.id, Message.channel_id, ChatSession.chat_id, ChatSession.chat_kind, Message.text)
                .join(ChatSession, ChatSession.id == Message.session_id)
                .where(Message.session_id == session_id, Message.delivery_status == PENDING)
                .order_by(Message.position)
            ).all()
        return [PendingReply(*r) for r in rows]

    def mark_delivery(self, reply_id: int, delivery: Delivery, retry_for_s: float = 60.0) -> None:
        """Record a send's outcome. Retried in place on a database outage: the reply already left, and a
        retried turn would find it still pending and send it again."""
        deadline, wait = time.monotonic() + retry_for_s, 0.2
        while True:
            try:
                with transaction(self.url) as s:
                    s.execute(update(Message).where(Message.id == reply_id).values(
                        delivery_status=SENT if delivery.ok else FAILED, delivery_error=delivery.error,
                        delivery_attempts=Message.delivery_attempts + delivery.attempts,
                        delivered_at=now() if delivery.ok else None,
                    ))
                return
            except (OperationalError, InterfaceError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(wait)
                wait = min(wait * 2, 5.0)

    def stale_outbox(self, older_than_s: float, limit: int = 500) -> list[tuple[int, str]]:
        """Sessions (id, key) with a reply committed over `older_than_s` ago but never sent (its sender died)."""
        t = now()
        with transaction(self.url) as s:
            return [tuple(r) for r in s.execute(
                select(Message.session_id, ChatSession.key).join(ChatSession, ChatSession.id == Message.session_id)
                .where(Message.delivery_status == PENDING, Message.created_at < t - timedelta(seconds=older_than_s),
                       _lease_free(t))
                .distinct().limit(limit)
            ).all()]

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def mark_dormant(self, channel_id: str, idle_minutes: float, batch: int = 500) -> int:
        """Active sessions idle for `idle_minutes` become dormant, in batches; returns how many."""
        total = 0
        while True:
            t = now()
            cutoff = t - timedelta(minutes=idle_minutes)
            with transaction(self.url) as s:
                ids = s.scalars(select(ChatSession.id).where(
                    ChatSession.channel_id == channel_id, ChatSession.status == ACTIVE,
                    ChatSession.last_activity_at < cutoff, _lease_free(t),
                ).limit(batch)).all()
                if ids:
                    rows = s.execute(update(ChatSession).where(ChatSession.id.in_(ids), ChatSession.status == ACTIVE)
                                     .values(status=DORMANT).returning(ChatSession.id, ChatSession.generation)).all()
                    s.add_all(SessionEvent(session_id=r.id, generation=r.generation, event=WENT_DORMANT, at=t) for r in rows)
                    total += len(rows)
            if len(ids) < batch:
                return total


def _max_seq(seq: int):
    """last_seq moves forward only (a replayed older message must not move it back)."""
    return case((ChatSession.last_seq < seq, seq), else_=ChatSession.last_seq)


@dataclass(frozen=True)
class SessionSummary:
    key: str
    channel_id: str
    status: str
    generation: int
    message_count: int
    created_at: datetime
    last_activity_at: datetime


@dataclass(frozen=True)
class TranscriptLine:
    at: datetime
    generation: int
    kind: str  # "user", "assistant" or "event"
    sender_name: str
    text: str
    delivery_status: str | None = None


def transcript(url: str, session_key: str) -> tuple[SessionSummary, list[TranscriptLine]] | None:
    """A session's messages of every generation, interleaved with its lifecycle events, in order."""
    with transaction(url) as s:
        session = s.scalars(select(ChatSession).where(ChatSession.key == session_key)).first()
        if session is None:
            return None
        summary = SessionSummary(session.key, session.channel_id, session.status, session.generation,
                                 session.message_count, session.created_at, session.last_activity_at)
        messages = s.scalars(select(Message).where(Message.session_id == session.id).order_by(Message.position)).all()
        events = s.scalars(select(SessionEvent).where(SessionEvent.session_id == session.id)
                           .order_by(SessionEvent.id)).all()
    lines = [TranscriptLine(m.created_at, m.generation, m.role, m.sender_name, m.text, m.delivery_status)
             for m in messages]
    lines += [TranscriptLine(e.at, e.generation, "event", "", e.event) for e in events]
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


def drop_dead_letter(url: str, letter_id: int) -> bool:
    with transaction(url) as s:
        return bool(s.execute(delete(DeadLetter).where(DeadLetter.id == letter_id)).rowcount)
