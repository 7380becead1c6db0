"""What crosses a process boundary: the normalized inbound message and a delivery outcome."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from shared.errors import MalformedPayload

DM = "dm"
GROUP = "group"
NEW_SESSION = "new"
# An operator's reply (shared/handoff.py), queued on the session's partition like a user message so that it is stored
# and sent after every message before it, under the session's lease: sender_name is the operator, text the reply,
# sent_at the time of the user's last message (WhatsApp's window counts from it).
OPERATOR_REPLY = "operator_reply"

# How long the ingress remembers a platform message id (Meta retries for up to 7 days). A signed message older than
# this is a captured webhook sent again, not a retry: it is refused, so it cannot bring back a conversation that was
# erased or purged meanwhile (whose ids the database no longer holds).
REPLAY_WINDOW_S = 7 * 24 * 3600
# The ingress's per-session sequence counters (`seq:<key>` in Redis) expire this long after their last number, so
# Redis keeps nothing of sessions that ended; shared/store.py starts a session's order over when one comes back.
SEQ_TTL_S = 30 * 24 * 3600

# The longest value each field may hold: the sizes of the columns they are stored in (shared/models.py). Adapters
# check each platform's id format; this is the last guard, so no message can fail in the store for its size.
ID_LIMITS = {"channel_id": 100, "session_key": 300, "chat_id": 100, "sender_id": 100, "platform_message_id": 200,
             "thread_id": 100, "person": 100}
NAME_LIMIT = 200


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One user message, normalized from any platform; JSON-safe via to_dict/from_dict."""

    channel_id: str
    platform: str
    session_key: str
    chat_id: str
    chat_kind: str  # DM or GROUP
    sender_id: str
    sender_name: str
    text: str
    platform_message_id: str
    sent_at: float
    command: str | None = None  # NEW_SESSION for /new and its platform equivalents; OPERATOR_REPLY
    seq: int = 0  # per-session ingress order, assigned by the ingress
    received_at: float = 0.0  # when the ingress accepted it (epoch seconds)
    # Session policies (shared/policies.py). The defaults are what a message queued before they existed meant:
    # answer it (every message was answered then), no topic, no linked person.
    addressed: bool = True  # DMs always; in groups: the bot was @mentioned or replied to, or it is a command
    # The topic inside chat_id the message was posted in; the reply belongs there too. Telegram: the forum topic's
    # message_thread_id (send it with the reply). Discord: the thread's channel id, the same as chat_id (a thread
    # is a channel), set when the adapter knows the channel is a thread.
    thread_id: str | None = None
    person: str | None = None  # the [[identities]] person the sender is linked to

    def __post_init__(self) -> None:
        # JSON can carry an unpaired UTF-16 surrogate ("\ud800"); it could never be stored or sent on.
        for name in ("session_key", "chat_id", "sender_id", "sender_name", "text", "platform_message_id",
                     "thread_id", "person"):
            try:
                value = getattr(self, name)
                if value is not None:
                    value.encode("utf-8")
            except UnicodeEncodeError:
                raise MalformedPayload(f"{name} is not valid Unicode (an unpaired surrogate)") from None
        for name, limit in ID_LIMITS.items():
            value = getattr(self, name)
            if value is not None and (len(value) > limit or "\x00" in value):
                raise MalformedPayload(f"{name} longer than {limit} characters or holding a NUL")
        # PostgreSQL text cannot hold NUL; it means nothing in a chat message or a name.
        for name in ("text", "sender_name"):
            if "\x00" in getattr(self, name):
                object.__setattr__(self, name, getattr(self, name).replace("\x00", "\ufffd"))
        if len(self.sender_name) > NAME_LIMIT:
            object.__setattr__(self, "sender_name", self.sender_name[:NAME_LIMIT - 1] + "…")

    def to_dict(self) -> dict[str, Any]:
        # Every field is a plain value: no deep copy (dataclasses.asdict's cost 10x this in a turn's profile).
        return {name: getattr(self, name) for name in _NAMES}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InboundMessage:
        """The message from to_dict; a dict from an older ingress gets the defaults of fields it lacks, and one
        from a newer ingress loses the fields this version does not know (a rolling upgrade in either order)."""
        return cls(**{k: v for k, v in data.items() if k in _FIELDS})

    def with_ingress(self, seq: int, received_at: float) -> InboundMessage:
        return dataclasses.replace(self, seq=seq, received_at=received_at)


_NAMES = tuple(f.name for f in dataclasses.fields(InboundMessage))
_FIELDS = frozenset(_NAMES)


@dataclass(frozen=True, slots=True)
class Delivery:
    """The outcome of sending one reply (all its chunks)."""

    ok: bool
    platform_message_ids: tuple[str, ...] = ()
    error: str | None = None
    attempts: int = 1
