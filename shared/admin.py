"""What the operators' commands read and repair: sessions by filter, a forced new session, a user's data
(erase and export, for privacy and access requests), stuck sessions and the partition queues in Redis.

Every write here is as careful as a turn: forcing a new session takes the session's lease and makes a
fenced update; erasing deletes a user's rows one session per transaction; recovering only releases leases
that expired and asks the sweeper to resend — it never invents or re-orders a message.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Mapping, Sequence

from sqlalchemy import delete, exists, func, or_, select, update

from shared.config import Identity
from shared.db import transaction
from shared.messages import DM
from shared.models import (
    NEW_GENERATION,
    PENDING,
    ChatSession,
    DeadLetter,
    InboxItem,
    Message,
    SessionEvent,
)
from shared.partitioning import partition_of, queue_name
from shared.replybox import box_key
from shared.policies import person_key
from shared.store import LeaseLost, Store, now

UNACKED_KEY = "unacked"  # kombu's Redis transport: delivered but unacknowledged messages
SEQ_PREFIX = "seq:"  # the ingress's per-session sequence counters (ingress/ledger.py)


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones."""
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _iso(value: datetime | None) -> str | None:
    value = _utc(value)
    return value.isoformat() if value else None


def _epoch(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, timezone.utc) if value else None


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ----------------------------------------------------------------------------------------------------------------
# Sessions


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

    def to_dict(self, partitions: int | None = None) -> dict[str, Any]:
        d = asdict(self)
        for k in ("lease_until", "created_at", "last_activity_at"):
            d[k] = _iso(d[k])
        if partitions:
            d["partition"] = partition_of(self.key, partitions)
        return d


_SESSION_COLUMNS = (ChatSession.id, ChatSession.key, ChatSession.channel_id, ChatSession.chat_kind,
                    ChatSession.chat_id, ChatSession.status, ChatSession.generation, ChatSession.message_count,
                    ChatSession.last_seq, ChatSession.lease_until, ChatSession.created_at,
                    ChatSession.last_activity_at)


def _session(row: Any) -> SessionInfo:
    values = list(row)
    for i in (9, 10, 11):
        values[i] = _utc(values[i])
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
        conditions.append(ChatSession.last_activity_at < now() - timedelta(minutes=idle_minutes))
    with transaction(url) as s:
        total = s.scalar(select(func.count()).select_from(ChatSession).where(*conditions)) or 0
        rows = s.execute(select(*_SESSION_COLUMNS).where(*conditions)
                         .order_by(ChatSession.last_activity_at.desc(), ChatSession.id.desc())
                         .offset((page - 1) * limit).limit(limit)).all()
    return Page([_session(r) for r in rows], total, page, limit)


def get_session(url: str, key: str) -> SessionInfo | None:
    with transaction(url) as s:
        row = s.execute(select(*_SESSION_COLUMNS).where(ChatSession.key == key)).first()
    return _session(row) if row else None


def _message_dict(m: Message) -> dict[str, Any]:
    return {
        "id": m.id, "generation": m.generation, "position": m.position, "role": m.role,
        "sender_id": m.sender_id, "sender_name": m.sender_name, "text": m.text,
        "platform_message_id": m.platform_message_id, "seq": m.ingress_seq, "created_at": _iso(m.created_at),
        "in_reply_to": m.in_reply_to, "delivery_status": m.delivery_status, "delivery_error": m.delivery_error,
        "delivery_attempts": m.delivery_attempts, "delivered_at": _iso(m.delivered_at),
    }


def _dead_letter_dict(d: DeadLetter) -> dict[str, Any]:
    try:
        message = json.loads(d.payload)
    except ValueError:
        message = None
    return {"id": d.id, "channel_id": d.channel_id, "session_key": d.session_key,
            "platform_message_id": d.platform_message_id, "error": d.error, "attempts": d.attempts,
            "created_at": _iso(d.created_at), "message": message}


