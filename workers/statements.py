"""The turn's statements (workers/store.py runs them): SQLAlchemy Core, built once at import, with parameters bound
by name at each call. (A bind name may not be a column of the updated table.) HELD is the fence: every write of a
holder is conditional on its lease token."""

from __future__ import annotations

import functools
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Integer,
    and_,
    bindparam,
    case,
    delete,
    exists,
    insert,
    literal_column,
    or_,
    select,
    text,
    update,
)

from shared.models import (
    ACTIVE,
    DORMANT,
    HUMAN,
    PENDING,
    SKIPPED,
    ChatSession,
    InboxItem,
    Message,
    SessionEvent,
)

sessions, messages, inbox = ChatSession.__table__, Message.__table__, InboxItem.__table__
events = SessionEvent.__table__

HELD = and_(sessions.c.id == bindparam("sid"), sessions.c.lease_token == bindparam("token"))  # the fence
FREE = or_(sessions.c.lease_until.is_(None), sessions.c.lease_until < bindparam("t"))
SEQ = bindparam("seq", type_=BigInteger())
SEQ_FORWARD = case((sessions.c.last_seq < SEQ, SEQ), else_=sessions.c.last_seq)  # a replay never moves it back
UNSENT = messages.c.delivery_status == literal_column(f"'{PENDING}'")  # inline: the partial index's predicate

HANDOFF_STATE = (sessions.c.mode, sessions.c.operator, sessions.c.notice_sent)
SESSION_STATE = (sessions.c.id, sessions.c.status, sessions.c.generation, sessions.c.last_seq,
                  sessions.c.last_activity_at, sessions.c.lease_until)
FIND_SESSION = select(*SESSION_STATE).where(sessions.c.key == bindparam("key"))
# The ingress's counter restarted (SEQ_TTL_S): the session's order starts over. Checked again under the row lock,
# and never for a message already stored (a very late redelivery) or while anything waits in the inbox.
RESTART_SEQ = (update(sessions)
                .where(sessions.c.id == bindparam("sid"), sessions.c.last_seq >= SEQ,
                       sessions.c.last_activity_at < bindparam("idle_since"),
                       ~exists().where(inbox.c.session_id == sessions.c.id),
                       ~exists().where(messages.c.channel_id == bindparam("channel"),
                                       messages.c.platform_message_id == bindparam("pmid")))
                .values(last_seq=0))
# Waking leaves last_activity_at to the turn: a reset policy compares the message with the activity before it.
WAKE = (update(sessions).where(sessions.c.id == bindparam("sid"), sessions.c.status == DORMANT)
         .values(status=ACTIVE).returning(sessions.c.generation))
ADD_EVENT = insert(events)


def event(session_id: int, generation: int, name: str, at: datetime, actor: str | None = None,
          detail: str | None = None) -> dict:
    """ADD_EVENT's parameters: a session's lifecycle event (created, resumed, new generation, went dormant, the
    handoff's), with who made it and why (handoff)."""
    return {"session_id": session_id, "generation": generation, "event": name, "at": at, "actor": actor,
            "detail": detail}


CLAIM = (update(sessions).where(sessions.c.id == bindparam("sid"), FREE)
          .values(lease_token=sessions.c.lease_token + 1, lease_until=bindparam("until"))
          .returning(sessions.c.id, sessions.c.channel_id, sessions.c.lease_token, sessions.c.generation,
                     sessions.c.last_seq, sessions.c.chat_id, sessions.c.chat_kind, sessions.c.status,
                     sessions.c.last_activity_at, *HANDOFF_STATE))
RENEW = update(sessions).where(HELD).values(lease_until=bindparam("until"))
RENEW_FOR_TURN = RENEW.returning(sessions.c.generation, sessions.c.last_seq, sessions.c.last_activity_at,
                                 *HANDOFF_STATE)
# A turn's change of who answers (the user or the Agent asked for a person): only from the mode the turn read, so an
# operator's takeover committed meanwhile (shared/handoff.py) is never undone by it.
SET_MODE = (update(sessions).where(HELD, sessions.c.mode == bindparam("seen"))
            .values(mode=bindparam("new_mode"), operator=None, mode_at=bindparam("t"),
                    handoff_reason=bindparam("reason"), notice_sent=bindparam("noticed"))
            .returning(sessions.c.id))
NEXT_POSITION = (update(sessions).where(HELD).values(message_count=sessions.c.message_count + 1)
                 .returning(sessions.c.message_count))  # a message stored outside a turn's commit (a notice)
