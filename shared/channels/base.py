"""The two sides of a platform adapter, as Rasa's InputChannel/OutputChannel: `Inbound` turns a webhook request into
messages and the platform's answer, `Outbound` sends replies and says what else it can send. Verification, parsing
and sending stay separate methods; the helpers below are what every adapter reads input with.
"""

from __future__ import annotations

import functools
import hmac
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence, TypeVar

from shared import policies
from shared.config import ChannelConfig
from shared.errors import MalformedPayload
from shared.messages import REPLAY_WINDOW_S, Delivery, InboundMessage
from shared.outbound import Fence
from shared.ratelimit import buckets_for, pace

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class WebhookRequest:
    """An HTTP request as the ingress received it; headers keys are lower-case."""

    method: str
    headers: Mapping[str, str]
    query: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    route: str = ""  # the path under /webhooks/<channel id>/ ("interactions"); "" for the channel's own URL

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(frozen=True)
class Answer:
    """What one webhook request comes to: the messages to publish and the body the platform gets back with a 200 (a
    dict is sent as JSON). `dropped` says why a request that was not accepted is still answered 200 (logged)."""

    messages: Sequence[InboundMessage] = ()
    body: str | Mapping[str, Any] = "ok\n"
    dropped: str | None = None


class Inbound(Protocol):
    config: ChannelConfig

    def receive(self, request: WebhookRequest) -> Answer:
        """Verify and read one request to the channel's webhook URL. Raises UnknownChannel when the channel takes no
        such request (another route or method: 404), InvalidSignature (401; HandshakeRefused: 403) and
        MalformedPayload (400)."""


TEMPLATES = "templates"  # send_template: approved message templates (WhatsApp, outside the 24-hour window)


class Outbound(Protocol):
    config: ChannelConfig
    capabilities: frozenset[str]  # what it can send besides text: TEMPLATES

    def send(self, chat_id: str, chat_kind: str, text: str, fence: Fence | None = None,
             thread_id: str | None = None, reply_id: int | None = None) -> Delivery:
        """Send a reply to a chat (InboundMessage.chat_id/chat_kind), split to the platform's length limit.

        `thread_id` is the topic inside the chat the answered message was posted in (InboundMessage.thread_id):
        Telegram sends it as message_thread_id; a Discord thread is its own chat_id; the others have none.

        `fence` is checked immediately before every request, after any pacing wait: it raises (LeaseLost) when this
        worker may no longer send for the session, so a holder paused past its lease never sends.

        `reply_id` is the stored reply's id, the same for every holder that sends this reply: a platform that can
        recognise a resend uses it (Discord: an enforced nonce per chunk), so a reply a stopped holder already sent
        but never recorded is not posted twice by its successor."""


class Channel(Inbound, Outbound, Protocol):
    """A platform adapter: both sides (`build_channel`)."""


def inbound_message(config: ChannelConfig, *, kind: str, chat_id: str, sender_id: str, sender_name: str, text: str,
                    message_id: str, sent_at: float, command: str | None = None, addressed: bool = True,
                    thread_id: str | None = None, boundary: str | None = None,
                    topic: str | None = None) -> InboundMessage:
    """A message as every adapter makes it: its session under the channel's policy (`policies.route` of the
    `boundary`, the chat unless the adapter says otherwise, and of a forum `topic`), and its person."""
    route = policies.route(config, kind, boundary or chat_id, sender_id, topic=topic)
    return InboundMessage(
        channel_id=config.id,
        platform=config.platform,
        session_key=route.session_key,
        chat_id=chat_id,
        chat_kind=kind,
        sender_id=sender_id,
        sender_name=sender_name,
        text=text,
        platform_message_id=message_id,
        sent_at=sent_at,
        command=command,
        addressed=addressed,
        thread_id=thread_id,
        person=route.person,
    )


def gate(channel: Any, chat_id: str, chat_kind: str, fence: Fence | None) -> Callable[[], float | None] | None:
    """What runs before each request to one chat: the shared pacing wait, then the fencing check (last, so
    no wait falls between the check and the request); returns what the fence returns (the monotonic time until
    which its check counts). None when there is neither."""
    buckets = buckets_for(channel.config, chat_id, chat_kind) if channel.limiter is not None else None
    if buckets is None and fence is None:
        return None

    def before() -> float | None:
        if buckets is not None:
            pace(channel.limiter, buckets)
        return fence.check() if fence is not None else None

    return before


def parser(fn: F) -> F:
    """Mark a method that reads platform input: any shape it did not expect is MalformedPayload (a 4xx and a
    logged reason at the ingress), never an unexpected exception (a 5xx the platform would retry forever)."""

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MalformedPayload:
            raise
        except (TypeError, AttributeError, KeyError, IndexError, ValueError, ArithmeticError) as exc:
            raise MalformedPayload(f"unexpected shape ({exc.__class__.__name__}: {exc})") from None

    return guarded  # type: ignore[return-value]


def load_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise MalformedPayload("body is not JSON") from None
    except RecursionError:  # thousands of nested [ or {: no platform sends that
        raise MalformedPayload("body is nested too deeply") from None


class Replayed(MalformedPayload):
    """A correctly signed message older than the replay window (shared/messages.py): a captured webhook sent again."""


MAX_FUTURE_S = 300.0  # a send time this far ahead of our clock is not believed (clock skew is smaller)
SNOWFLAKE = re.compile(r"[0-9]{1,20}")  # Discord ids: unsigned 64-bit integers as decimal strings


def sent_time(value: Any, now: float, replay_window: float | None = REPLAY_WINDOW_S) -> float:
    """The platform's send time of a message (epoch seconds, a number or a numeric string), as far as it can be
    believed: anything missing, not finite or in the future stands for the receive time `now` — a send time flows
    into the store and the session policies, where a NaN or 1e400 could never be stored. Replayed if it is older
    than `replay_window` (None: for input that cannot be replayed, such as Discord's gateway)."""
    try:
        at = float(value)
    except (TypeError, ValueError, OverflowError):
        return now
    if isinstance(value, bool) or not math.isfinite(at) or at > now + MAX_FUTURE_S:
        return now
    if replay_window is not None and at < now - replay_window:
        raise Replayed(f"message sent {(now - at) / 86400:.0f} days ago, older than the replay window")
    return at


def matching(value: Any, pattern: re.Pattern[str], where: str) -> str:
    """An id of the platform's documented format; MalformedPayload otherwise (ids go into session keys, Redis keys,
    URL paths and columns of fixed size)."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise MalformedPayload(f"{where} is not a valid id")
    return value


def integer_id(value: Any, where: str) -> str:
    """A Telegram id (a 64-bit integer; JSON allows any size) as text; MalformedPayload otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not -2**63 <= value < 2**63:
        raise MalformedPayload(f"{where} is not a 64-bit integer id")
    return str(value)


def require(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """obj[key] if it is of the expected type, else MalformedPayload naming the path."""
    if not isinstance(obj, dict) or not isinstance(obj.get(key), kind):
        raise MalformedPayload(f"{where}.{key} missing or not {getattr(kind, '__name__', kind)}")
    return obj[key]


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a secret the caller presented."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