def _inbox_dict(item: Any) -> dict[str, Any]:
    try:
        message = json.loads(item.payload)
    except ValueError:
        message = None
    return {"id": item.id, "seq": item.seq, "platform_message_id": item.platform_message_id,
            "created_at": _iso(item.created_at), "message": message}


def session_detail(url: str, key: str, partitions: int | None = None) -> dict[str, Any] | None:
    """Everything stored about one session, JSON-ready: the row, its messages of every generation,
    lifecycle events, messages waiting in its inbox and its dead letters."""
    with transaction(url) as s:
        row = s.execute(select(*_SESSION_COLUMNS).where(ChatSession.key == key)).first()
        if row is None:
            return None
        info = _session(row)
        messages = s.scalars(select(Message).where(Message.session_id == info.id).order_by(Message.position)).all()
        events = s.scalars(select(SessionEvent).where(SessionEvent.session_id == info.id)
                           .order_by(SessionEvent.id)).all()
        letters = s.scalars(select(DeadLetter).where(DeadLetter.session_key == key).order_by(DeadLetter.id)).all()
        inbox = s.scalars(select(InboxItem).where(InboxItem.session_id == info.id)
                          .order_by(InboxItem.seq, InboxItem.id)).all()
        return {
            "session": info.to_dict(partitions),
            "messages": [_message_dict(m) for m in messages],
            "events": [{"generation": e.generation, "event": e.event, "at": _iso(e.at)} for e in events],
            "inbox": [_inbox_dict(i) for i in inbox],
            "dead_letters": [_dead_letter_dict(d) for d in letters],
        }


def force_new_session(url: str, key: str, lease_seconds: float) -> int:
    """Start a new generation of the session, as `/new` does, and return it: older messages stay stored but
    are never given to the Agent again. Takes the lease like a turn (LeaseBusy while one runs) and writes
    fenced by its token, so it cannot interleave with a turn. LookupError if there is no such session."""
    session = get_session(url, key)
    if session is None:
        raise LookupError(f"no session {key!r}")
    claim = Store(url).claim(session.id, lease_seconds)
    t = now()
    with transaction(url) as s:
        row = s.execute(
            update(ChatSession)
            .where(ChatSession.id == session.id, ChatSession.lease_token == claim.token)
            .values(generation=ChatSession.generation + 1, lease_until=None)
            .returning(ChatSession.generation)
        ).first()
        if row is None:
            raise LeaseLost(key)
        s.add(SessionEvent(session_id=session.id, generation=row.generation, event=NEW_GENERATION, at=t))
    return row.generation


# ----------------------------------------------------------------------------------------------------------------
# One platform user's data: erase (privacy requests) and export (access requests)


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
    batches = list(_chunks(group_ids, batch))
    total = len(dms) + len(batches) + 1
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
        report.sessions.append(key)
        step(key)

    touched: set[str] = set()
    for ids in batches:
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
    keys = [SEQ_PREFIX + k for k in session_keys]
    for k in session_keys:
        parts = k.split(":")
        if len(parts) == 3 and parts[1] == DM:  # <channel>:dm:<chat>; harmless for non-webchat channels
            keys.append(box_key(parts[0], parts[2]))
    return keys


