"""One turn, as a recipe: claim the session in order, load its context, run the Agent, store, dispatch.

Plain code, testable without Celery; the Celery task only calls `TurnRunner.handle`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping

import structlog

from shared.agents import Agent, Conversation, Utterance
from shared.channels import Channel
from shared.config import Settings
from shared.messages import NEW_SESSION, InboundMessage
from shared.store import AlreadyStored, Claim, LeaseBusy, LeaseLost, Store
from workers.turnstile import Turnstile

log = structlog.get_logger(__name__)


class AgentFailed(Exception):
    """The Agent raised on every attempt for one message."""

NEW_SESSION_REPLY = "Started a new conversation. Earlier messages won't be used from now on."
ORDER_WAIT_S = 30.0  # how long a turn waits for its predecessor before recording a gap
POLL_S = 0.25
AGENT_ATTEMPTS = 3  # an Agent that raises this many times for one message: dead-letter it, go on
AGENT_BACKOFF_S = 0.5  # doubled after each failed attempt


@dataclass
class TurnRunner:
    settings: Settings
    store: Store
    channels: Mapping[str, Channel]
    agents: Mapping[str, Agent]
    turnstile: Turnstile
    order_wait_s: float = ORDER_WAIT_S
    agent_attempts: int = AGENT_ATTEMPTS
    agent_backoff_s: float = AGENT_BACKOFF_S

    def handle(self, msg: InboundMessage) -> str:
        """Run the turn for one inbound message; returns what happened ("replied", "duplicate", ...)."""
        self.turnstile.enter(msg.session_key, msg.seq)
        try:
            claim = self._claim_in_order(msg)
            try:
                outcome = "duplicate" if claim.duplicate else self._run(claim, msg)
                if outcome == "duplicate":
                    self.store.advance(claim, msg.seq)  # done before: let the next message go
            except LeaseLost:
                log.warning("turn.lease_lost", seq=msg.seq)
                return "lease_lost"
            except BaseException:
                self.store.release(claim)
                raise
            self._dispatch(claim)
            return outcome
        finally:
            self.turnstile.leave(msg.session_key, msg.seq)

    def _claim_in_order(self, msg: InboundMessage) -> Claim:
        """Take the session's lease once the previous message of the session is done (bounded wait)."""
        deadline = time.monotonic() + self.order_wait_s
        self.turnstile.wait_earlier(msg.session_key, msg.seq, self.order_wait_s)
        while True:
            try:
                claim = self.store.claim(msg, self.settings.lease_seconds)
            except LeaseBusy:
                self.turnstile.pause(msg.session_key, POLL_S)
                continue
            if claim.duplicate or claim.last_seq >= msg.seq - 1:
                return claim
            if time.monotonic() > deadline:
                log.warning("turn.gap", seq=msg.seq, last_seq=claim.last_seq)
                return claim
            self.store.release(claim)
            self.turnstile.nudge(msg.session_key)
            self.turnstile.pause(msg.session_key, POLL_S)

    def _run(self, claim: Claim, msg: InboundMessage) -> str:
        try:
            if msg.command == NEW_SESSION:
                self.store.commit_turn(claim, msg, NEW_SESSION_REPLY, new_generation=True)
                log.info("session.new_generation", generation=claim.generation + 1)
                return "new_session"
            channel = self.channels[msg.channel_id]
            history = self.store.history(claim, channel.config.session.history_limit)
            conversation = Conversation(
                channel_id=msg.channel_id,
                session_key=msg.session_key,
                chat_kind=msg.chat_kind,
                history=tuple(Utterance(m.role, m.sender_name, m.text, m.sender_id, m.at) for m in history),
                message=Utterance("user", msg.sender_name, msg.text, msg.sender_id),
            )
            try:
                reply = self._ask(self.agents[msg.channel_id], conversation)
            except AgentFailed as exc:
                self.store.dead_letter(claim, msg, str(exc), self.agent_attempts)
                log.error("turn.dead_lettered", error=str(exc), attempts=self.agent_attempts)
                return "dead_lettered"
            self.store.commit_turn(claim, msg, reply)
            return "replied" if reply else "silent"
        except AlreadyStored:  # a copy committed meanwhile; its replies may still need sending
            return "duplicate"

    def resend(self, session_id: int) -> int:
        """Send a session's replies that were committed but never sent (the outbox sweeper); returns how many."""
        try:
            claim = self.store.claim_session(session_id, self.settings.lease_seconds)
        except LeaseBusy:
            return 0  # a live turn holds the session; it sends the outbox itself
        pending = len(self.store.pending_replies(session_id))
        self._dispatch(claim)
        return pending

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

    def _dispatch(self, claim: Claim) -> None:
        """Send the session's unsent replies in order (the outbox), then give up the lease."""
        pending = self.store.pending_replies(claim.session_id)
        if not pending:
            self.store.release(claim)
            return
        for i, reply in enumerate(pending):
            try:
                self.store.renew(claim, self.settings.lease_seconds)  # fencing: a stale holder must not send
            except LeaseLost:
                log.warning("turn.lease_lost_before_send", reply_id=reply.id)
                return
            delivery = self.channels[reply.channel_id].send(reply.chat_id, reply.chat_kind, reply.text)
            last = i == len(pending) - 1
            self.store.mark_delivery(reply.id, delivery, release=claim if last else None)
            if delivery.ok:
                log.info("turn.reply_sent", reply_id=reply.id, attempts=delivery.attempts)
            else:
                log.error("turn.reply_failed", reply_id=reply.id, error=delivery.error)

