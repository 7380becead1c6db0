"""The workers' Celery app: thin tasks that call plain functions, plus cross-cutting signal handlers.

Start with `chatsessions worker --partitions 0-7` (or `celery -A workers.app worker -Q sessions.0,...`).
"""

from __future__ import annotations

import structlog
from celery import signals

from shared.config import get_settings
from shared.db import DB_UNAVAILABLE
from shared.logs import configure_logging
from shared.messages import InboundMessage
from shared.partitioning import partition_of
from shared.queueing import (
    DRAIN_SESSION,
    HANDLE_INBOUND,
    MAINTENANCE_QUEUE,
    MARK_DORMANT,
    PURGE_EXPIRED,
    SWEEP,
    enqueue,
    make_celery,
)
from workers.maintenance import Maintenance
from workers.runtime import runner

settings = get_settings()
configure_logging(settings)
app = make_celery(settings)
log = structlog.get_logger(__name__)

maintenance = Maintenance(settings.database_url)
STALL_GRACE_S = 5.0  # inbox messages or unsent replies this old, with the session's lease free, were stranded
ORDER_WAIT_S = 30.0  # how long an inbox head waits for an earlier message before it goes on (a logged gap)


# The database restarting or failing over is transient: retry the whole turn with backoff. Nothing of a
# failed attempt is visible (its transactions rolled back) and the store dedupes a turn that did commit.
DB_TRANSIENT = DB_UNAVAILABLE


@app.task(name=HANDLE_INBOUND, acks_late=True, autoretry_for=DB_TRANSIENT, retry_backoff=1, retry_backoff_max=30,
          max_retries=60)
def handle_inbound(message: dict) -> str:
    return runner().handle(InboundMessage.from_dict(message))


@app.task(name=DRAIN_SESSION, acks_late=True, autoretry_for=DB_TRANSIENT, retry_backoff=1, retry_backoff_max=30,
          max_retries=60)
def drain_session(session_id: int, session_key: str, force: bool = False) -> int:
    return len(runner().drain(session_id, force))


@app.task(name=SWEEP, acks_late=True)
def sweep() -> int:
    """Periodic: hand back to their partition the sessions nobody serves — a holder died with messages in
    the inbox or replies unsent, or the inbox head waited ORDER_WAIT_S for an earlier message that never came."""
    found = {sid: (key, force) for sid, key, force in maintenance.stalled(STALL_GRACE_S, ORDER_WAIT_S)}
    for sid, key in maintenance.stale_outbox(STALL_GRACE_S):
        found.setdefault(sid, (key, False))
    for sid, (key, force) in found.items():
        enqueue(app, settings, DRAIN_SESSION, key, [sid, key, force])
    if found:
        log.warning("sweep.stalled_sessions", count=len(found), forced=sum(f for _, f in found.values()))
    return len(found)


@app.task(name=MARK_DORMANT, acks_late=True)
def mark_dormant() -> int:
    """Periodic: idle active sessions become dormant, per channel, in batches; sessions an operator has left without a
    reply for the channel's human_idle_minutes go back to the Agent."""
    total = returned = 0
    for channel in settings.channels.values():
        total += maintenance.mark_dormant(channel.id, channel.session.idle_minutes)
        returned += maintenance.return_idle(channel.id, channel.session.human_idle_minutes)
    if total:
        log.info("session.dormant", count=total)
    if returned:
        log.info("handoff.returned_idle", count=returned)
    return total


@app.task(name=PURGE_EXPIRED, acks_late=True)
def purge_expired() -> int:
    """Periodic: retention — closed sessions' messages are deleted after the channel's retention_days, in batches."""
    sessions = messages = 0
    for channel in settings.channels.values():
        if channel.session.retention_days is not None:
            purged, deleted = maintenance.purge_expired(channel.id, channel.session.retention_days)
            sessions, messages = sessions + purged, messages + deleted
    if sessions:
        log.info("session.purged", sessions=sessions, messages=messages)
    return sessions


app.conf.beat_schedule = {
    "mark-dormant": {"task": MARK_DORMANT, "schedule": settings.sweep_seconds, "options": {"queue": MAINTENANCE_QUEUE}},
    "purge-expired": {"task": PURGE_EXPIRED, "schedule": settings.sweep_seconds, "options": {"queue": MAINTENANCE_QUEUE}},
    "sweep": {"task": SWEEP, "schedule": settings.sweep_seconds, "options": {"queue": MAINTENANCE_QUEUE}},
}


@signals.worker_init.connect
def _build_runtime(**_kwargs) -> None:
    runner()  # fail at start on a bad Agent or database, not at the first message


@signals.worker_shutting_down.connect
def _finish_current_turns(**_kwargs) -> None:
    """Warm shutdown stays bounded: a session's holder stops after its current turn, not its whole inbox."""
    runner().stopping.set()


@signals.task_prerun.connect
def _bind_log_context(task=None, args=None, **_kwargs) -> None:
    structlog.contextvars.clear_contextvars()
    if task is not None and task.name == HANDLE_INBOUND and args:
        m = args[0]
        structlog.contextvars.bind_contextvars(
            channel=m.get("channel_id"),
            session_key=m.get("session_key"),
            partition=partition_of(m.get("session_key", ""), settings.partitions),
            platform_message_id=m.get("platform_message_id"),
            seq=m.get("seq"),
        )


@signals.task_postrun.connect
def _clear_log_context(**_kwargs) -> None:
    structlog.contextvars.clear_contextvars()


import workers.liveness  # noqa: E402,F401  (registers the worker heartbeat for liveness probes)