def forget_sequences(client: Any, session_keys: list[str]) -> int:
    """Remove what Redis keeps of erased sessions: their ingress counters (`seq:<key>`), so a later message from
    the same user starts a fresh session at 1 instead of waiting for numbers that will never come, and a web
    chat visitor's reply box (the replies' text)."""
    return sum(int(client.delete(*chunk)) for chunk in _chunks(_redis_keys(session_keys), 500))


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
            row = s.execute(select(*_SESSION_COLUMNS).where(ChatSession.id == session_id)).one()
            messages = s.scalars(select(Message).where(Message.session_id == session_id)
                                 .order_by(Message.position)).all()
            events = s.scalars(select(SessionEvent).where(SessionEvent.session_id == session_id)
                               .order_by(SessionEvent.id)).all()
            letters = s.scalars(select(DeadLetter).where(DeadLetter.session_key == key)
                                .order_by(DeadLetter.id)).all()
            inbox = s.scalars(select(InboxItem).where(InboxItem.session_id == session_id)
                              .order_by(InboxItem.seq)).all()
            sessions.append({
                "session": _session(row).to_dict(),
                "messages": [_message_dict(m) for m in messages],
                "events": [{"generation": e.generation, "event": e.event, "at": _iso(e.at)} for e in events],
                "inbox": [_inbox_dict(i) for i in inbox],
                "dead_letters": [_dead_letter_dict(d) for d in letters],
            })
        group_q = (select(Message, ChatSession.key).join(ChatSession, ChatSession.id == Message.session_id)
                   .where(Message.role == "user", Message.sender_id.in_(user_ids), ChatSession.chat_kind != DM))
        if channel:
            group_q = group_q.where(ChatSession.channel_id == channel)
        own = s.execute(group_q.order_by(Message.session_id, Message.position)).all()
        replies: dict[int, list[Message]] = {}
        if own:
            for ids in _chunks([m.id for m, _ in own], 500):
                for r in s.scalars(select(Message).where(Message.in_reply_to.in_(ids))).all():
                    replies.setdefault(r.in_reply_to, []).append(r)
        group_messages = [{"session_key": key, **_message_dict(m),
                           "replies": [_message_dict(r) for r in replies.get(m.id, [])]} for m, key in own]
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
        "exported_at": now().isoformat(),
        "direct_sessions": sessions,
        "group_messages": group_messages,
        "group_inbox": [_inbox_dict(i) for i in waiting],
        "group_dead_letters": [_dead_letter_dict(d) for d in letters],
    }


# ----------------------------------------------------------------------------------------------------------------
# The broker: partition queues in Redis


@dataclass(frozen=True)
class QueuedTask:
    task: str
    queue: str
    session_key: str | None
    seq: int | None
    received_at: float | None  # when the ingress accepted the message (epoch seconds)
    in_flight: bool  # delivered to a worker, not acknowledged yet


def decode_task(raw: bytes | str | dict, queue: str = "", in_flight: bool = False) -> QueuedTask | None:
    """A Celery message as kombu's Redis transport stores it (JSON envelope, base64 body) -> what it carries."""
    try:
        envelope = raw if isinstance(raw, dict) else json.loads(raw)
        headers = envelope.get("headers") or {}
        props = envelope.get("properties") or {}
        body = envelope.get("body")
        if props.get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0] if body else []
        queue = queue or (props.get("delivery_info") or {}).get("routing_key") or ""
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    message = args[0] if args and isinstance(args[0], dict) else {}
    session_key = message.get("session_key")
    if session_key is None and len(args) >= 2 and isinstance(args[1], str):  # drain_session(id, key, ...)
        session_key = args[1]
    received = message.get("received_at")
    return QueuedTask(str(headers.get("task", "?")), queue, session_key, message.get("seq"),
                      float(received) if isinstance(received, (int, float)) and received else None, in_flight)


