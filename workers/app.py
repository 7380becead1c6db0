"""The workers' Celery app: thin tasks that call plain functions, plus cross-cutting signal handlers.

Start with `chatsessions worker --partitions 0-7` (or `celery -A workers.app worker -Q sessions.0,...`).
"""

from __future__ import annotations

import os

import structlog
from celery import signals
from sqlalchemy.exc import InterfaceError, OperationalError

from shared.config import get_settings
from shared.logs import configure_logging
from shared.messages import InboundMessage
from shared.partitioning import partition_of
from shared.queueing import (
    HANDLE_INBOUND,
    MAINTENANCE_QUEUE,
    MARK_DORMANT,
    SWEEP_OUTBOX,
    make_celery,
)
from workers.runtime import runner

settings = get_settings()
configure_logging(settings.log_format, settings.log_level)
app = make_celery(settings)
log = structlog.get_logger(__name__)

SWEEP_SECONDS = float(os.environ.get("SWEEP_SECONDS", "60"))
OUTBOX_GRACE_S = 10.0  # a reply unsent this long after commit, with its session's lease free, was orphaned


# The database restarting or failing over is transient: retry the whole turn with backoff. Nothing of a
# failed attempt is visible (its transactions rolled back) and the store dedupes a turn that did commit.
DB_TRANSIENT = (OperationalError, InterfaceError)


@app.task(name=HANDLE_INBOUND, acks_late=True, autoretry_for=DB_TRANSIENT, retry_backoff=1, retry_backoff_max=30,
          max_retries=60)
def handle_inbound(message: dict) -> str:
    return runner().handle(InboundMessage.from_dict(message))


@app.task(name=SWEEP_OUTBOX, acks_late=True)
def sweep_outbox() -> int:
    """Periodic: send replies whose turn committed but whose worker died before sending them."""
    r = runner()
    sent = sum(r.resend(session_id) for session_id in r.store.stale_outbox(OUTBOX_GRACE_S))
    if sent:
        log.warning("outbox.resent", count=sent)
    return sent


@app.task(name=MARK_DORMANT, acks_late=True)
def mark_dormant() -> int:
    """Periodic: idle active sessions become dormant, per channel, in batches."""
    store = runner().store
    total = 0
    for channel in settings.channels.values():
        total += store.mark_dormant(channel.id, channel.session.idle_minutes)
    if total:
        log.info("session.dormant", count=total)
    return total


app.conf.beat_schedule = {
    "mark-dormant": {"task": MARK_DORMANT, "schedule": SWEEP_SECONDS, "options": {"queue": MAINTENANCE_QUEUE}},
    "sweep-outbox": {"task": SWEEP_OUTBOX, "schedule": SWEEP_SECONDS, "options": {"queue": MAINTENANCE_QUEUE}},
}


@signals.worker_init.connect
def _build_runtime(**_kwargs) -> None:
    runner()  # fail at start on a bad Agent or database, not at the first message


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
