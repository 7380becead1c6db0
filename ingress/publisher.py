"""Normalized messages -> partition queues. 2xx only after the broker accepted every message."""

from __future__ import annotations

import time

import structlog
from celery import Celery

from ingress.ledger import InFlight, Ledger, MemoryLedger, RedisLedger
from shared.config import Settings
from shared.errors import EnqueueFailed
from shared.messages import InboundMessage
from shared.partitioning import partition_of, queue_name
from shared.queueing import HANDLE_INBOUND, make_celery, shown_as

log = structlog.get_logger(__name__)


class Publisher:
    def __init__(self, settings: Settings, app: Celery | None = None, ledger: Ledger | None = None):
        self.settings = settings
        self.app = app or make_celery(settings)
        if ledger is None:
            ledger = RedisLedger(settings.redis_url) if settings.redis_url else MemoryLedger()
        self.ledger = ledger

    def publish(self, messages: list[InboundMessage], dedupe: bool = True) -> int:
        """Enqueue each new message on its session's partition; returns how many were new.

        Raises EnqueueFailed if the ledger or broker is unreachable; claims made for the failed
        message are released so the platform's retry is not mistaken for a duplicate.
        `dedupe=False` is for operators replaying a dead letter (its id was seen before).
        """
        enqueued = 0
        for message in messages:
            try:
                if dedupe and not self.ledger.claim(message.channel_id, message.platform_message_id):
                    log.info("ingress.duplicate", channel=message.channel_id, platform_message_id=message.platform_message_id)
                    continue
            except InFlight:
                raise EnqueueFailed("another copy of this message is being enqueued") from None
            except Exception as exc:
                raise EnqueueFailed(f"ledger unreachable: {exc.__class__.__name__}") from exc
            seq = None
            try:
                seq = self.ledger.next_seq(message.session_key)
                self._send(message.with_ingress(seq, time.time()))
            except Exception as exc:
                self._undo(message, seq)
                raise EnqueueFailed(f"broker unreachable: {exc.__class__.__name__}") from exc
            try:
                self.ledger.confirm(message.channel_id, message.platform_message_id)
            except Exception:  # enqueued all the same; the pending claim lapses, the store dedupes a copy
                log.warning("ingress.confirm_failed", platform_message_id=message.platform_message_id)
            enqueued += 1
        return enqueued

    def _undo(self, message: InboundMessage, seq: int | None) -> None:
        """After a failed publish: forget the message (the platform retries it) and its number."""
        try:
            self.ledger.release(message.channel_id, message.platform_message_id)
            if seq is not None:
                self.ledger.return_seq(message.session_key, seq)
        except Exception:
            log.warning("ingress.undo_failed", platform_message_id=message.platform_message_id)

    def _send(self, stamped: InboundMessage) -> None:
        partition = partition_of(stamped.session_key, self.settings.partitions)
        self.app.send_task(
            HANDLE_INBOUND,
            args=[stamped.to_dict()],
            queue=queue_name(partition),
            retry=True,
            # Flower shows which session (by its log pseudonym) and partition a task belongs to.
            **shown_as(self.settings, HANDLE_INBOUND, stamped.session_key, stamped.seq),
        )
        log.info(
            "ingress.enqueued",
            channel=stamped.channel_id,
            session_key=stamped.session_key,
            partition=partition,
            seq=stamped.seq,
            platform_message_id=stamped.platform_message_id,
        )

    def ready(self) -> None:
        """Raise unless both the ledger and the broker answer (for /readyz)."""
        self.ledger.ping()
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
