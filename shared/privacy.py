"""A user's data, for privacy and access requests: erase it (`sessions erase`) and export it (`sessions export`, the
session browser's user search). Erasing deletes one session per transaction, and the Redis keys that name them."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from sqlalchemy import delete, exists, func, or_, select, update

from shared.audit import ERASED_KEY
from shared.config import Identity
from shared.db import batches, transaction
from shared.messages import DM
from shared.models import (
    AuditEntry,
    ChatSession,
    DeadLetter,
    InboxItem,
    Message,
    SessionEvent,
)
from shared.replybox import box_key
from shared.policies import person_key
from shared.session_queries import (
    SESSION_COLUMNS,
    dead_letter_dict,
    event_dict,
    inbox_dict,
    message_dict,
    session_info,
)
from shared import redis_keys


def _user_ids(user_id: str, identity: Identity | None) -> tuple[list[str], list[str]]:
    """The platform user ids a request for `user_id` covers, and the person DM keys: with an [[identities]] link
    (Settings.identity_of), every account of the person and their per-person session."""
    if identity is None:
        return [user_id], []
    ids = list(identity.all_ids())
    if user_id != identity.person and user_id not in ids:
        ids.insert(0, user_id)
    return ids, [person_key(identity.person)]


def _user_dm_sessions(s: Any, user_ids: Sequence[str], channel: str | None,
                      keys: Sequence[str] = ()) -> list[tuple[int, str]]:
    """The users' direct-message sessions on every channel: the chat is the user (WhatsApp, Telegram), the user
    is its human participant (a Discord DM channel has its own id), or it is the person's shared DM session."""
    q = select(ChatSession.id, ChatSession.key).where(
        ChatSession.chat_kind == DM,
        or_(ChatSession.chat_id.in_(user_ids), ChatSession.key.in_(keys),
            exists().where(Message.session_id == ChatSession.id, Message.role == "user",
                           Message.sender_id.in_(user_ids))))
    if channel:
        q = q.where(ChatSession.channel_id == channel)
    return [(r.id, r.key) for r in s.execute(q.order_by(ChatSession.id)).all()]


def _payload_of(payload: str, user_ids: Sequence[str]) -> dict[str, Any] | None:
    """The stored InboundMessage if it was sent by one of `user_ids`."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and str(doc.get("sender_id")) in user_ids else None


def _mentioning(model: Any, user_ids: Sequence[str]) -> Any:
    """Rows of `model` whose JSON payload holds one of `user_ids` as a string. Escaped: a `%` or `_` in a searched
    id (a web chat visitor id may hold `_`) matches only itself, not every other user's rows."""
    return or_(*(model.payload.contains(json.dumps(u), autoescape=True) for u in user_ids))


def _user_payload_rows(s: Any, model: Any, user_ids: Sequence[str], skip_sessions: set, key_column: str) -> list[Any]:
    """Rows of `model` (dead letters, inbox) holding a message the users sent outside their DM sessions."""
    rows = s.scalars(select(model).where(_mentioning(model, user_ids))).all()
    return [r for r in rows if getattr(r, key_column) not in skip_sessions and _payload_of(r.payload, user_ids)]


