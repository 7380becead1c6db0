"""Session policies: which session a message belongs to and whether it is addressed to the bot (the parse side),
and the turn's decisions — should the Agent answer, is this a reset, what fits the context budget, is a WhatsApp
reply outside its window (the turn side, plain functions that workers/turn.py calls under the session's lease).

Every channel adapter derives its session key through `route` (one helper, no copies), so the ingress, the
ops CLI and the tests agree on one format. The options come from `[channels.session]` and `[[identities]]`
(shared/config.py); docs/session-policies.md says how a turn applies each of them.

Session keys
------------
Parts are joined by ':'. No part may contain one: channel ids are checked by the config, person names by their
pattern, and a platform id with a ':' is a malformed payload (none of the platforms' ids has one: phone numbers,
snowflakes, Telegram integers, WhatsApp's base64 group ids), so no id can make one key look like another and
keys stay readable and typeable for `sessions show`.

    <channel>:dm:<chat>                                  a DM (any scope; on a per-person channel too when the
                                                         sender is linked to no person)
    person:<person>:dm                                   a DM of a linked user on a per-person channel: every
                                                         per-person channel, of any platform, shares it
    <channel>:group:<chat>                               a group: WhatsApp group, Telegram group or supergroup,
                                                         Discord guild channel (or thread, see below)
    <channel>:group:<chat>:thread:<topic>                a Telegram forum topic when threads = true
    <channel>:group:<chat>[:thread:<topic>]:member:<user>  scope = per-member: one member's private context

<chat> is the chat the platform names: the user's number (WhatsApp DM), the group id, the Telegram chat id, the
Discord channel id. A Discord thread *is* a channel with its own id, so with threads = true (Discord's default)
it is its own <chat> — the seed's key — and with threads = false its parent channel's id stands in (the parent is
known from the gateway's thread events or from the interaction's channel; an unknown thread stays its own).

Kinds never meet: the second part is "dm" or "group", and person keys are only ever given to DMs, so a group
never sees DM context and a DM never sees group context. "person" is refused as a channel id (config), so a
person key can never equal a channel's key.

A per-person session is one row (sessions.channel_id is the channel of its first message) whose messages come
from several channels. Each InboundMessage keeps its own channel_id, chat_id and thread_id: its reply must go out
through that channel to that chat, not to the session row's chat_id.

Changing a channel's scope or threads takes effect for new messages: they get the new keys and so new sessions.
Sessions under the old keys are not touched — they go dormant and stay readable (`sessions show`); nothing is
merged, moved or corrupted, and changing the option back resumes them.

Addressed
---------
`addressed(kind, ...)`: always in a DM; in a group when the bot is @mentioned, the message replies to one of the
bot's messages, or it is a command for the bot. The evidence each adapter reads:

- Telegram: an entity of type "mention" that is @<options.bot_username> (case-insensitive; entity offsets count
  UTF-16 units) or a "text_mention" of the bot (its user id is the bot token's prefix), in the text or the
  caption; `reply_to_message` from the bot (but not a forum topic's creation message, which every message of a
  topic replies to); a `bot_command` at offset 0 of the text that is /cmd or /cmd@<bot_username>.
- Discord: `mentions[]` or a `<@id>` in the content naming the bot's user id (from the gateway's READY; before
  that `options.application_id`, which is a bot's user id), `referenced_message` written by the bot, /new and
  !new. An application command (interaction) is always addressed.
- WhatsApp: the groups webhook has no mention list (Cloud API "Group messages webhook reference": `from`,
  `group_id`, `text`, `type` only). Addressed are a reply to our message (`context.from` is our
  `display_phone_number`, as in every reply's `context`), "@<our display number>" in the text (how WhatsApp clients
  write a mention of a number; not in Meta's reference, so it may never match), and /new. Channels whose users
  cannot mention the number should set group_reply = "always".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Sequence, TypeVar

from shared.config import PERSON_KEY_PREFIX, THREADS_DEFAULT, ChannelConfig, SessionOptions, normalize_user_id
from shared.errors import MalformedPayload
from shared.messages import DM, GROUP, InboundMessage

THREAD, MEMBER = "thread", "member"


def join(*parts: str) -> str:
    """A key from its parts; MalformedPayload if an id would bring its own separator."""
    for value in parts:
        if ":" in value:
            raise MalformedPayload(f"id {value[:80]!r} contains ':', which no platform id does")
    return ":".join(parts)


def split_key(key: str) -> list[str]:
    """A key's parts: ["acme-tg", "group", "-100123", "thread", "7"]."""
    return key.split(":")


def dm_key(channel_id: str, chat_id: str) -> str:
    return join(channel_id, DM, chat_id)


def person_key(person: str) -> str:
    """The DM session a linked person shares across every per-person channel."""
    return join(PERSON_KEY_PREFIX, person, DM)


def group_key(channel_id: str, chat_id: str, *, topic: str | None = None, member: str | None = None) -> str:
    parts = [channel_id, GROUP, chat_id]
    if topic is not None:
        parts += [THREAD, topic]
    if member is not None:
        parts += [MEMBER, member]
    return join(*parts)


def threads_enabled(config: ChannelConfig) -> bool:
    """Whether topics/threads are sessions of their own on this channel (unset: the platform's default)."""
    threads = config.session.threads
    return THREADS_DEFAULT.get(config.platform, False) if threads is None else threads


def person_for(config: ChannelConfig, user_id: str) -> str | None:
    """The [[identities]] person this platform user is linked to."""
    if not config.people:
        return None
    try:
        return config.people.get(normalize_user_id(config.platform, user_id))
    except ValueError:
        return None


