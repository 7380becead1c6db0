"""One turn, as a recipe: plan it, give the Agent its conversation, commit the messages with the reply.

A turn is one inbox message, or with burst = "collect" | "latest" the ready messages taken together (one reply).
It runs under the session's lease (workers/runner.py claims it and sends what the commit returns); the decisions
of the channel's session policy are made by `policies.plan_turn`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import structlog

from workers import policies
from workers.agents import Agent, AgentFailed, Conversation, Handoff, Retrying, Utterance
from shared.config import SessionOptions
from shared.db import DB_UNAVAILABLE
from shared.messages import NEW_SESSION, OPERATOR_REPLY
from shared.models import AGENT
from workers.store import AlreadyStored, LeaseLost, Store
from workers.work import HandoffRequest, Settled, Turn

log = structlog.get_logger(__name__)

NEW_SESSION_REPLY = "Started a new conversation. Earlier messages won't be used from now on."


@dataclass
class TurnTaker:
    store: Store
    options: Mapping[str, SessionOptions]  # each channel's session policy
    agents: Mapping[str, Agent]
    agent_attempts: int
    agent_backoff_s: float

    def take(self, turn: Turn) -> tuple[str, Settled]:
        """Run one turn and store its outcome; returns what became of the message and how the session was left.

        Only a lost lease and an unavailable database escape (the task retries those). Any other error is one a retry
        cannot fix — a message the store cannot take, a value a policy cannot read — so the message becomes a dead
        letter at once and the session goes on; left at the inbox head, it would be run again at every sweep."""
        try:
            return self._take(turn)
        except (LeaseLost, *DB_UNAVAILABLE):
            raise
        except Exception as exc:  # noqa: BLE001 - not transient: set the message aside, never block the session
            error = f"not retryable: {exc.__class__.__name__}: {exc}"
            log.error("turn.failed", error=error[:500])
            return "dead_lettered", self.store.dead_letter(turn, error, attempts=1)

    def _take(self, turn: Turn) -> tuple[str, Settled]:
        if turn.stored:  # a redelivery of a message already in the conversation: settle its seq, send what is unsent
            return "duplicate", self.store.discard(turn)
        msg, options = turn.message, self.options[turn.message.channel_id]
        plan = policies.plan_turn(options, turn.messages, turn.claim.last_activity_at,
                                  new_session=msg.command == NEW_SESSION)
        try:
            if msg.command == OPERATOR_REPLY:
                return self._operator_reply(turn, options)
            if plan.new_session:
                return "new_session", self.store.commit_turn(turn, NEW_SESSION_REPLY, new_generation=True)
            if plan.reset:  # exactly a /new before this message: the old generation is never given again
                turn = replace(turn, history=[])
                log.info("session.reset", generation=turn.claim.generation + 1)
            if turn.claim.mode != AGENT:  # a person has it, or is asked for: stored for them; the notice once
                notice = options.handoff_notice if not turn.claim.notice_sent else ""
                return "held", self.store.commit_turn(turn, notice or None, reset=plan.reset, notice=bool(notice))
            if not plan.answer:  # group_reply: context only, nobody is told
                return "context", self.store.commit_turn(turn, None, reset=plan.reset)
            if policies.asks_for_person(options, turn.messages):
                return "handoff", self.store.commit_turn(
                    turn, plan.reply(options.handoff_notice) or None, reset=plan.reset, notice=True,
                    handoff=HandoffRequest("user", "the user asked for a person"))
            try:
                result = self._agent(msg.channel_id).reply(self._conversation(turn))
            except AgentFailed as exc:
                log.error("turn.dead_lettered", error=str(exc), attempts=self.agent_attempts)
                if not options.handoff_on_failure:
                    return "dead_lettered", self.store.dead_letter(turn, str(exc), self.agent_attempts)
                return "dead_lettered", self.store.dead_letter(
                    turn, str(exc), self.agent_attempts, handoff=HandoffRequest("policy", f"the Agent failed: {exc}"),
                    notice=options.handoff_notice or None)
            if isinstance(result, Handoff):
                log.info("turn.handoff", reason=result.reason[:200])
                text = plan.reply(result.text if result.text is not None else options.handoff_notice) or None
                return "handoff", self.store.commit_turn(turn, text, reset=plan.reset, notice=True,
                                                         handoff=HandoffRequest("agent", result.reason))
            reply = plan.reply(result)
            settled = self.store.commit_turn(turn, reply, reset=plan.reset, supersede=plan.supersede)
        except AlreadyStored:  # a copy committed meanwhile; its replies may still need sending
            if turn.earlier:  # a burst: nothing of it was stored; read the inbox again (the stored copy goes alone)
                return "duplicate", Settled((), more=True)
            return "duplicate", self.store.discard(turn)
        if settled.superseded:
            log.info("turn.reply_superseded", reason="a newer message of the session is waiting")
            return "superseded", settled
        return ("replied" if reply else "silent"), settled

    def _operator_reply(self, turn: Turn, options: SessionOptions) -> tuple[str, Settled]:
        """An operator's reply: stored and sent in the session's order if that operator still has the session."""
        msg = turn.message
        prefix = options.operator_prefix.format(operator=msg.sender_name) if options.operator_prefix else ""
        refused = None if turn.claim.mode != AGENT and turn.claim.operator == msg.sender_name else \
            f"not sent: {msg.sender_name} no longer has the session"
        return ("operator_reply" if refused is None else "operator_refused",
                self.store.commit_operator_reply(turn, prefix + msg.text, refused))

    def _agent(self, channel_id: str) -> Agent:
        return Retrying(self.agents[channel_id], self.agent_attempts, self.agent_backoff_s)

    def _conversation(self, turn: Turn) -> Conversation:
        """What the Agent sees: the session's current generation within the context budget, and the message."""
        msg, options = turn.message, self.options[turn.message.channel_id]
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
