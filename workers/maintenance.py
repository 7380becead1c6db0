"""Keeping sessions moving, run by beat: the sweeper finds sessions nobody serves (an inbox waiting or a reply unsent
while the lease is free), idle sessions go dormant, sessions an operator left silent go back to the Agent, closed
ones lose their messages after the retention period.
Each runs in batches, every statement guarded like the turn's (the lease must be free, nothing may be waiting)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Connection, and_, delete, exists, func, or_, select, update

from shared.db import run_transaction
from shared.models import ACTIVE, AGENT, DORMANT, HUMAN, RETURNED, WENT_DORMANT
from shared.db import as_utc
from workers import statements as sql
from workers.store import now, transactional


class Maintenance:
    def __init__(self, database_url: str):
        self.url = database_url

    @transactional
    def stalled(self, c: Connection, grace_s: float, order_wait_s: float,
                limit: int = 500) -> list[tuple[int, str, bool]]:
        """Sessions whose inbox waits with nobody holding the lease: (session id, key, force past a gap).

        A holder that died leaves its inbox here once its lease expires; a head waiting more than
        `order_wait_s` for an earlier message that never came is forced through (a logged gap).
        """
        t = now()
        rows = c.execute(
            select(sql.sessions.c.id, sql.sessions.c.key, func.min(sql.inbox.c.created_at))
            .select_from(sql.sessions.join(sql.inbox, sql.inbox.c.session_id == sql.sessions.c.id))
            .where(sql.FREE, sql.inbox.c.created_at < t - timedelta(seconds=grace_s))
            .group_by(sql.sessions.c.id, sql.sessions.c.key).limit(limit), {"t": t}
        ).all()
        cutoff = t - timedelta(seconds=order_wait_s)
        return [(r[0], r[1], as_utc(r[2]) < cutoff) for r in rows]


    @transactional
    def stale_outbox(self, c: Connection, older_than_s: float, limit: int = 500) -> list[tuple[int, str]]:
        """Sessions (id, key) with a reply committed over `older_than_s` ago but never sent (its sender died)."""
        t = now()
        return [tuple(r) for r in c.execute(
            select(sql.messages.c.session_id, sql.sessions.c.key)
            .join(sql.sessions, sql.sessions.c.id == sql.messages.c.session_id)
            .where(sql.UNSENT, sql.messages.c.created_at < t - timedelta(seconds=older_than_s), sql.FREE)
            .distinct().limit(limit), {"t": t}
        ).all()]


    def mark_dormant(self, channel_id: str, idle_minutes: float, batch: int = 500) -> int:
        """Active sessions idle for `idle_minutes` become dormant, in batches; returns how many. Idle: no turn
        committed since (the activity time), nobody holding the lease, and no message waiting in the inbox."""
        total = 0
        while True:
            t = now()
            idle = and_(sql.sessions.c.channel_id == channel_id, sql.sessions.c.status == ACTIVE,
                        sql.sessions.c.last_activity_at < t - timedelta(minutes=idle_minutes), sql.FREE,
                        ~exists().where(sql.inbox.c.session_id == sql.sessions.c.id))

            def work(c: Connection) -> tuple[int, int]:
                ids = c.execute(select(sql.sessions.c.id).where(idle).limit(batch), {"t": t}).scalars().all()
                if not ids:
                    return 0, 0
                rows = c.execute(update(sql.sessions).where(sql.sessions.c.id.in_(ids), idle).values(status=DORMANT)
                                 .returning(sql.sessions.c.id, sql.sessions.c.generation), {"t": t}).all()
                if rows:
                    c.execute(sql.ADD_EVENT, [sql.event(r.id, r.generation, WENT_DORMANT, t) for r in rows])
                return len(ids), len(rows)
            found, marked = run_transaction(self.url, work)
            total += marked
            if found < batch:
                return total


    @transactional
    def return_idle(self, c: Connection, channel_id: str, idle_minutes: float, limit: int = 500) -> int:
        """Sessions of the channel an operator has had for `idle_minutes` without acting (no reply) go back to the
        Agent, each with a `returned` event; returns how many. Decided on the row alone, like an operator's
        hand-back (shared/handoff.py): a turn reads the mode when it starts."""
        t = now()
        rows = c.execute(
            update(sql.sessions)
            .where(sql.sessions.c.channel_id == channel_id, sql.sessions.c.mode == HUMAN,
                   sql.sessions.c.mode_at < t - timedelta(minutes=idle_minutes),
                   sql.sessions.c.id.in_(select(sql.sessions.c.id).where(
                       sql.sessions.c.channel_id == channel_id, sql.sessions.c.mode == HUMAN,
                       sql.sessions.c.mode_at < t - timedelta(minutes=idle_minutes)).limit(limit)))
            .values(mode=AGENT, operator=None, mode_at=t, handoff_reason=None, notice_sent=False)
            .returning(sql.sessions.c.id, sql.sessions.c.generation)).all()
        if rows:
            c.execute(sql.ADD_EVENT, [sql.event(r.id, r.generation, RETURNED, t, "idle",
                                                f"no operator reply for {idle_minutes:g} minutes") for r in rows])
        return len(rows)

    def purge_expired(self, channel_id: str, retention_days: float, batch: int = 100) -> tuple[int, int]:
        """Retention: closed sessions' messages and lifecycle events are deleted, `batch` sessions per transaction;
        returns (sessions, messages) deleted. Closed: dormant, no activity for `retention_days`, nobody holding the
        lease, nothing in the inbox. The session row stays (its key, generation and last seq, so the ingress's
        sequence numbers still line up): a later message resumes it with an empty context."""
        purged_sessions = deleted = 0
        while True:
            t = now()
            closed = and_(sql.sessions.c.channel_id == channel_id, sql.sessions.c.status == DORMANT,
                          sql.sessions.c.last_activity_at < t - timedelta(days=retention_days), sql.FREE,
                          ~exists().where(sql.inbox.c.session_id == sql.sessions.c.id),
                          or_(exists().where(sql.messages.c.session_id == sql.sessions.c.id),
                              exists().where(sql.events.c.session_id == sql.sessions.c.id)))

            def work(c: Connection) -> tuple[int, int, int]:
                found = c.execute(select(sql.sessions.c.id).where(closed).limit(batch), {"t": t}).scalars().all()
                if not found:
                    return 0, 0, 0
                # Lock the rows and check again: an accept may have woken one, a claim taken it, since the read.
                ids = c.execute(update(sql.sessions).where(sql.sessions.c.id.in_(found), closed).values(status=DORMANT)
                                .returning(sql.sessions.c.id), {"t": t}).scalars().all()
                if not ids:
                    return len(found), 0, 0
                gone = c.execute(delete(sql.messages).where(sql.messages.c.session_id.in_(ids))).rowcount
                c.execute(delete(sql.events).where(sql.events.c.session_id.in_(ids)))
                return len(found), len(ids), gone
            found, purged, gone = run_transaction(self.url, work)
            purged_sessions, deleted = purged_sessions + purged, deleted + gone
            if found < batch:
                return purged_sessions, deleted
