"""Turns, as a recipe: accept the message, claim the session, and take its inbox in order —
load the context, run the Agent, store, dispatch — then release.

Plain code, testable without Celery; the Celery tasks only call `TurnRunner.handle` and `drain`.
A worker thread never waits for another message of its session: whoever holds the session's lease
takes every message that is ready, and a message arriving meanwhile just joins the inbox.

Each store step is one transaction, and steps that follow each other share one: the claim brings the
first turn's context and any unsent replies, a commit brings the reply to send and whether another
message is ready, the release says whether one came in meanwhile.

The channel's session policy ([channels.session]) is applied per turn through small functions of
shared/policies.py: whether the Agent answers (group_reply), whether the turn opens a new session (reset), what
fits the context (history_limit/history_chars), how many ready messages make one turn (burst), and at send time
whether a WhatsApp reply is still inside its customer-service window.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Iterable, Mapping

import structlog

from shared import policies
from shared.agents import Agent, Conversation, Utterance
from shared.channels import Channel
from shared.config import SessionOptions, Settings
from shared.db import DB_UNAVAILABLE
from shared.deliveries import DeliveryJournal, MemoryJournal
from shared.messages import NEW_SESSION, Delivery, InboundMessage
from shared.store import AlreadyStored, Claim, LeaseBusy, LeaseLost, PendingReply, Settled, Store, Turn

log = structlog.get_logger(__name__)

NEW_SESSION_REPLY = "Started a new conversation. Earlier messages won't be used from now on."
AGENT_ATTEMPTS = 3  # an Agent that raises this many times for one message: dead-letter it, go on
AGENT_BACKOFF_S = 0.5  # doubled after each failed attempt
BURST_MAX = 20  # burst = "collect" | "latest": at most this many ready messages make one turn


class AgentFailed(Exception):
    """The Agent raised on every attempt for one message."""


@dataclass
class TurnRunner:
    settings: Settings
    store: Store
    channels: Mapping[str, Channel]
    agents: Mapping[str, Agent]
    agent_attempts: int = AGENT_ATTEMPTS
    agent_backoff_s: float = AGENT_BACKOFF_S
    stopping: threading.Event = field(default_factory=threading.Event)  # set on warm shutdown
    journal: DeliveryJournal = field(default_factory=MemoryJournal)  # outcomes the database could not take

    def handle(self, msg: InboundMessage) -> str:
        """Accept one inbound message and drain its session; returns what became of this message
        ("replied", "silent", "new_session", "context" (stored unanswered: group_reply), "collected" (answered
        with a later message of its burst), "superseded" (burst = "latest": a newer message made the reply stale),
        "dead_lettered", "duplicate", or "queued" for the holder)."""
        accepted = self.store.accept(msg)
        outcomes = self.drain(accepted.session_id)
        return outcomes.get(msg.platform_message_id, "queued" if accepted.new else "duplicate")

    def drain(self, session_id: int, force: bool = False) -> dict[str, str]:
        """Take the session's lease and run every turn that is ready, in seq order; `force` lets the head
        of the inbox pass a gap (an earlier message that never arrived). Returns outcomes by message id."""
        outcomes: dict[str, str] = {}
        while True:
            try:
                claim = self.store.claim(session_id, self.settings.lease_seconds,
                                         history_limits=self._history_limits(), force=force, take=self._takes())
            except LeaseBusy:
                return outcomes  # the holder takes what we put in the inbox
            try:
                self._dispatch(claim, claim.outbox, inherited=True)  # committed by an earlier holder, unsent
                turn = claim.turn  # the first ready message, with its context
                if turn is not None and force and turn.messages[0].seq > turn.claim.last_seq + 1:
                    log.warning("turn.gap", session_key=turn.message.session_key, seq=turn.messages[0].seq,
                                last_seq=turn.claim.last_seq)
                while turn is not None and not self.stopping.is_set():
                    with structlog.contextvars.bound_contextvars(
                            platform_message_id=turn.message.platform_message_id, seq=turn.message.seq):
                        outcome, settled = self._run(turn)
                        outcomes[turn.message.platform_message_id] = outcome
                        outcomes.update((m.platform_message_id, "collected") for _, m in turn.earlier)
                        self._dispatch(claim, settled.replies)
                    turn = self._next_turn(claim) if settled.more else None
            except LeaseLost:
                log.warning("turn.lease_lost", session_id=session_id)
                return outcomes
            except BaseException:
                self.store.release(claim)
                raise
            ready = self.store.release(claim)  # True: a message came in while we finished
            if self.stopping.is_set() or not ready:
                return outcomes  # (when stopping, the sweeper hands what is left to the next owner)
            force = False

    def _history_limits(self) -> dict[str, int]:
        return {cid: channel.config.session.history_limit for cid, channel in self.channels.items()}

    def _takes(self) -> dict[str, int]:
        """How many ready messages one turn takes, by channel: 1 (burst = "queue"), or a burst's worth."""
        return {cid: 1 if channel.config.session.burst == "queue" else BURST_MAX
                for cid, channel in self.channels.items()}

    def _next_turn(self, claim: Claim) -> Turn | None:
        if self.stopping.is_set():
            return None
        return self.store.next_turn(claim, self.settings.lease_seconds, self._history_limits(), take=self._takes())

    def _run(self, turn: Turn) -> tuple[str, Settled]:
        """Run one turn and store its outcome; returns what became of the message and how the session was left.
        A turn is one message, or with burst = "collect" | "latest" the ready messages taken together (one reply).

        Only a lost lease and an unavailable database escape (the task retries those). Any other error is one a retry
        cannot fix — a message the store cannot take, a value a policy cannot read — so the message becomes a dead
        letter at once and the session goes on; left at the inbox head, it would be run again at every sweep."""
        try:
            return self._take_turn(turn)
        except (LeaseLost, *DB_UNAVAILABLE):
            raise
        except Exception as exc:  # noqa: BLE001 - not transient: set the message aside, never block the session
            error = f"not retryable: {exc.__class__.__name__}: {exc}"
            log.error("turn.failed", error=error[:500])
            return "dead_lettered", self.store.dead_letter(turn, error, attempts=1)

    def _take_turn(self, turn: Turn) -> tuple[str, Settled]:
        msg, options = turn.message, self._options(turn.message)
        if turn.stored:
            return "duplicate", self.store.discard(turn)
        try:
            if msg.command == NEW_SESSION:
                settled = self.store.commit_turn(turn, NEW_SESSION_REPLY, new_generation=True)
                log.info("session.new_generation", generation=turn.claim.generation + 1)
                return "new_session", settled
            reset = self._reset_due(turn, options)
            if reset:  # exactly a /new before this message: the old generation's context is never given again
                turn = replace(turn, history=[])
                log.info("session.reset", policy=options.reset, generation=turn.claim.generation + 1)
            if not policies.should_answer(options, turn.messages):  # group_reply: context only, nobody is told
                return "context", self.store.commit_turn(turn, None, reset=reset)
            try:
                reply = self._ask(self.agents[msg.channel_id], self._conversation(turn))
            except AgentFailed as exc:
                settled = self.store.dead_letter(turn, str(exc), self.agent_attempts)
                log.error("turn.dead_lettered", error=str(exc), attempts=self.agent_attempts)
                return "dead_lettered", settled
            if reset:
                reply = policies.with_notice(options.reset_notice, reply)
            settled = self.store.commit_turn(turn, reply, reset=reset, supersede=self._burst(turn) == "latest")
            if settled.superseded:
                log.info("turn.reply_superseded", reason="a newer message of the session is waiting")
                return "superseded", settled
            return ("replied" if reply else "silent"), settled
        except AlreadyStored:  # a copy committed meanwhile; its replies may still need sending
            if turn.earlier:  # a burst: nothing of it was stored; read the inbox again (the stored copy goes alone)
                return "duplicate", Settled((), more=True)
            return "duplicate", self.store.discard(turn)

    def _burst(self, turn: Turn) -> str:
        """The burst policy of the session (its channel's: a per-person session follows the channel it began on)."""
        return self.channels[turn.claim.channel_id].config.session.burst

    @staticmethod
    def _reset_due(turn: Turn, options: SessionOptions) -> bool:
        """The reset policy, decided under the lease: the message's time against the session's last activity before
        it (a dormant session past the threshold is resumed and reset: a new generation, not the old context)."""
        last, first = turn.claim.last_activity_at, turn.messages[0]
        if options.reset == "never" or last is None:
            return False
        at = datetime.fromtimestamp(first.received_at or first.sent_at or time.time(), timezone.utc)
        return policies.reset_due(options, last, at)

    def _conversation(self, turn: Turn) -> Conversation:
        """What the Agent sees: the session's current generation within the context budget, and the message."""
        msg, options = turn.message, self._options(turn.message)
        history = policies.trim_history(turn.history, options.history_limit, options.history_chars, lambda m: m.text)
        burst = tuple(Utterance("user", m.sender_name, m.text, m.sender_id) for _, m in turn.earlier)
        return Conversation(
            channel_id=msg.channel_id,
            session_key=msg.session_key,
            chat_kind=msg.chat_kind,
            # a burst's earlier messages follow the stored context: the Agent reads them before the newest
            history=tuple(Utterance(m.role, m.sender_name, m.text, m.sender_id, m.at) for m in history) + burst,
            message=Utterance("user", msg.sender_name, msg.text, msg.sender_id),
        )

    def _options(self, msg: InboundMessage) -> SessionOptions:
        """The session policy of the channel the message came through (a per-person session spans channels)."""
        return self.channels[msg.channel_id].config.session

    def _ask(self, agent: Agent, conversation: Conversation) -> str | None:
        """The Agent's reply, retried in place (the session keeps its lease, so order holds)."""
        for attempt in range(1, self.agent_attempts + 1):
            try:
                return agent.reply(conversation)
            except Exception as exc:
                error = f"{exc.__class__.__name__}: {exc}"
                log.warning("turn.agent_failed", attempt=attempt, error=error)
                if attempt == self.agent_attempts:
                    raise AgentFailed(error) from exc
                time.sleep(self.agent_backoff_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def _dispatch(self, claim: Claim, replies: Iterable[PendingReply], inherited: bool = False) -> None:
        """Send unsent replies in order (the outbox), each request right after a fencing check; record each outcome.
        `inherited`: replies another holder committed — it may have sent one and been unable to record it."""
        for reply in replies:
            if inherited and (noted := self._noted(reply.id)) is not None:
                self.store.mark_delivery(reply.id, noted)
                log.info("turn.reply_already_sent", reply_id=reply.id, ok=noted.ok)
                continue
            delivery = self._send(claim, reply)
            self._record(reply.id, delivery)
            if delivery.ok:
                log.info("turn.reply_sent", reply_id=reply.id, attempts=delivery.attempts)
            else:
                log.error("turn.reply_failed", reply_id=reply.id, error=delivery.error)

    def _send(self, claim: Claim, reply: PendingReply) -> Delivery:
        """Send one reply through the channel, to the chat and topic of the message it answers. Outside WhatsApp's
        customer-service window it is not attempted as free text: the channel's window_template is sent instead,
        or without one the reply is recorded undeliverable (failed, with the reason; nothing to retry)."""
        channel = self.channels[reply.channel_id]
        options = channel.config.session
        if policies.outside_window(options, channel.config.platform, reply.user_sent_at, datetime.now(timezone.utc)):
            if options.window_template:
                log.info("turn.reply_as_template", reply_id=reply.id, template=options.window_template)
                return channel.send_template(reply.chat_id, reply.chat_kind, options.window_template,
                                             options.window_template_language, fence=lambda: self._fence(claim))
            error = (f"outside the {options.window_hours:g}h customer-service window: WhatsApp refuses free-form "
                     "text (set session.window_template to send a template)")
            log.warning("turn.reply_outside_window", reply_id=reply.id, user_sent_at=reply.user_sent_at.isoformat())
            return Delivery(ok=False, error=error, attempts=0)
        return channel.send(reply.chat_id, reply.chat_kind, reply.text, fence=lambda: self._fence(claim),
                            thread_id=reply.thread_id, reply_id=reply.id)

    def _record(self, reply_id: int, delivery: Delivery) -> None:
        """Store a send's outcome. With the database down, note it in the delivery journal first (a successor
        that takes the session over meanwhile must not send the reply again), then retry the write in place."""
        try:
            self.store.mark_delivery(reply_id, delivery, retry_for_s=0)
            return
        except DB_UNAVAILABLE:
            try:
                self.journal.remember(reply_id, delivery)
            except Exception as exc:  # noqa: BLE001 - the in-place retry below still records it
                log.error("turn.journal_unreachable", reply_id=reply_id, error=exc.__class__.__name__)
        self.store.mark_delivery(reply_id, delivery)

    def _noted(self, reply_id: int) -> Delivery | None:
        try:
            return self.journal.recall(reply_id)
        except Exception as exc:  # noqa: BLE001 - unknown: send (the documented duplicate window)
            log.warning("turn.journal_unreachable", reply_id=reply_id, error=exc.__class__.__name__)
            return None

    def _fence(self, claim: Claim) -> float:
        """Renew the lease, or LeaseLost: a stale holder must not send. The channel calls this after its pacing
        wait, immediately before each request; returns the monotonic time until which the renewal counts (half the
        lease), which the HTTP adapter checks again as the request goes on the wire. So a holder paused anywhere
        between here and there — or inside the renewal, after the database answered — sends nothing."""
        until = time.monotonic() + self.settings.lease_seconds / 2
        self.store.renew(claim, self.settings.lease_seconds)
        if time.monotonic() > until:
            raise LeaseLost(f"{claim.session_id}: paused while renewing the lease")
        return until
