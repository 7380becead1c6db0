"""Sending committed replies: the fencing check, the channel, and the outcome recorded.

A reply is sent after the commit that stored it, each request right after a fencing check (the holder must still
hold the session's lease), and its outcome is recorded right after the send: the duplicate window is "sent but not
yet recorded", one database round trip. With the database down, the outcome is first noted in Redis (the delivery
journal), so a holder that takes the session over meanwhile records the reply instead of sending it again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Mapping

import structlog

from workers import policies
from shared.channels.base import TEMPLATES, Outbound
from shared.db import DB_UNAVAILABLE
from workers.deliveries import DeliveryJournal
from shared.messages import Delivery
from workers.store import LeaseLost, Store
from workers.work import Claim, PendingReply

log = structlog.get_logger(__name__)

Sent = tuple[int, Delivery]  # a reply's id and the outcome of its send, to record


class LeaseFence:
    """The holder's right to send for its session (a shared.outbound.Fence), checked before every request.

    Every renewal of the lease — the claim, each commit, each renewal made here — holds for `lease_seconds`
    from the moment its statement was sent. The check trusts the last one for half that long (the claim or commit
    just before a send is enough: no statement of its own), and past it renews the lease in the database (LeaseLost
    if another holder took the session over). It returns the monotonic time until which it counts, which the HTTP
    adapter checks again as the request goes on the wire: a holder paused anywhere between here and there —
    or inside the renewal, after the database answered — sends nothing when it resumes.
    """

    def __init__(self, store: Store, claim: Claim, renewed_at: float):
        self.store, self.claim = store, claim
        self.valid_until = renewed_at + claim.lease_seconds / 2 if renewed_at else 0.0

    def renewed(self, at: float) -> None:
        """A statement sent at monotonic time `at` renewed the lease (a commit, the next turn's read)."""
        self.valid_until = max(self.valid_until, at + self.claim.lease_seconds / 2)

    def check(self) -> float:
        if time.monotonic() < self.valid_until:
            return self.valid_until
        until = time.monotonic() + self.claim.lease_seconds / 2
        self.store.renew(self.claim, self.claim.lease_seconds)
        if time.monotonic() > until:
            raise LeaseLost(f"{self.claim.session_id}: paused while renewing the lease")
        self.valid_until = until
        return until


@dataclass
class Dispatcher:
    store: Store
    channels: Mapping[str, Outbound]
    journal: DeliveryJournal

    def send_all(self, fence: LeaseFence, replies: Iterable[PendingReply], inherited: bool = False) -> list[Sent]:
        """Send replies in order; returns their outcomes, for the caller to record (`record`, or with the release).
        `inherited`: replies another holder committed — it may have sent one and been unable to record it."""
        sent: list[Sent] = []
        try:
            for reply in replies:
                if inherited and (noted := self._noted(reply.id)) is not None:
                    self.store.mark_delivery(reply.id, noted)
                    log.info("turn.reply_already_sent", reply_id=reply.id, ok=noted.ok)
                    continue
                delivery = self._send(fence, reply)
                if delivery.ok:
                    log.info("turn.reply_sent", reply_id=reply.id, attempts=delivery.attempts)
                else:
                    log.error("turn.reply_failed", reply_id=reply.id, error=delivery.error)
                sent.append((reply.id, delivery))
        except BaseException:  # the fence stopped a later reply: the earlier ones left, record them
            self.record(sent)
            raise
        return sent

    def _send(self, fence: LeaseFence, reply: PendingReply) -> Delivery:
        """Send one reply through the channel, to the chat and topic of the message it answers. Outside WhatsApp's
        customer-service window it is not attempted as free text: the channel's window_template is sent instead,
        or without one the reply is recorded undeliverable (failed, with the reason; nothing to retry)."""
        channel = self.channels[reply.channel_id]
        options = channel.config.session
        if policies.outside_window(options, channel.config.platform, reply.user_sent_at, datetime.now(timezone.utc)):
            if options.window_template and TEMPLATES in channel.capabilities:
                log.info("turn.reply_as_template", reply_id=reply.id, template=options.window_template)
                return channel.send_template(reply.chat_id, reply.chat_kind, options.window_template,
                                             options.window_template_language, fence=fence)
            error = (f"outside the {options.window_hours:g}h customer-service window: WhatsApp refuses free-form "
                     "text (set session.window_template to send a template)")
            log.warning("turn.reply_outside_window", reply_id=reply.id, user_sent_at=reply.user_sent_at.isoformat())
            return Delivery(ok=False, error=error, attempts=0)
        return channel.send(reply.chat_id, reply.chat_kind, reply.text, fence=fence, thread_id=reply.thread_id,
                            reply_id=reply.id)

    def record(self, sent: Iterable[Sent]) -> None:
        """Store the outcomes of sends. With the database down, note each in the delivery journal first (a successor
        that takes the session over meanwhile must not send the reply again), then retry the write in place."""
        for reply_id, delivery in sent:
            try:
                self.store.mark_delivery(reply_id, delivery, retry_for_s=0)
                continue
            except DB_UNAVAILABLE:
                self.note(((reply_id, delivery),))
            self.store.mark_delivery(reply_id, delivery)

    def note(self, sent: Iterable[Sent]) -> None:
        """The outcomes in the delivery journal (the database refused them)."""
        for reply_id, delivery in sent:
            try:
                self.journal.remember(reply_id, delivery)
            except Exception as exc:  # noqa: BLE001 - the in-place retry of the write still records it
                log.error("turn.journal_unreachable", reply_id=reply_id, error=exc.__class__.__name__)

    def _noted(self, reply_id: int) -> Delivery | None:
        try:
            return self.journal.recall(reply_id)
        except Exception as exc:  # noqa: BLE001 - unknown: send (the documented duplicate window)
            log.warning("turn.journal_unreachable", reply_id=reply_id, error=exc.__class__.__name__)
            return None