@dataclass
class EraseReport:
    user_id: str
    person: str | None = None  # the [[identities]] person whose linked accounts were erased too
    user_ids: list[str] = field(default_factory=list)  # every platform user id erased
    sessions: list[str] = field(default_factory=list)  # direct-message sessions deleted whole
    group_sessions: list[str] = field(default_factory=list)  # group sessions the user's messages were taken from
    messages: int = 0  # the user's messages and the Agent's replies to them
    events: int = 0
    inbox: int = 0
    dead_letters: int = 0
    redis_keys: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def erase_user(url: str, user_id: str, *, channel: str | None = None, dry_run: bool = False,
               progress: Callable[[int, int, str], None] | None = None, batch: int = 500,
               redis_client: Any = None, identity: Identity | None = None) -> EraseReport:
    """Delete everything stored of one platform user: their direct-message sessions whole (messages, events,
    inbox, dead letters), and in groups their messages with the Agent's replies to them, their waiting and
    dead-lettered messages. One session (or `batch` group messages) per transaction; `progress(done, total,
    what)` after each. With `redis_client`, the erased sessions' ingress sequence counters are removed too, so
    a later message from the user starts a fresh session at 1. `dry_run` counts without deleting. With the
    user's `identity` ([[identities]]), every linked account and the person's shared DM session are erased."""
    user_ids, person_keys = _user_ids(user_id, identity)
    report = EraseReport(user_id, identity.person if identity else None, list(user_ids))
    with transaction(url) as s:
        dms = _user_dm_sessions(s, user_ids, channel, person_keys)
        group_q = select(Message.id).join(ChatSession, ChatSession.id == Message.session_id).where(
            Message.role == "user", Message.sender_id.in_(user_ids), ChatSession.chat_kind != DM)
        if channel:
            group_q = group_q.where(ChatSession.channel_id == channel)
        group_ids = list(s.scalars(group_q.order_by(Message.id)).all())
    group_batches = list(batches(group_ids, batch))
    total = len(dms) + len(group_batches) + 1
    done = 0

    def step(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total, what)

    for session_id, key in dms:
        with transaction(url) as s:
            letters = delete(DeadLetter).where(DeadLetter.session_key == key)
            events = delete(SessionEvent).where(SessionEvent.session_id == session_id)
            messages = delete(Message).where(Message.session_id == session_id)
            inbox = delete(InboxItem).where(InboxItem.session_id == session_id)
            if dry_run:
                report.dead_letters += s.scalar(select(func.count()).select_from(DeadLetter)
                                                .where(DeadLetter.session_key == key)) or 0
                report.events += s.scalar(select(func.count()).select_from(SessionEvent)
                                          .where(SessionEvent.session_id == session_id)) or 0
                report.messages += s.scalar(select(func.count()).select_from(Message)
                                            .where(Message.session_id == session_id)) or 0
                report.inbox += s.scalar(select(func.count()).select_from(InboxItem)
                                         .where(InboxItem.session_id == session_id)) or 0
            else:
                report.dead_letters += s.execute(letters).rowcount
                report.events += s.execute(events).rowcount
                report.messages += s.execute(messages).rowcount  # replies with their questions: one statement
                report.inbox += s.execute(inbox).rowcount
                s.execute(delete(ChatSession).where(ChatSession.id == session_id))
                # The log keeps that an operator acted, not on whose conversation.
                s.execute(update(AuditEntry).where(AuditEntry.session_key == key).values(session_key=ERASED_KEY))
        report.sessions.append(key)
        step(key)

    touched: set[str] = set()
    for ids in group_batches:
        with transaction(url) as s:
            which = or_(Message.id.in_(ids), Message.in_reply_to.in_(ids))
            keys = s.scalars(select(ChatSession.key).join(Message, Message.session_id == ChatSession.id)
                             .where(Message.id.in_(ids)).distinct()).all()
            touched.update(keys)
            if dry_run:
                report.messages += s.scalar(select(func.count()).select_from(Message).where(which)) or 0
            else:
                report.messages += s.execute(delete(Message).where(which)).rowcount
        step(f"{len(ids)} group message(s)")

    erased = set(report.sessions)
    with transaction(url) as s:
        letters = _user_payload_rows(s, DeadLetter, user_ids, erased, "session_key")
        if channel:
            letters = [d for d in letters if d.channel_id == channel]
        report.dead_letters += len(letters)
        touched.update(d.session_key for d in letters)
        dm_ids = {sid for sid, _ in dms}
        items = [i for i in _user_payload_rows(s, InboxItem, user_ids, dm_ids, "session_id")
                 if not channel or i.channel_id == channel]
        report.inbox += len(items)
        touched.update(json.loads(i.payload).get("session_key", "?") for i in items)
        if not dry_run:
            if letters:
                s.execute(delete(DeadLetter).where(DeadLetter.id.in_([d.id for d in letters])))
            if items:
                s.execute(delete(InboxItem).where(InboxItem.id.in_([i.id for i in items])))
    step("dead letters and waiting messages")
    report.group_sessions = sorted(touched - erased)

    if redis_client is not None and report.sessions:
        keys = _redis_keys(report.sessions)
        report.redis_keys = (int(redis_client.exists(*keys)) if dry_run
                             else forget_sequences(redis_client, report.sessions))
    return report


