"""Session policies, the parse side: which session a message belongs to and whether it is addressed to the bot. The
turn's decisions (should the Agent answer, is this a reset, what fits the context, is a WhatsApp reply outside its
window) are workers/policies.py.

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

from dataclasses import dataclass

from shared.config import PERSON_KEY_PREFIX, THREADS_DEFAULT, ChannelConfig, normalize_user_id
from shared.errors import MalformedPayload
from shared.messages import DM, GROUP

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
