"""The store: channels, sessions (one row per session key, generations inside), messages, lifecycle events."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy import text as sql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ACTIVE = "active"
DORMANT = "dormant"

# Lifecycle events
CREATED = "created"
WENT_DORMANT = "dormant"
RESUMED = "resumed"
NEW_GENERATION = "new_session"
HANDOFF_REQUESTED = "handoff_requested"  # the user, the Agent or a policy asked for a person: the session waits
TAKEN_OVER = "taken_over"  # an operator has the session: the Agent does not run
RETURNED = "returned"  # back to the Agent (an operator handed it back, or no operator reply for human_idle_minutes)

# Who answers a session (docs/operations.md, "Handing over to a person")
AGENT = "agent"
WAITING = "waiting"  # a person was asked for; the Agent does not run until an operator returns the session
HUMAN = "human"  # an operator has it

# Delivery states of a reply (the reply row is the outbox entry)
PENDING = "pending"
SENT = "sent"
FAILED = "failed"
SKIPPED = "skipped"  # never sent: a newer message of the session made it stale (burst = "latest")

Id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements only INTEGER keys


class Base(DeclarativeBase):
    pass


class Channel(Base):
    __tablename__ = "channels"
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    platform: Mapped[str] = mapped_column(String(20))
    agent: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ChatSession(Base):
    """One conversation context per session key; `/new` bumps `generation`, old generations stay stored."""

    __tablename__ = "sessions"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    channel_id: Mapped[str] = mapped_column(ForeignKey("channels.id"))
    key: Mapped[str] = mapped_column(String(300), unique=True)
    chat_kind: Mapped[str] = mapped_column(String(10))
    chat_id: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(10), default=ACTIVE)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    message_count: Mapped[int] = mapped_column(Integer, default=0)  # next message position
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)  # highest ingress seq whose turn is done
    lease_token: Mapped[int] = mapped_column(BigInteger, default=0)  # fencing token, +1 per claim
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_activity_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Handoff: who answers (AGENT, WAITING, HUMAN), which operator has it, since when (waiting: when it was asked
    # for, the waiting queue's order; human: the operator's last action, from which human_idle_minutes counts),
    # why a person was asked for, and whether the user has had the one notice of this handoff.
    mode: Mapped[str] = mapped_column(String(10), server_default=AGENT)
    operator: Mapped[str | None] = mapped_column(String(100), nullable=True)
    mode_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    handoff_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    notice_sent: Mapped[bool] = mapped_column(Boolean, server_default=sql("false"))

    __table_args__ = (
        Index("ix_sessions_idle", "channel_id", "status", "last_activity_at"),
        Index("ix_sessions_handoff", "mode", "mode_at", postgresql_where=sql("mode <> 'agent'"),
              sqlite_where=sql("mode <> 'agent'")),
    )


class Message(Base):
    __tablename__ = "messages"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    generation: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)  # per-session order of stored messages
    role: Mapped[str] = mapped_column(String(10))  # "user" or "assistant"
    sender_id: Mapped[str] = mapped_column(String(100))
    sender_name: Mapped[str] = mapped_column(String(200))
    text: Mapped[str] = mapped_column(Text)
    channel_id: Mapped[str] = mapped_column(String(100))
    platform_message_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    ingress_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Where the message was said (inbound) or goes (a reply: the chat of the message it answers, which in a
    # per-person session or a topic is not the session row's chat). NULL on rows older than migration 0004.
    chat_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    chat_kind: Mapped[str | None] = mapped_column(String(10), nullable=True)
    thread_id: Mapped[str | None] = mapped_column(String(100), nullable=True)  # Telegram topic / Discord thread
    # Replies only: when the user sent the message it answers (WhatsApp's customer-service window).
    user_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Replies only: the outbox state and the delivery outcome.
    in_reply_to: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), nullable=True)
    delivery_status: Mapped[str | None] = mapped_column(String(10), nullable=True)
    delivery_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    delivery_attempts: Mapped[int] = mapped_column(Integer, default=0)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (
        UniqueConstraint("channel_id", "platform_message_id", name="uq_messages_platform_id"),
        UniqueConstraint("session_id", "position", name="uq_messages_session_position"),
        Index("ix_messages_session_generation", "session_id", "generation", "position"),
        Index("ix_messages_delivery", "delivery_status", postgresql_where=sql("delivery_status = 'pending'"),
              sqlite_where=sql("delivery_status = 'pending'")),
    )


class SessionEvent(Base):
    __tablename__ = "session_events"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    event: Mapped[str] = mapped_column(String(20))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str | None] = mapped_column(String(100), nullable=True)  # handoff: "user", "agent", an operator
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)  # handoff: why


class DeadLetter(Base):
    """A message whose turn failed for good; kept with the error until an operator replays or drops it."""

    __tablename__ = "dead_letters"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    channel_id: Mapped[str] = mapped_column(String(100))
    session_key: Mapped[str] = mapped_column(String(300), index=True)
    platform_message_id: Mapped[str] = mapped_column(String(200))
    payload: Mapped[str] = mapped_column(Text)  # the InboundMessage as JSON, ready to replay
    error: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (UniqueConstraint("channel_id", "platform_message_id", name="uq_dead_letters_platform_id"),)


class InboxItem(Base):
    """An accepted message waiting for its session's turn. The session's lease holder drains these in
    `seq` order, so a worker thread never waits for another message of the same session."""

    __tablename__ = "inbox"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    channel_id: Mapped[str] = mapped_column(String(100))
    platform_message_id: Mapped[str] = mapped_column(String(200))
    seq: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[str] = mapped_column(Text)  # the InboundMessage as JSON
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("channel_id", "platform_message_id", name="uq_inbox_platform_id"),
        Index("ix_inbox_session_seq", "session_id", "seq"),
        Index("ix_inbox_created", "created_at"),
    )


class AuditEntry(Base):
    """An operator's action — who, what, which session, when — for `chatsessions audit`. Kept by session key, not
    by row, so it outlives the session; erasing a user's session blanks the key (shared/privacy.py)."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(String(100))  # an operator's name, or "admin" (ADMIN_TOKEN)
    action: Mapped[str] = mapped_column(String(20))  # taken_over | reply | returned
    session_key: Mapped[str] = mapped_column(String(300), index=True)
    via: Mapped[str] = mapped_column(String(20))  # console | cli
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
