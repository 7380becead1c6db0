"""Stuck sessions (`chatsessions sessions stuck`): found by the age of what waits for them, and recovered as carefully
as a turn would — only leases that expired are released and the sweeper is asked to resend; nothing is invented or
re-ordered."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Mapping

from sqlalchemy import func, select, update

from cli.broker_view import BrokerView, QueuedTask
from shared.db import as_utc, batches, epoch, iso, transaction
from shared.models import (
    PENDING,
    ChatSession,
    DeadLetter,
    InboxItem,
    Message,
)
from shared.partitioning import partition_of, queue_name
from shared.session_queries import get_session
from workers.store import now


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
        d["waiting_since"] = iso(self.waiting_since)
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
            began = as_utc(r.lease_until) - timedelta(seconds=lease_seconds)
            if began <= cutoff:
                e = entry(r.key, r.id)
                e.expired_lease_token = r.lease_token
                e.note(began, f"lease held past its end ({_ago((t - as_utc(r.lease_until)).total_seconds())}): "
                              "the worker died or the turn overran")
        # Replies committed but not sent.
        for r in s.execute(select(ChatSession.id, ChatSession.key, ChatSession.lease_until,
                                  func.count(Message.id), func.min(Message.created_at))
                           .join(Message, Message.session_id == ChatSession.id)
                           .where(Message.delivery_status == PENDING, Message.created_at < cutoff)
                           .group_by(ChatSession.id, ChatSession.key, ChatSession.lease_until)).all():
            e = entry(r.key, r.id)
            e.unsent_replies = r[3]
            held = r.lease_until is not None and as_utc(r.lease_until) >= t
            e.note(as_utc(r[4]), f"{r[3]} repl{'y' if r[3] == 1 else 'ies'} committed but not sent" +
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
            count, since, head = r[4], as_utc(r[5]), r[6]
            held = r.lease_until is not None and as_utc(r.lease_until) >= t
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
                received = epoch(json.loads(d.payload).get("received_at")) or as_utc(d.created_at)
            except (ValueError, AttributeError):
                received = as_utc(d.created_at)
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
    for chunk in batches(sorted(seqs), 1000):
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
                out[key] = (seqs[key], done, as_utc(row.last_activity_at) if row else None)
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
        received = [epoch(t.received_at) for t in tasks if t.received_at]
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
