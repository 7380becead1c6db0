"""The Celery app both sides share: broker settings, partition queues and task names.

The ingress publishes by task name, so it never imports the workers' code.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from shared import broker
from shared.config import Settings
from shared.logs import pseudonym
from shared.partitioning import partition_of, queue_name
from shared.redis_client import sentinel_kwargs

HANDLE_INBOUND = "chat.handle_inbound"  # an inbound message, on its session's partition
DRAIN_SESSION = "chat.drain_session"  # a session nobody serves, handed back to its partition by the sweeper
MARK_DORMANT = "chat.mark_dormant"  # beat, on the maintenance queue
SWEEP = "chat.sweep"  # beat
PURGE_EXPIRED = "chat.purge_expired"  # beat: retention
MAINTENANCE_QUEUE = "maintenance"
QUORUM_EXCHANGE = "chatsessions"  # BROKER_QUEUE_TYPE=quorum: the topic exchange every queue is bound to


def task_queues(settings: Settings) -> list[Queue]:
    """The partition queues and the maintenance queue.

    Classic (the default): plain queues on the default exchange, as before. Quorum (RabbitMQ, BROKER_QUEUE_TYPE):
    replicated quorum queues, bound by their name to a topic exchange, because a retry's countdown (a turn that hit
    a database outage) then goes through RabbitMQ's native delayed delivery (Celery >= 5.5) instead of being held
    by the worker: with quorum queues the prefetch count is per consumer and static (no global QoS), so an ETA
    task held in memory would take a prefetch slot until it is due.
    """
    names = [queue_name(p) for p in range(settings.partitions)] + [MAINTENANCE_QUEUE]
    if settings.broker_queue_type == "quorum":
        exchange = Exchange(QUORUM_EXCHANGE, type="topic")
        return [Queue(n, exchange, routing_key=n, queue_arguments={"x-queue-type": "quorum"}) for n in names]
    return [Queue(n) for n in names]


def shown_as(settings: Settings, task: str, session_key: str, seq: int | str | None = None) -> dict[str, str]:
    """send_task options naming a session's task in Flower and in the workers' "Task ... received" lines: its
    partition and the session's log pseudonym (the key holds a phone number); never the arguments, the message
    itself, which Celery would show otherwise."""
    session = pseudonym(settings.secret_key, session_key)
    number = "" if seq is None else f" #{seq}"
    return {"shadow": f"{task}[p{partition_of(session_key, settings.partitions)} {session}{number}]",
            "argsrepr": f"(<session {session}{number}>)"}


def enqueue(app: Celery, settings: Settings, task: str, session_key: str, args: list, seq: int | None = None,
            **options) -> None:
    """Publish a session's task on its partition queue, named for Flower by partition and pseudonym."""
    app.send_task(task, args=args, queue=queue_name(partition_of(session_key, settings.partitions)),
                  **shown_as(settings, task, session_key, seq), **options)


def make_celery(settings: Settings) -> Celery:
    app = Celery("chatsessions", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_queues=task_queues(settings),
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
        # Task events cost three more publishes per task (and a "sent" event one per webhook): off unless asked
        # (`chatsessions worker --events`). Flower turns them on by itself while it runs (its enable_events).
        worker_send_task_events=False,
        task_send_sent_event=False,
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
    elif settings.broker_url.startswith("sentinel://"):  # Redis Sentinel: the same hardening, master from sentinels
        broker.use_for_sentinel_urls()
        app.conf.broker_transport = broker.SENTINEL_TRANSPORT
        app.conf.broker_transport_options.update(master_name=settings.redis_sentinel_master,
                                                 sentinel_kwargs=sentinel_kwargs())
    if settings.broker_queue_type == "quorum":
        app.conf.update(
            task_default_exchange=QUORUM_EXCHANGE,
            task_default_exchange_type="topic",
            task_default_routing_key=MAINTENANCE_QUEUE,
            task_default_queue_type="quorum",
            task_create_missing_queue_type="quorum",
            worker_detect_quorum_queues=True,  # per-consumer prefetch: quorum queues refuse global QoS
        )
        # Publisher confirms: the publish returns once a majority of the queue's replicas has the message, so the
        # ingress's 200 means replicated (a nack or a lost connection raises: 503, the platform retries).
        app.conf.broker_transport_options["confirm_publish"] = True
    if settings.embedded:
        # The in-process broker is polled; poll often so the all-in-one process feels instant.
        app.conf.broker_transport_options["polling_interval"] = 0.05
    return app