@dataclass(frozen=True)
class Route:
    session_key: str
    person: str | None


def route(config: ChannelConfig, kind: str, chat_id: str, sender_id: str, *, topic: str | None = None) -> Route:
    """The session of a message under the channel's policy. `chat_id` is the boundary the platform names (see the
    module doc for Discord threads); `topic` a forum topic inside it, a session of its own only with threads on."""
    person = person_for(config, sender_id)
    scope = config.session.scope
    if kind == DM:
        key = person_key(person) if scope == "per-person" and person else dm_key(config.id, chat_id)
    else:
        key = group_key(config.id, chat_id, topic=topic if threads_enabled(config) else None,
                         member=sender_id if scope == "per-member" else None)
    return Route(key, person)


def addressed(kind: str, *, mentioned: bool = False, replied_to_bot: bool = False, command: bool = False) -> bool:
    """Whether the message asks the bot for an answer: every DM does; in a group, a mention, a reply to the bot
    or a command does (group_reply = "mentioned" answers only these; the others still enter the context)."""
    return kind == DM or mentioned or replied_to_bot or command


# -- Turn policies: what a worker's turn does with a message under the channel's [channels.session] -----------------
# Pure functions of the options and the facts the turn read under the session's lease (workers/turn.py).


@dataclass(frozen=True)
class Plan:
    """What a turn does, decided before the Agent runs."""

    new_session: bool  # the message is /new: it closes its generation, the Agent does not run
    reset: bool  # a reset policy is due: a new generation starts with this turn, its context is empty
    answer: bool  # the Agent runs (group_reply); otherwise the messages are stored as context only
    supersede: bool  # burst = "latest": a reply made stale by a newer waiting message is stored, never sent
    notice: str  # put before the reply of a turn a reset opened ("" = nothing)

    def reply(self, text: str | None) -> str | None:
        """The Agent's reply as it is stored and sent: after a reset, with the notice first."""
        return with_notice(self.notice, text) if self.reset else text


def plan_turn(options: SessionOptions, messages: Sequence[InboundMessage], last_activity: datetime | None,
              new_session: bool) -> Plan:
    """The decisions of a turn of `messages` (oldest first; one, or a burst), the session's last activity before
    them being `last_activity`. A reset is decided under the lease, by the time the ingress received the first
    message (a dormant session past the threshold is resumed and reset)."""
    reset = False
    if not new_session and options.reset != "never" and last_activity is not None:
        first = messages[0]
        at = datetime.fromtimestamp(first.received_at or first.sent_at or time.time(), timezone.utc)
        reset = reset_due(options, last_activity, at)
    return Plan(new_session=new_session, reset=reset, answer=should_answer(options, messages),
                supersede=options.burst == "latest", notice=options.reset_notice)


def should_answer(options: SessionOptions, messages: Sequence[InboundMessage]) -> bool:
    """Whether the Agent runs for these messages (one turn: one message, or a collected burst). With group_reply =
    "mentioned" a group turn is answered only if one of its messages is addressed to the bot; the others are stored
    as context without a reply."""
    return options.group_reply == "always" or any(m.chat_kind != GROUP or m.addressed for m in messages)


def reset_due(options: SessionOptions, last_activity: datetime, at: datetime) -> bool:
    """Whether a message sent `at` opens a new session under the reset policy, the session's last activity (before
    this message) being `last_activity`. idle: `reset_idle_hours` or more in between; daily: the last activity was
    before the latest `reset_hour` o'clock (in `timezone`) at or before `at`."""
    if options.reset == "idle" and options.reset_idle_hours is not None:
        return at - last_activity >= timedelta(hours=options.reset_idle_hours)
    if options.reset == "daily" and options.reset_hour is not None:
        return last_activity < latest_reset_boundary(options, at)
    return False


def latest_reset_boundary(options: SessionOptions, at: datetime) -> datetime:
    """The latest `reset_hour`:00 local time (in the channel's timezone) at or before `at`. A wall-clock hour that a
    DST change skips or repeats resolves as zoneinfo does (fold=0)."""
    local = at.astimezone(options.zone)
    boundary = local.replace(hour=options.reset_hour or 0, minute=0, second=0, microsecond=0)
    if boundary > local:
        boundary = (local - timedelta(days=1)).replace(hour=options.reset_hour or 0, minute=0, second=0,
                                                       microsecond=0)
    return boundary


def with_notice(notice: str, reply: str | None) -> str | None:
    """The reply to a message that a reset put in a new session: the notice first, in the same reply (one outbox
    row, so it is sent exactly once with it); the notice alone when the Agent stays silent; "" = no notice."""
    if not notice:
        return reply
    return f"{notice}\n\n{reply}" if reply else notice


H = TypeVar("H")


def trim_history(history: Sequence[H], limit: int, chars: int | None, text: Callable[[H], str]) -> list[H]:
    """The context budget: the newest `limit` entries of `history` (oldest first, one generation), and of those the
    newest whose texts together fit in `chars` (None: no character budget). Newest kept, oldest dropped."""
    kept = list(history[-limit:]) if limit else []
    if chars is None:
        return kept
    total, start = 0, len(kept)
    for i in range(len(kept) - 1, -1, -1):
        total += len(text(kept[i]))
        if total > chars:
            break
        start = i
    return kept[start:]


def outside_window(options: SessionOptions, platform: str, user_sent_at: datetime | None, at: datetime) -> bool:
    """WhatsApp's customer-service window: a free-form reply only within `window_hours` of the user's message."""
    if platform != "whatsapp" or user_sent_at is None:
        return False
    return at - user_sent_at > timedelta(hours=options.window_hours)