def _redis_keys(session_keys: list[str]) -> list[str]:
    """What Redis holds for these sessions: the ingress counter, and a web chat visitor's reply box."""
    keys = [redis_keys.seq(k) for k in session_keys]
    for k in session_keys:
        parts = k.split(":")
        if len(parts) == 3 and parts[1] == DM:  # <channel>:dm:<chat>; harmless for non-webchat channels
            keys.append(box_key(parts[0], parts[2]))
    return keys


def forget_sequences(client: Any, session_keys: list[str]) -> int:
    """Remove what Redis keeps of erased sessions: their ingress counters (`seq:<key>`), so a later message from
    the same user starts a fresh session at 1 instead of waiting for numbers that will never come, and a web
    chat visitor's reply box (the replies' text)."""
    return sum(int(client.delete(*chunk)) for chunk in batches(_redis_keys(session_keys), 500))


def export_user(url: str, user_id: str, *, channel: str | None = None,
                identity: Identity | None = None) -> dict[str, Any]:
    """Everything stored about one platform user, JSON-ready: their direct-message sessions whole (with
    lifecycle events, waiting messages and dead letters), their messages in groups with the Agent's replies
    to them, and their waiting or dead-lettered group messages. With the user's `identity` ([[identities]]),
    of every linked account, and the person's shared DM session."""
    user_ids, person_keys = _user_ids(user_id, identity)
    with transaction(url) as s:
        dms = _user_dm_sessions(s, user_ids, channel, person_keys)
        sessions = []
        for session_id, key in dms:
            row = s.execute(select(*SESSION_COLUMNS).where(ChatSession.id == session_id)).one()
            messages = s.scalars(select(Message).where(Message.session_id == session_id)
                                 .order_by(Message.position)).all()
            events = s.scalars(select(SessionEvent).where(SessionEvent.session_id == session_id)
                               .order_by(SessionEvent.id)).all()
            letters = s.scalars(select(DeadLetter).where(DeadLetter.session_key == key)
                                .order_by(DeadLetter.id)).all()
            inbox = s.scalars(select(InboxItem).where(InboxItem.session_id == session_id)
                              .order_by(InboxItem.seq)).all()
            sessions.append({
                "session": session_info(row).to_dict(),
                "messages": [message_dict(m) for m in messages],
                "events": [event_dict(e) for e in events],
                "inbox": [inbox_dict(i) for i in inbox],
                "dead_letters": [dead_letter_dict(d) for d in letters],
            })
        group_q = (select(Message, ChatSession.key).join(ChatSession, ChatSession.id == Message.session_id)
                   .where(Message.role == "user", Message.sender_id.in_(user_ids), ChatSession.chat_kind != DM))
        if channel:
            group_q = group_q.where(ChatSession.channel_id == channel)
        own = s.execute(group_q.order_by(Message.session_id, Message.position)).all()
        replies: dict[int, list[Message]] = {}
        if own:
            for ids in batches([m.id for m, _ in own], 500):
                for r in s.scalars(select(Message).where(Message.in_reply_to.in_(ids))).all():
                    replies.setdefault(r.in_reply_to, []).append(r)
        group_messages = [{"session_key": key, **message_dict(m),
                           "replies": [message_dict(r) for r in replies.get(m.id, [])]} for m, key in own]
        erased = {key for _, key in dms}
        letters = [d for d in _user_payload_rows(s, DeadLetter, user_ids, erased, "session_key")
                   if not channel or d.channel_id == channel]
        waiting = [i for i in _user_payload_rows(s, InboxItem, user_ids, {sid for sid, _ in dms}, "session_id")
                   if not channel or i.channel_id == channel]
    return {
        "user_id": user_id,
        "person": identity.person if identity else None,
        "user_ids": user_ids,
        "channel": channel,
        "exported_at": datetime.now(timezone.utc).isoformat(),
        "direct_sessions": sessions,
        "group_messages": group_messages,
        "group_inbox": [inbox_dict(i) for i in waiting],
        "group_dead_letters": [dead_letter_dict(d) for d in letters],
    }
