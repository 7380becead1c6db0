"""Keeping sessions moving, run by beat: the sweeper finds sessions nobody serves (an inbox waiting or a reply unsent
while the lease is free), idle sessions go dormant, closed ones lose their messages after the retention period.
Each runs in batches, every statement guarded like the turn's (the lease must be free, nothing may be waiting)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Connection, and_, delete, exists, func, or_, select, update

from shared.db import run_transaction
from shared.models import ACTIVE, DORMANT, WENT_DORMANT
from workers.store import (
    _ADD_EVENT,
    _FREE,
    _PENDING,
    _as_utc,
    _event,
    _events,
    _inbox,
    _messages,
    _sessions,
    _transactional,
    now,
)


class Maintenance:
    def __init__(self, database_url: str):
        self.url = database_url

    @_transactional
    def stalled(self, c: Connection, grace_s: float, order_wait_s: float,
                limit: int = 500) -> list[tuple[int, str, bool]]:
        """Sessions whose inbox waits with nobody holding the lease: (session id, key, force past a gap).

        A holder that died leaves its inbox here once its lease expires; a head waiting more than
        `order_wait_s` for an earlier message that never came is forced through (a logged gap).
        """
        t = now()
        rows = c.execute(
            select(_sessions.c.id, _sessions.c.key, func.min(_inbox.c.created_at))
            .select_from(_sessions.join(_inbox, _inbox.c.session_id == _sessions.c.id))
            .where(_FREE, _inbox.c.created_at < t - timedelta(seconds=grace_s))
            .group_by(_sessions.c.id, _sessions.c.key).limit(limit), {"t": t}
        ).all()
        cutoff = t - timedelta(seconds=order_wait_s)
        return [(r[0], r[1], _as_utc(r[2]) < cutoff) for r in rows]


    @_transactional
    def stale_outbox(self, c: Connection, older_than_s: float, limit: int = 500) -> list[tuple[int, str]]:
        """Sessions (id, key) with a reply committed over `older_than_s` ago but never sent (its sender died)."""
        t = now()
        return [tuple(r) for r in c.execute(
            select(_messages.c.session_id, _sessions.c.key)
            .join(_sessions, _sessions.c.id == _messages.c.session_id)
            .where(_PENDING, _messages.c.created_at < t - timedelta(seconds=older_than_s), _FREE)
            .distinct().limit(limit), {"t": t}
        ).all()]


    def mark_dormant(self, channel_id: str, idle_minutes: float, batch: int = 500) -> int:
        """Active sessions idle for `idle_minutes` become dormant, in batches; returns how many. Idle: no turn
        committed since (the activity time), nobody holding the lease, and no message waiting in the inbox."""
        total = 0
        while True:
            t = now()
            idle = and_(_sessions.c.channel_id == channel_id, _sessions.c.status == ACTIVE,
                        _sessions.c.last_activity_at < t - timedelta(minutes=idle_minutes), _FREE,
                        ~exists().where(_inbox.c.session_id == _sessions.c.id))

            def work(c: Connection) -> tuple[int, int]:
                ids = c.execute(select(_sessions.c.id).where(idle).limit(batch), {"t": t}).scalars().all()
                if not ids:
                    return 0, 0
                rows = c.execute(update(_sessions).where(_sessions.c.id.in_(ids), idle).values(status=DORMANT)
                                 .returning(_sessions.c.id, _sessions.c.generation), {"t": t}).all()
                if rows:
                    c.execute(_ADD_EVENT, [_event(r.id, r.generation, WENT_DORMANT, t) for r in rows])
                return len(ids), len(rows)
            found, marked = run_transaction(self.url, work)
            total += marked
            if found < batch:
                return total


    def purge_expired(self, channel_id: str, retention_days: float, batch: int = 100) -> tuple[int, int]:
        """Retention: closed sessions' messages and lifecycle events are deleted, `batch` sessions per transaction;
        returns (sessions, messages) deleted. Closed: dormant, no activity for `retention_days`, nobody holding the
        lease, nothing in the inbox. The session row stays (its key, generation and last seq, so the ingress's
        sequence numbers still line up): a later message resumes it with an empty context."""
        sessions = deleted = 0
        while True:
            t = now()
            closed = and_(_sessions.c.channel_id == channel_id, _sessions.c.status == DORMANT,
                          _sessions.c.last_activity_at < t - timedelta(days=retention_days), _FREE,
                          ~exists().where(_inbox.c.session_id == _sessions.c.id),
                          or_(exists().where(_messages.c.session_id == _sessions.c.id),
                              exists().where(_events.c.session_id == _sessions.c.id)))

            def work(c: Connection) -> tuple[int, int, int]:
                found = c.execute(select(_sessions.c.id).where(closed).limit(batch), {"t": t}).scalars().all()
                if not found:
                    return 0, 0, 0
                # Lock the rows and check again: an accept may have woken one, a claim taken it, since the read.
                ids = c.execute(update(_sessions).where(_sessions.c.id.in_(found), closed).values(status=DORMANT)
                                .returning(_sessions.c.id), {"t": t}).scalars().all()
                if not ids:
                    return len(found), 0, 0
                gone = c.execute(delete(_messages).where(_messages.c.session_id.in_(ids))).rowcount
                c.execute(delete(_events).where(_events.c.session_id.in_(ids)))
                return len(found), len(ids), gone
            found, purged, gone = run_transaction(self.url, work)
            sessions, deleted = sessions + purged, deleted + gone
            if found < batch:
                return sessions, deleted
