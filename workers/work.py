"""What a session's holder has to do and what came of it, as the store hands them to the turn and the runner: the
lease asked for, the claim (with its fencing token), a turn with its context, what a commit settled and the
replies to send. Frozen values: they cross from the store's transactions to the code that runs between them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Mapping

from shared.messages import InboundMessage
from shared.models import AGENT


@dataclass(frozen=True)
class Accepted:
    session_id: int
    new: bool  # False: the message is already in the inbox (a redelivery)
    claim: Claim | None = None  # the session's lease, when accept was asked to take it and it was free


@dataclass(frozen=True)
class Lease:
    """What a claim reads besides the lease: how long it lasts, the channels' history limits and how many ready
    messages make one turn (see Store.claim)."""

    seconds: float
    history_limits: Mapping[str, int] | None = None
    take: Mapping[str, int] | None = None


@dataclass(frozen=True)
class PendingReply:
    """A reply to send, with its route: the channel, chat and topic of the message it answers."""

    id: int
    channel_id: str
    chat_id: str
    chat_kind: str
    text: str
    thread_id: str | None = None  # Telegram forum topic / Discord thread of the message it answers
    user_sent_at: datetime | None = None  # when the user sent that message (WhatsApp's customer-service window)


@dataclass(frozen=True)
class Claim:
    session_id: int
    channel_id: str
    token: int  # the fencing token: every write of this holder checks it
    generation: int
    last_seq: int
    chat_id: str
    chat_kind: str
    last_activity_at: datetime | None = None  # the session's last turn before this one (reset policies)
    lease_seconds: float = 0.0  # how long each renewal holds (the claim, every commit, every fencing check)
    renewed_at: float = 0.0  # time.monotonic() when the statement that renewed the lease for this claim was sent
    mode: str = AGENT  # who answers the session (handoff): AGENT, WAITING or HUMAN, as of this claim or turn
    operator: str | None = None  # HUMAN: the operator who has it
    notice_sent: bool = False  # WAITING/HUMAN: the user has had this handoff's notice
    # What the new holder has to do, read with the claim (Store.claim only; empty on the claim a Turn carries):
    outbox: tuple[PendingReply, ...] = ()  # replies committed by an earlier holder and never sent, in order
    turn: Turn | None = field(default=None, repr=False, compare=False)  # the first ready message (with context)


@dataclass(frozen=True)
class StoredMessage:
    role: str
    sender_id: str
    sender_name: str
    text: str
    at: datetime


@dataclass(frozen=True)
class Turn:
    """The next inbox message of a claimed session, with the context the Agent may see."""

    claim: Claim  # refreshed: generation and last_seq as of this turn
    item_id: int
    message: InboundMessage  # the newest message of the turn: the one a reply answers
    history: list[StoredMessage]
    stored: bool  # the message is already in the conversation (a redelivery): nothing to run
    # A burst (burst = "collect" | "latest"): the ready messages before `message`, oldest first, as (inbox item id,
    # message); the turn stores them all, in order, in one commit.
    earlier: tuple[tuple[int, InboundMessage], ...] = ()

    @property
    def messages(self) -> list[InboundMessage]:
        """Every message of the turn, oldest first."""
        return [m for _, m in self.earlier] + [self.message]


@dataclass(frozen=True)
class HandoffRequest:
    """A turn asks for a person (the session waits for an operator): who asked ("user", "agent", "policy") and why."""

    actor: str
    reason: str


AGENT_SENDER = ("agent", "Agent")
NOTICE_SENDER = ("notice", "Notice")  # the handoff notice: said by the system, neither the Agent nor a person


@dataclass(frozen=True)
class Settled:
    """How a turn left its session: the replies to send now and whether the next inbox message is ready."""

    replies: tuple[PendingReply, ...]
    more: bool
    superseded: bool = False  # burst = "latest": the reply was stored skipped, a newer message being there
    renewed_at: float | None = None  # time.monotonic() when the commit that renewed the lease was sent
