"""Turns, as a recipe: accept the message, claim the session, and take its inbox in order —
load the context, run the Agent, store, dispatch — then release.

Plain code, testable without Celery; the Celery tasks only call `TurnRunner.handle` and `drain`.
A worker thread never waits for another message of its session: whoever holds the session's lease
takes every message that is ready, and a message arriving meanwhile just joins the inbox.

Each store step is one transaction, and steps that follow each other share one: the claim brings the
first turn's context and any unsent replies, a commit brings the reply to send and whether another
message is ready, the release says whether one came in meanwhile.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import structlog

from shared.agents import Agent, Conversation, Utterance
from shared.channels import Channel
from shared.config import Settings
from shared.messages import NEW_SESSION, InboundMessage
from shared.store import AlreadyStored, Claim, LeaseBusy, LeaseLost, PendingReply, Settled, Store, Turn

log = structlog.get_logger(__name__)

NEW_SESSION_REPLY = "Started a new conversation. Earlier messages won't be used from now on."
AGENT_ATTEMPTS = 3  # an Agent that raises this many times for one message: dead-letter it, go on
AGENT_BACKOFF_S = 0.5  # doubled after each failed attempt


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

    def handle(self, msg: InboundMessage) -> str:
        """Accept one inbound message and drain its session; returns what became of this message
        ("replied", "silent", "new_session", "dead_lettered", "duplicate", or "queued" for the holder)."""
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
                                         history_limits=self._history_limits(), force=force)
            except LeaseBusy:
                return outcomes  # the holder takes what we put in the inbox
            try:
                self._dispatch(claim, claim.outbox)  # replies a holder that died committed but never sent
                turn = claim.turn  # the first ready message, with its context
                if turn is not None and force and turn.message.seq > turn.claim.last_seq + 1:
                    log.warning("turn.gap", session_key=turn.message.session_key, seq=turn.message.seq,
                                last_seq=turn.claim.last_seq)
                while turn is not None and not self.stopping.is_set():
                    with structlog.contextvars.bound_contextvars(
                            platform_message_id=turn.message.platform_message_id, seq=turn.message.seq):
                        outcome, settled = self._run(turn)
                        outcomes[turn.message.platform_message_id] = outcome
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

    def _next_turn(self, claim: Claim) -> Turn | None:
        if self.stopping.is_set():
            return None
        limit = self.channels[claim.channel_id].config.session.history_limit
        return self.store.next_turn(claim, self.settings.lease_seconds, limit)

    def _run(self, turn: Turn) -> tuple[str, Settled]:
        """Run one turn and store its outcome; returns what became of the message and how the session was left."""
        msg = turn.message
        if turn.stored:
            return "duplicate", self.store.discard(turn)
        try:
            if msg.command == NEW_SESSION:
                settled = self.store.commit_turn(turn, NEW_SESSION_REPLY, new_generation=True)
                log.info("session.new_generation", generation=turn.claim.generation + 1)
                return "new_session", settled
            conversation = Conversation(
                channel_id=msg.channel_id,
                session_key=msg.session_key,
                chat_kind=msg.chat_kind,
                history=tuple(Utterance(m.role, m.sender_name, m.text, m.sender_id, m.at) for m in turn.history),
                message=Utterance("user", msg.sender_name, msg.text, msg.sender_id),
            )
            try:
                reply = self._ask(self.agents[msg.channel_id], conversation)
            except AgentFailed as exc:
                settled = self.store.dead_letter(turn, str(exc), self.agent_attempts)
                log.error("turn.dead_lettered", error=str(exc), attempts=self.agent_attempts)
                return "dead_lettered", settled
            settled = self.store.commit_turn(turn, reply)
            return ("replied" if reply else "silent"), settled
        except AlreadyStored:  # a copy committed meanwhile; its replies may still need sending
            return "duplicate", self.store.discard(turn)

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

    def _dispatch(self, claim: Claim, replies: Iterable[PendingReply]) -> None:
        """Send unsent replies in order (the outbox), each request right after a fencing check; record each outcome."""
        for reply in replies:
            delivery = self.channels[reply.channel_id].send(reply.chat_id, reply.chat_kind, reply.text,
                                                            fence=lambda: self._fence(claim))
            self.store.mark_delivery(reply.id, delivery)
            if delivery.ok:
                log.info("turn.reply_sent", reply_id=reply.id, attempts=delivery.attempts)
            else:
                log.error("turn.reply_failed", reply_id=reply.id, error=delivery.error)

    def _fence(self, claim: Claim) -> None:
        """Renew the lease, or LeaseLost: a stale holder must not send. The channel calls this after its pacing
        wait, immediately before each request. A pause inside the renewal itself (the process stopped after the
        database answered) is caught by the local clock: past half the lease, the renewal no longer counts."""
        started = time.monotonic()
        self.store.renew(claim, self.settings.lease_seconds)
        if time.monotonic() - started > self.settings.lease_seconds / 2:
            raise LeaseLost(f"{claim.session_id}: paused while renewing the lease")