class BrokerView:
    """Read-only look at the partition queues of a Redis broker (kombu: LPUSH to the queue list, consumers
    pop from its tail; delivered-but-unacked messages wait in the `unacked` hash until acked or restored)."""

    def __init__(self, client: Any, partitions: int, ledger: Any = None):
        self.redis = client
        self.partitions = partitions
        self.ledger = ledger if ledger is not None else client  # REDIS_URL may differ from the broker's

    def depth(self, queue: str) -> int:
        return int(self.redis.llen(queue))

    def oldest(self, queue: str) -> QueuedTask | None:
        raw = self.redis.lindex(queue, -1)
        return decode_task(raw, queue) if raw else None

    def queued(self, queue: str, limit: int = 10_000) -> list[QueuedTask]:
        """Up to `limit` waiting messages of a queue, oldest first."""
        raws = self.redis.lrange(queue, -limit, -1)
        return [t for t in (decode_task(r, queue) for r in reversed(raws)) if t]

    def in_flight(self) -> list[QueuedTask]:
        """Messages a worker took and has not acknowledged. The ingress files each message in the unacked hash
        already when it enqueues it (ingress/redis_enqueue.py), so those still waiting in a queue are left out."""
        queued = set()
        for queue in [queue_name(p) for p in range(self.partitions)]:
            for raw in self.redis.lrange(queue, 0, -1):
                try:
                    queued.add(json.loads(raw)["properties"]["delivery_tag"])
                except (ValueError, TypeError, KeyError):
                    continue
        out = []
        for tag, raw in self.redis.hscan_iter(UNACKED_KEY, count=1000):
            if (tag.decode() if isinstance(tag, bytes) else tag) in queued:
                continue
            try:
                payload, _exchange, routing_key = json.loads(raw)
            except (ValueError, TypeError):
                continue
            task = decode_task(payload, routing_key, in_flight=True)
            if task:
                out.append(task)
        return out

    def sequences(self, keys: list[str] | None = None) -> dict[str, int]:
        """The ingress's per-session counters (`seq:<key>`): all of them, or those of `keys`."""
        names = [SEQ_PREFIX + k for k in keys] if keys is not None else [
            (n.decode() if isinstance(n, bytes) else n) for n in self.ledger.scan_iter(SEQ_PREFIX + "*", count=1000)]
        out: dict[str, int] = {}
        for chunk in _chunks(names, 1000):
            for name, value in zip(chunk, self.ledger.mget(chunk)):
                if value is not None:
                    out[name[len(SEQ_PREFIX):]] = int(value)
        return out


def queue_consumers(app: Any, timeout: float = 1.0) -> dict[str, list[str]]:
    """queue name -> the workers consuming it, from `celery inspect active_queues` (only workers that answer
    within `timeout` are seen)."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    out: dict[str, list[str]] = {}
    for worker, queues in sorted(replies.items()):
        for q in queues or []:
            out.setdefault(q.get("name", "?"), []).append(worker)
    return out


@dataclass
class PartitionStatus:
    partition: int | None  # None for the maintenance queue
    queue: str
    depth: int
    in_flight: int
    oldest_age_s: float | None
    consumers: list[str] | None  # None: the workers could not be asked
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def partition_status(view: BrokerView, consumers: Mapping[str, list[str]] | None,
                     extra_queues: Iterable[str] = (), at: float | None = None) -> list[PartitionStatus]:
    """Per partition queue: depth, messages in flight, the oldest waiting message's age, its consumers."""
    at = time.time() if at is None else at
    flying: dict[str, list[QueuedTask]] = {}
    for task in view.in_flight():
        flying.setdefault(task.queue, []).append(task)
    out = []
    names = [(p, queue_name(p)) for p in range(view.partitions)] + [(None, q) for q in extra_queues]
    for p, q in names:
        ages = [at - t.received_at for t in flying.get(q, []) if t.received_at]
        tail = view.oldest(q)
        if tail and tail.received_at:
            ages.append(at - tail.received_at)
        status = PartitionStatus(p, q, view.depth(q), len(flying.get(q, [])), max(ages) if ages else None,
                                 None if consumers is None else list(consumers.get(q, [])))
        if status.consumers is not None:
            if not status.consumers:
                status.warnings.append("no consumer" + (f": {status.depth} message(s) wait" if status.depth else ""))
            elif len(status.consumers) > 1 and p is not None:  # the maintenance queue may have several
                status.warnings.append(f"{len(status.consumers)} consumers: {', '.join(status.consumers)}")
        out.append(status)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Stuck sessions


