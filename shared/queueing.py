"""The Celery app both sides share: broker settings, partition queues and task names.

The ingress publishes by task name, so it never imports the workers' code.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from shared import broker
from shared.config import Settings
from shared.partitioning import queue_name

HANDLE_INBOUND = "chat.handle_inbound"
MARK_DORMANT = "chat.mark_dormant"
DRAIN_SESSION = "chat.drain_session"
SWEEP = "chat.sweep"
MAINTENANCE_QUEUE = "maintenance"


def make_celery(settings: Settings) -> Celery:
    app = Celery("chatsessions", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_queues=[Queue(queue_name(p)) for p in range(settings.partitions)] + [Queue(MAINTENANCE_QUEUE)],
        task_default_queue=MAINTENANCE_QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # At-least-once: ack after the turn; a lost worker's message goes back to the queue.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        # A redelivery must mean a dead worker, not a slow one: longer than the lease.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # kombu scans for expired unacked messages only every `interval * throttle` seconds (10 x 10 by
            # default): scan every 2 s so a dead worker's messages return VISIBILITY_TIMEOUT + 2 s later.
            "unacked_restore_interval": 2,
            "unacked_restore_throttle": 1,
        },
        # The ingress must answer fast: fail the publish (-> 503) rather than wait for a dead broker.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5},
        broker_connection_timeout=2,
    )
    if settings.broker_url.startswith(("redis://", "rediss://")):
        app.conf.broker_transport = broker.TRANSPORT  # survives a Redis restart (see shared/broker.py)
    if settings.embedded:
        # The in-process broker is polled; poll often so the all-in-one process feels instant.
        app.conf.broker_transport_options["polling_interval"] = 0.05
    return app