NOTICED = update(sessions).where(HELD, sessions.c.mode == bindparam("seen")).values(notice_sent=True)
# An operator's reply is stored only while the operator it names has the session; it restarts their idle clock.
OPERATOR_ACTIVE = (update(sessions).where(HELD, sessions.c.mode == HUMAN, sessions.c.operator == bindparam("op"))
                   .values(mode_at=bindparam("t")).returning(sessions.c.id))
RELEASE = update(sessions).where(HELD).values(lease_until=None).returning(sessions.c.last_seq)

ROUTE = (messages.c.channel_id, messages.c.chat_id, messages.c.chat_kind, messages.c.thread_id,
          messages.c.user_sent_at)  # where a reply goes (NULL chat on rows older than migration 0004)
OUTBOX = (select(messages.c.id, messages.c.text, *ROUTE).where(messages.c.session_id == bindparam("sid"), UNSENT)
           .order_by(messages.c.position))
HEAD = (select(inbox.c.id, inbox.c.seq, inbox.c.payload,
                exists().where(messages.c.channel_id == inbox.c.channel_id,
                               messages.c.platform_message_id == inbox.c.platform_message_id).label("stored"))
         .where(inbox.c.session_id == bindparam("sid")).order_by(inbox.c.seq, inbox.c.id)
         .limit(bindparam("take", type_=Integer())))  # 1, or a burst's worth (Store.claim's `take`)
HISTORY = (select(messages.c.role, messages.c.sender_id, messages.c.sender_name, messages.c.text,
                   messages.c.created_at)
            .where(messages.c.session_id == bindparam("sid"), messages.c.generation == bindparam("generation"),
                   or_(messages.c.delivery_status.is_(None), messages.c.delivery_status != SKIPPED))
            .order_by(messages.c.position.desc()).limit(bindparam("limit", type_=Integer())))
READY = select(exists().where(inbox.c.session_id == bindparam("sid"), inbox.c.seq <= bindparam("upto")))
NEWER = select(exists().where(inbox.c.session_id == bindparam("sid"), inbox.c.seq > bindparam("seq")))

COMMIT = (update(sessions).where(HELD)  # fenced, and a renewal of the lease: the send that follows needs no other
           .values(message_count=sessions.c.message_count + bindparam("count"), last_activity_at=bindparam("t"),
                   generation=bindparam("gen"), status=ACTIVE, last_seq=SEQ_FORWARD, lease_until=bindparam("until"))
           .returning(sessions.c.message_count, sessions.c.last_seq))
SETTLE_SEQ = update(sessions).where(HELD).values(last_seq=SEQ_FORWARD).returning(sessions.c.last_seq)
SETTLE_DEAD = (update(sessions).where(HELD).values(last_seq=SEQ_FORWARD, last_activity_at=bindparam("t"))
                .returning(sessions.c.last_seq))
TAKE_ITEM = delete(inbox).where(inbox.c.id == bindparam("item"))
ADD_MESSAGE = insert(messages).returning(messages.c.id)
MARK_DELIVERY = (update(messages).where(messages.c.id == bindparam("rid"))
                  .values(delivery_status=bindparam("outcome"), delivery_error=bindparam("error"),
                          delivery_attempts=messages.c.delivery_attempts + bindparam("attempts"),
                          delivered_at=bindparam("at")))

# On PostgreSQL, the common case of each of a turn's transactions as one call (migration 0007: one round trip).
ACCEPT_CALL = text("SELECT cs_accept(:key, :seq, :t, :until, :channel, :chat_kind, :chat_id, :pmid, :payload, "
                   ":idle_since, :read)")
NEXT_TURN_CALL = text("SELECT cs_next_turn(:sid, :token, :until, :read)")
COMMIT_TURN_CALL = text(
    "SELECT held, reply_id, ready FROM cs_commit_turn(:sid, :token, :gen, :t, :until, :item, :seq, :channel, :chat, "
    ":kind, :thread, :sender_id, :sender_name, :text, :pmid, :reply, :reply_sender_id, :reply_sender_name, "
    ":user_sent_at)")
RELEASE_CALL = text("SELECT cs_release(:sid, :token, :rid, :outcome, :error, :attempts, :at)")


@functools.cache
def upserts(dialect: str):
    """The statements with an ON CONFLICT clause, whose construct is the dialect's own."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    create_session = (dialect_insert(sessions).on_conflict_do_nothing(index_elements=["key"])
                      .returning(*SESSION_STATE))
    enqueue = dialect_insert(inbox).on_conflict_do_nothing(index_elements=["channel_id", "platform_message_id"])
    return create_session, enqueue