@dataclass
class Stuck:
    key: str
    partition: int
    waiting_since: datetime | None  # the oldest waiting message (None: not known)
    reasons: list[str] = field(default_factory=list)
    session_id: int | None = None
    expired_lease_token: int | None = None  # a lease past lease_until: releasable
    unsent_replies: int = 0  # the sweeper resends these
    stalled_inbox: int = 0  # accepted, nobody holds the lease: the sweeper hands them back
    dead_letters: list[int] = field(default_factory=list)  # the operator replays or drops these
    unconsumed: int = 0  # in a partition queue nobody consumes
    lost: int = 0  # numbered by the ingress, found nowhere

    def age_s(self, at: datetime | None = None) -> float | None:
        if self.waiting_since is None:
            return None
        return ((at or now()) - self.waiting_since).total_seconds()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["waiting_since"] = _iso(self.waiting_since)
        d["age_s"] = None if self.waiting_since is None else round(self.age_s(), 1)
        return d

    def note(self, since: datetime | None, reason: str) -> None:
        self.reasons.append(reason)
        if since is not None and (self.waiting_since is None or since < self.waiting_since):
            self.waiting_since = since


def _ago(seconds: float) -> str:
    return format_duration(seconds) + " ago"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def find_stuck(url: str, older_than_s: float, *, partitions: int, lease_seconds: float,
               view: BrokerView | None = None,
               consumers: Callable[[], Mapping[str, list[str]] | None] | None = None,
               confirm_delay_s: float = 0.5) -> list[Stuck]:
    """Sessions whose oldest waiting message is older than `older_than_s`, oldest first, each with why.

    From the database: dead letters, replies committed but not sent (the outbox), leases held past their
    `lease_until` (the holder died or overran), inbox messages nobody is taking. With a broker `view`: the
    ingress's `seq:<key>` ahead of what the session has done or holds — messages still in a partition queue
    (stuck if the partition has no consumer: `consumers()` is asked only then), delivered but never
    acknowledged, or lost.
    """
    t = now()
    cutoff = t - timedelta(seconds=older_than_s)
    found: dict[str, Stuck] = {}

    def entry(key: str, session_id: int | None = None) -> Stuck:
        if key not in found:
            found[key] = Stuck(key, partition_of(key, partitions), None)
        if session_id is not None:
            found[key].session_id = session_id
        return found[key]

    with transaction(url) as s:
        # Leases past lease_until: the turn began lease_seconds before; its message waits since then.
        for r in s.execute(select(ChatSession.id, ChatSession.key, ChatSession.lease_token, ChatSession.lease_until)
                           .where(ChatSession.lease_until.is_not(None), ChatSession.lease_until < t)).all():
            began = _utc(r.lease_until) - timedelta(seconds=lease_seconds)
            if began <= cutoff:
                e = entry(r.key, r.id)
                e.expired_lease_token = r.lease_token
                e.note(began, f"lease held past its end ({_ago((t - _utc(r.lease_until)).total_seconds())}): "
                              "the worker died or the turn overran")
        # Replies committed but not sent.
        for r in s.execute(select(ChatSession.id, ChatSession.key, ChatSession.lease_until,
                                  func.count(Message.id), func.min(Message.created_at))
                           .join(Message, Message.session_id == ChatSession.id)
                           .where(Message.delivery_status == PENDING, Message.created_at < cutoff)
                           .group_by(ChatSession.id, ChatSession.key, ChatSession.lease_until)).all():
            e = entry(r.key, r.id)
            e.unsent_replies = r[3]
            held = r.lease_until is not None and _utc(r.lease_until) >= t
            e.note(_utc(r[4]), f"{r[3]} repl{'y' if r[3] == 1 else 'ies'} committed but not sent" +
                   (" (a turn holds the lease)" if held else
                    " (the sweeper resends them: is beat running and the maintenance queue consumed?)"))
        # Inbox: accepted messages waiting for their turn.
        for r in s.execute(select(ChatSession.id, ChatSession.key, ChatSession.lease_until, ChatSession.last_seq,
                                  func.count(InboxItem.id), func.min(InboxItem.created_at), func.min(InboxItem.seq))
                           .join(InboxItem, InboxItem.session_id == ChatSession.id)
                           .where(InboxItem.created_at < cutoff)
                           .group_by(ChatSession.id, ChatSession.key, ChatSession.lease_until,
                                     ChatSession.last_seq)).all():
            e = entry(r.key, r.id)
            count, since, head = r[4], _utc(r[5]), r[6]
            held = r.lease_until is not None and _utc(r.lease_until) >= t
            if held:
                why = "a turn holds the lease (a slow Agent or platform?)"
            else:
                e.stalled_inbox = count
                why = "nobody holds the lease (the sweeper hands it back: is beat running?)"
            if head is not None and head > r.last_seq + 1:
                why += f"; its head #{head} waits for #{r.last_seq + 1}, which never arrived"
            e.note(since, f"{count} accepted message(s) waiting in the inbox: {why}")
        # Dead letters: waiting for an operator since the ingress received them.
        for d in s.scalars(select(DeadLetter).order_by(DeadLetter.id)).all():
            try:
                received = _epoch(json.loads(d.payload).get("received_at")) or _utc(d.created_at)
            except (ValueError, AttributeError):
                received = _utc(d.created_at)
            if received <= cutoff:
                e = entry(d.session_key)
                e.dead_letters.append(d.id)
                e.note(received, f"dead-lettered (#{d.id}, {d.attempts} attempt(s)): {d.error[:80]}")

    if view is not None:
        _broker_waiting(url, view, entry, cutoff, consumers, confirm_delay_s)

    for key, e in found.items():
        if e.session_id is None:
            sess = get_session(url, key)
            e.session_id = sess.id if sess else None
    return sorted(found.values(), key=lambda e: (e.waiting_since is None, e.waiting_since or t, e.key))


