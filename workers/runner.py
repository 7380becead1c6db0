"""The session loop: accept a message, claim its session, take its ready turns in order, send, release.

Plain code, testable without Celery; the Celery tasks only call `TurnRunner.handle` and `drain`. A worker thread
never waits for another message of its session: whoever holds the session's lease takes every message that is
ready, and a message arriving meanwhile just joins the inbox.

The common case — a message for a session nobody is serving, answered with one reply — is three transactions:
accept (which claims the free lease in the same transaction), the turn's commit (fenced; it renews the lease, so
the send right after it needs no statement of its own), and the release, which records the send's outcome.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import structlog

from workers.agents import Agent
from shared.channels.base import Outbound
from shared.config import Settings
from shared.db import DB_UNAVAILABLE
from workers.deliveries import DeliveryJournal, MemoryJournal
from shared.messages import InboundMessage
from workers.store import LeaseBusy, LeaseLost, Store
from workers.work import Claim, Lease, PendingReply, Turn
from workers.dispatch import Dispatcher, LeaseFence, Sent
from workers.turn import TurnTaker

log = structlog.get_logger(__name__)

AGENT_ATTEMPTS = 3  # an Agent that raises this many times for one message: dead-letter it, go on
AGENT_BACKOFF_S = 0.5  # doubled after each failed attempt
BURST_MAX = 20  # burst = "collect" | "latest": at most this many ready messages make one turn


@dataclass
class TurnRunner:
    settings: Settings
    store: Store
    channels: Mapping[str, Outbound]
    agents: Mapping[str, Agent]
    agent_attempts: int = AGENT_ATTEMPTS
    agent_backoff_s: float = AGENT_BACKOFF_S
    stopping: threading.Event = field(default_factory=threading.Event)  # set on warm shutdown
    journal: DeliveryJournal = field(default_factory=MemoryJournal)  # outcomes the database could not take

    def __post_init__(self) -> None:
        sessions = {cid: channel.config.session for cid, channel in self.channels.items()}
        # What a claim reads: the history limit of each channel, and how many ready messages make one turn
        # (1 with burst = "queue", a burst's worth with "collect" and "latest").
        self.lease = Lease(self.settings.lease_seconds, {cid: s.history_limit for cid, s in sessions.items()},
                           {cid: 1 if s.burst == "queue" else BURST_MAX for cid, s in sessions.items()})
        self.sessions = sessions

    @property
    def dispatcher(self) -> Dispatcher:
        return Dispatcher(self.store, self.channels, self.journal)

    def dispatch(self, claim: Claim, replies: Iterable[PendingReply]) -> None:
        """Send replies for a claim held for a while (its fence checks the lease first) and record them."""
        self.dispatcher.record(self.dispatcher.send_all(LeaseFence(self.store, claim, renewed_at=0.0), replies))

    def handle(self, msg: InboundMessage) -> str:
        """Accept one inbound message and drain its session; returns what became of this message
        ("replied", "silent", "new_session", "context" (stored unanswered: group_reply), "collected" (answered
        with a later message of its burst), "superseded" (burst = "latest": a newer message made the reply stale),
        "dead_lettered", "duplicate", "handoff" (a person was asked for), "held" (stored for the person who has the
        session), "operator_reply" / "operator_refused" (an operator's reply, sent or not), or "queued" for the
        holder)."""
        accepted = self.store.accept(msg, self.lease)
        outcomes = self.drain(accepted.session_id, claim=accepted.claim)
        return outcomes.get(msg.platform_message_id, "queued" if accepted.new else "duplicate")

    def drain(self, session_id: int, force: bool = False, claim: Claim | None = None) -> dict[str, str]:
        """Hold the session's lease (`claim`, or claimed here) and run every turn that is ready, in seq order; `force`
        lets the head of the inbox pass a gap (an earlier message that never arrived). Outcomes by message id."""
        outcomes: dict[str, str] = {}
        while True:
            if claim is None:
                try:
                    claim = self.store.claim(session_id, self.lease.seconds, history_limits=self.lease.history_limits,
                                             force=force, take=self.lease.take)
                except LeaseBusy:
                    return outcomes  # the holder takes what we put in the inbox
            try:
                unrecorded = self._turns(claim, force, outcomes)
            except LeaseLost:
                log.warning("turn.lease_lost", session_id=session_id)
                return outcomes
            except BaseException:
                self.store.release(claim)
                raise
            ready = self._release(claim, unrecorded)  # True: a message came in while we finished
            if self.stopping.is_set() or not ready:
                return outcomes  # (when stopping, the sweeper hands what is left to the next owner)
            claim, force = None, False

    def _turns(self, claim: Claim, force: bool, outcomes: dict[str, str]) -> list[Sent]:
        """The replies an earlier holder left unsent, then the ready turns; returns the outcomes of the last sends,
        which the release records."""
        fence = LeaseFence(self.store, claim, claim.renewed_at)
        self.dispatcher.record(self.dispatcher.send_all(fence, claim.outbox, inherited=True))
        turn = claim.turn  # the first ready message, with its context
        if turn is not None and force and turn.messages[0].seq > turn.claim.last_seq + 1:
            log.warning("turn.gap", session_key=turn.message.session_key, seq=turn.messages[0].seq,
                        last_seq=turn.claim.last_seq)
        sent: list[Sent] = []
        try:
            while turn is not None and not self.stopping.is_set():
                self.dispatcher.record(sent)
                sent = []
                with structlog.contextvars.bound_contextvars(platform_message_id=turn.message.platform_message_id,
                                                             seq=turn.message.seq):
                    outcome, settled = self._taker().take(turn)
                    outcomes[turn.message.platform_message_id] = outcome
                    outcomes.update((m.platform_message_id, "collected") for _, m in turn.earlier)
                    if settled.renewed_at is not None:
                        fence.renewed(settled.renewed_at)
                    sent = self.dispatcher.send_all(fence, settled.replies)
                turn = self._next_turn(claim, fence) if settled.more else None
        except BaseException:
            self.dispatcher.record(sent)  # what left must be recorded, whatever stops the holder
            raise
        return sent

    def _taker(self) -> TurnTaker:
        return TurnTaker(self.store, self.sessions, self.agents, self.agent_attempts, self.agent_backoff_s)

    def _next_turn(self, claim: Claim, fence: LeaseFence) -> Turn | None:
        if self.stopping.is_set():
            return None
        turn = self.store.next_turn(claim, self.lease.seconds, self.lease.history_limits, take=self.lease.take)
        if turn is not None:
            fence.renewed(turn.claim.renewed_at)
        return turn

    def _release(self, claim: Claim, sent: list[Sent]) -> bool:
        """Give the lease up, recording the last sends' outcomes in the same transaction. With the database down,
        they are noted in the delivery journal first and recorded in place; the release itself is then left to the
        task's retry (or the lease's expiry)."""
        try:
            return self.store.release(claim, sent)
        except DB_UNAVAILABLE:
            if not sent:
                raise
            self.dispatcher.note(sent)
        try:
            self.dispatcher.record(sent)
        finally:  # recorded or not, the lease goes back (if the database takes even that)
            ready = self.store.release(claim)
        return ready
