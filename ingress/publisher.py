"""Normalized messages -> partition queues. 2xx only after the broker accepted every message.

With one Redis as broker and ledger (the default), each message is deduped, numbered and enqueued by one script
(ingress/redis_enqueue.py). Otherwise (RabbitMQ, a separate ledger Redis, the embedded process): a two-phase claim
in the ledger, the number, Celery's `send_task`, then the claim confirmed.
"""

from __future__ import annotations

import time

import structlog
from celery import Celery

from ingress import redis_enqueue
from ingress.ledger import InFlight, Ledger, MemoryLedger, RedisLedger
from shared.config import Settings
from shared.errors import EnqueueFailed
from shared.messages import InboundMessage
from shared.partitioning import partition_of
from shared.queueing import HANDLE_INBOUND, enqueue, make_celery

log = structlog.get_logger(__name__)


class Publisher:
    def __init__(self, settings: Settings, app: Celery | None = None, ledger: Ledger | None = None):
        self.settings = settings
        self.app = app or make_celery(settings)
        self.direct = redis_enqueue.RedisEnqueue(settings) if ledger is None and redis_enqueue.usable(settings) else None
        if ledger is None:
            ledger = RedisLedger(settings.redis_url) if settings.redis_url else MemoryLedger()
        self.ledger = ledger

    def publish(self, messages: list[InboundMessage], dedupe: bool = True) -> int:
        """Enqueue each new message on its session's partition; returns how many were new.

        Raises EnqueueFailed if the ledger or broker is unreachable; claims made for the failed
        message are released so the platform's retry is not mistaken for a duplicate.
        `dedupe=False` is for operators replaying a dead letter (its id was seen before).
        """
        if self.direct is not None:
            return sum(self._enqueue_directly(message, dedupe) for message in messages)
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

    def _enqueue_directly(self, message: InboundMessage, dedupe: bool) -> bool:
        """One script, one round trip: it did everything or nothing. A lost answer (the connection broke) is a 503;
        the platform's retry then finds the id seen if the script ran, or runs it."""
        try:
            seq = self.direct.enqueue(message, time.time(), dedupe)
        except redis_enqueue.Duplicate:
            log.info("ingress.duplicate", channel=message.channel_id, platform_message_id=message.platform_message_id)
            return False
        except redis_enqueue.InFlight:
            raise EnqueueFailed("another copy of this message is being enqueued") from None
        except Exception as exc:
            raise EnqueueFailed(f"broker unreachable: {exc.__class__.__name__}") from exc
        self._enqueued(message, seq)
        return True

    def _enqueued(self, message: InboundMessage, seq: int) -> None:
        log.debug("ingress.enqueued", channel=message.channel_id, session_key=message.session_key,
                  partition=partition_of(message.session_key, self.settings.partitions), seq=seq,
                  platform_message_id=message.platform_message_id)

    def _undo(self, message: InboundMessage, seq: int | None) -> None:
        """After a failed publish: forget the message (the platform retries it) and its number."""
        try:
            self.ledger.release(message.channel_id, message.platform_message_id)
            if seq is not None:
                self.ledger.return_seq(message.session_key, seq)
        except Exception:
            log.warning("ingress.undo_failed", platform_message_id=message.platform_message_id)

    def _send(self, stamped: InboundMessage) -> None:
        enqueue(self.app, self.settings, HANDLE_INBOUND, stamped.session_key, [stamped.to_dict()], stamped.seq,
                retry=True)
        self._enqueued(stamped, stamped.seq)

    def ready(self) -> None:
        """Raise unless both the ledger and the broker answer (for /readyz)."""
        if self.direct is not None:
            self.direct.ready()
            return
        self.ledger.ping()
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