def _behind(url: str, view: BrokerView, keys: list[str] | None = None) -> dict[str, tuple[int, int, Any]]:
    """key -> (ingress seq, highest seq the store has done or holds, last activity) for sessions whose ingress
    counter is ahead of the store."""
    seqs = view.sequences(keys)
    out = {}
    for chunk in _chunks(sorted(seqs), 1000):
        with transaction(url) as s:
            rows = {r.key: r for r in s.execute(
                select(ChatSession.id, ChatSession.key, ChatSession.last_seq, ChatSession.last_activity_at)
                .where(ChatSession.key.in_(chunk))).all()}
            held: dict[int, int] = {}
            if rows:
                held = dict(s.execute(select(InboxItem.session_id, func.max(InboxItem.seq))
                                      .where(InboxItem.session_id.in_([r.id for r in rows.values()]))
                                      .group_by(InboxItem.session_id)).all())
        for key in chunk:
            row = rows.get(key)
            done = max(row.last_seq, held.get(row.id) or 0) if row else 0
            if seqs[key] > done:
                out[key] = (seqs[key], done, _utc(row.last_activity_at) if row else None)
    return out


def _broker_waiting(url: str, view: BrokerView, entry: Callable[..., Stuck], cutoff: datetime,
                    consumers: Callable[[], Mapping[str, list[str]] | None] | None, confirm_delay_s: float) -> None:
    behind = _behind(url, view)
    if not behind:
        return
    where: dict[str, list[QueuedTask]] = {}
    wanted = {queue_name(partition_of(k, view.partitions)) for k in behind}
    for q in sorted(wanted):
        for task in view.queued(q):
            if task.session_key in behind:
                where.setdefault(task.session_key, []).append(task)
    for task in view.in_flight():
        if task.session_key in behind:
            where.setdefault(task.session_key, []).append(task)
    missing = [k for k in behind if k not in where]
    if missing:  # a message between INCR and LPUSH, or taken meanwhile: look again before calling it lost
        time.sleep(confirm_delay_s)
        still = _behind(url, view, missing)
        refound: dict[str, list[QueuedTask]] = {}
        for q in sorted({queue_name(partition_of(k, view.partitions)) for k in still}):
            for task in view.queued(q):
                if task.session_key in still:
                    refound.setdefault(task.session_key, []).append(task)
        for task in view.in_flight():
            if task.session_key in still:
                refound.setdefault(task.session_key, []).append(task)
        for k in missing:
            if k not in still:
                behind.pop(k)
            elif k in refound:
                where[k] = refound[k]
    owners_of: dict[str, list[str]] | None = None
    if consumers is not None and any(not t.in_flight for tasks in where.values() for t in tasks):
        owners_of = dict(consumers() or {})
    for key, (seq, done, last_activity) in behind.items():
        tasks = where.get(key, [])
        received = [_epoch(t.received_at) for t in tasks if t.received_at]
        since = min(received) if received else last_activity
        if since is not None and since > cutoff:
            continue
        queue = queue_name(partition_of(key, view.partitions))
        e = entry(key)
        queued = [t for t in tasks if not t.in_flight]
        flying = [t for t in tasks if t.in_flight]
        if queued:
            owners = None if owners_of is None else owners_of.get(queue, [])
            if owners == []:
                e.unconsumed = len(queued)
                e.note(since, f"{len(queued)} message(s) in {queue}, which has no consumer")
            else:
                e.note(since, f"{len(queued)} message(s) queued in {queue} behind {view.depth(queue)} in all"
                              + ("" if owners is None else f" (consumed by {', '.join(owners)})"))
        if flying:
            e.note(since, f"{len(flying)} message(s) delivered to a worker but not acknowledged: they come back "
                          "after the broker's visibility timeout if the worker died")
        lost = seq - done - len(tasks)
        if lost > 0 and not tasks:
            e.lost = lost
            e.note(since, f"{lost} message(s) numbered by the ingress (seq {seq}, done {done}) but neither queued "
                          "nor stored: lost before their turn")


@dataclass
class Recovery:
    leases_released: list[str] = field(default_factory=list)
    sweep_requested: bool = False
    advice: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def release_expired_lease(url: str, session_id: int, token: int) -> bool:
    """Free a lease that is past its end, only if nobody claimed the session since (same fencing token).
    The old holder, if it still runs, is no worse off than with the expired lease it already had."""
    with transaction(url) as s:
        return bool(s.execute(update(ChatSession).where(
            ChatSession.id == session_id, ChatSession.lease_token == token,
            ChatSession.lease_until.is_not(None), ChatSession.lease_until < now(),
        ).values(lease_until=None)).rowcount)


def recover(url: str, stuck: list[Stuck], request_sweep: Callable[[], None] | None) -> Recovery:
    """Fix what is safe to fix: release expired leases, ask the sweeper (`request_sweep`) to resend unsent
    replies and hand stalled inboxes back to their partition. Dead letters, partitions without a consumer
    and lost messages need an operator: they get advice, never an invented message."""
    out = Recovery()
    for e in stuck:
        releasable = e.expired_lease_token is not None and e.session_id is not None
        if releasable and release_expired_lease(url, e.session_id, e.expired_lease_token):
            out.leases_released.append(e.key)
    if any(e.unsent_replies or e.stalled_inbox or e.expired_lease_token is not None for e in stuck):
        if request_sweep is not None:
            request_sweep()
            out.sweep_requested = True
        else:
            out.advice.append("unsent replies or stalled inboxes: start `chatsessions beat` and a worker on the "
                              "maintenance queue; the sweeper resends them")
    for e in stuck:
        for letter in e.dead_letters:
            out.advice.append(f"{e.key}: fix the cause, then `chatsessions deadletters replay {letter}` "
                              f"(or `drop {letter}`)")
        if e.unconsumed:
            out.advice.append(f"{e.key}: start a worker for partition {e.partition} "
                              f"(`chatsessions worker --partitions {e.partition}` or the pool that owns it)")
        if e.lost:
            out.advice.append(f"{e.key}: {e.lost} message(s) were lost before their turn; the session goes on with "
                              "its next message (the platform may redeliver)")
    return out

