"""Discord: gateway MESSAGE_CREATE events and signed HTTP interactions share one session per channel (or thread)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Callable

import structlog
from cryptography.exceptions import InvalidSignature as BadEd25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared import policies
from shared.channels.base import (
    SNOWFLAKE,
    Answer,
    WebhookRequest,
    gate,
    inbound_message,
    load_json,
    parser,
    require,
    sent_time,
)
from shared.config import ChannelConfig
from shared.errors import (
    ConfigError,
    InvalidSignature,
    MalformedPayload,
    UnknownChannel,
)
from shared.messages import DM, GROUP, NEW_SESSION, Delivery, InboundMessage
from shared.outbound import Fence, HttpSender, send_chunks
from shared.ratelimit import Limiter
from shared.signing import keyed_hash

log = structlog.get_logger(__name__)

TEXT_LIMIT = 2000
MAX_SKEW = 300.0  # seconds an interaction timestamp may differ from now (replay protection)
DISCORD_EPOCH_MS = 1420070400000
NEW_COMMANDS = ("/new", "!new")
# The application commands `interaction` answers, as `chatsessions setup` registers them (Bulk Overwrite Global
# Application Commands): chat-input commands (type 1), usable in servers and in DMs with the bot (contexts 0, 1).
APPLICATION_COMMANDS = (
    {"name": "new", "type": 1, "description": "Start a new conversation (the assistant forgets this one)",
     "contexts": [0, 1]},
    {"name": "ask", "type": 1, "description": "Ask the assistant a question", "contexts": [0, 1],
     "options": [{"type": 3, "name": "question", "description": "Your question", "required": True}]},
)
THREAD_TYPES = (10, 11, 12)  # channel types ANNOUNCEMENT_THREAD, PUBLIC_THREAD, PRIVATE_THREAD
MAX_KNOWN_THREADS = 100_000  # thread -> parent entries kept from gateway events (oldest forgotten first)
NONCE_CHARS = 25  # Create Message: a nonce is an integer or a string of at most 25 characters
DEPLOYMENT_TAG_CHARS = 6  # + reply id (<= 13 base-36 digits for a 64-bit id) + "." + chunk index (<= 5) = 25


def is_snowflake(value: Any) -> bool:
    """A Discord id: an unsigned 64-bit integer written in ASCII decimal (str.isdigit() and int() also take other
    scripts' digits). A channel id goes into the reply's URL path, so nothing else (a '../', a '/', a space) may
    ever pass for one."""
    return isinstance(value, str) and SNOWFLAKE.fullmatch(value) is not None and int(value) < 2**64


def snowflake(value: Any, where: str) -> str:
    """An id of a parsed event; MalformedPayload unless it is a snowflake."""
    if not is_snowflake(value):
        raise MalformedPayload(f"{where} is not a valid id")
    return value


def _snowflake_time(snowflake: str) -> float:
    """Interactions carry no timestamp; the id encodes its creation time."""
    return ((int(snowflake) >> 22) + DISCORD_EPOCH_MS) / 1000


def _base36(n: int) -> str:
    digits = ""
    while True:
        n, digit = divmod(n, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[digit] + digits
        if not n:
            return digits


def _message_id(body: Any) -> str | None:
    return str(body["id"]) if isinstance(body, dict) and "id" in body else None


class DiscordChannel:
    capabilities: frozenset[str] = frozenset()

    def __init__(self, config: ChannelConfig, limiter: Limiter | None = None, now: Callable[[], float] = time.time,
                 secret_key: str = ""):
        self.config = config
        self.limiter = limiter  # shared outbound pacing; None sends unpaced (tests)
        self.now = now
        try:
            self.public_key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(config.secrets["public_key"]))
        except ValueError:
            raise ConfigError(f"channel {config.id!r}: secrets.public_key is not a hex Ed25519 key") from None
        self.sender = HttpSender({"Authorization": f"Bot {config.secrets['bot_token']}"})
        # Who "@us" is: the gateway's READY names the bot user; until then the application id, which a bot's
        # user id equals.
        self.bot_user_id: str | None = str(config.options.get("application_id") or "") or None
        self.thread_parents: dict[str, str] = {}  # thread channel id -> parent channel id, from gateway events
        # Nonces are checked per author (the bot): two deployments sharing a bot must not share nonces.
        self.deployment_tag = keyed_hash(secret_key, "discord-nonce", "deployment")[:DEPLOYMENT_TAG_CHARS]

    def observe(self, event: str, d: Any) -> None:
        """Gateway dispatches that are not user turns but tell the parser something: READY (our user id) and the
        thread events (which channels are threads, and their parents; sent with the GUILDS intent)."""
        if not isinstance(d, dict):
            return
        if event == "READY":
            user = d.get("user")
            if isinstance(user, dict) and isinstance(user.get("id"), str):
                self.bot_user_id = user["id"]
        elif event in ("GUILD_CREATE", "THREAD_LIST_SYNC"):
            for thread in d.get("threads") or []:
                self._note_thread(thread)
        elif event in ("THREAD_CREATE", "THREAD_UPDATE"):
            self._note_thread(d)
        elif event == "THREAD_DELETE":
            self.thread_parents.pop(str(d.get("id")), None)

    def _note_thread(self, channel: Any) -> str | None:
        """Remember a thread's parent (from a channel object); the parent, or None if it is not a thread."""
        if not isinstance(channel, dict) or channel.get("type") not in THREAD_TYPES:
            return None
        thread, parent = channel.get("id"), channel.get("parent_id")
        if not is_snowflake(thread) or not is_snowflake(parent):
            return None
        if thread not in self.thread_parents and len(self.thread_parents) >= MAX_KNOWN_THREADS:
            self.thread_parents.pop(next(iter(self.thread_parents)))
        self.thread_parents[thread] = parent
        return parent

    def receive(self, request: WebhookRequest) -> Answer:
        """Signed interactions at /interactions, answered at once; messages come over the gateway
        (ingress/discord_gateway.py), not to a webhook."""
        if request.route != "interactions" or request.method != "POST":
            raise UnknownChannel(self.config.id)
        self.verify(request)
        response, messages = self.interaction(request.body)
        return Answer(messages, body=response)

    def verify(self, request: WebhookRequest) -> None:
        signature, timestamp = request.header("X-Signature-Ed25519"), request.header("X-Signature-Timestamp")
        if not signature or not timestamp:
            raise InvalidSignature("X-Signature-Ed25519 or X-Signature-Timestamp missing")
        try:
            stale = abs(self.now() - int(timestamp)) > MAX_SKEW
            self.public_key.verify(bytes.fromhex(signature), timestamp.encode() + request.body)
        except (ValueError, OverflowError, BadEd25519):
            raise InvalidSignature("interaction signature invalid") from None
        if stale:
            raise InvalidSignature("interaction timestamp outside the allowed window")

    @parser
    def parse(self, body: bytes) -> list[InboundMessage]:
        """A gateway dispatch as JSON; only MESSAGE_CREATE carries user turns."""
        doc = load_json(body)
        if not isinstance(doc, dict):
            raise MalformedPayload("body is not a gateway dispatch object")
        if doc.get("t") != "MESSAGE_CREATE":
            return []
        return self.parse_event(require(doc, "d", dict, "dispatch"))

    @parser
    def parse_event(self, d: dict[str, Any]) -> list[InboundMessage]:
        author = require(d, "author", dict, "d")
        content = d.get("content") if isinstance(d.get("content"), str) else ""
        attachments = [a for a in d.get("attachments") or [] if isinstance(a, dict)]
        # Never answer another bot, nor a webhook (its `author` is the webhook itself and need not say bot).
        if author.get("bot") or d.get("webhook_id") is not None or (not content.strip() and not attachments):
            log.debug("channel.ignored", channel=self.config.id, reason="bot, webhook or empty",
                      message_id=d.get("id"))
            return []
        text = "\n".join([content, *(f"[attachment: {a.get('filename', 'file')}]" for a in attachments)]).strip()
        try:
            written = datetime.fromisoformat(require(d, "timestamp", str, "d")).timestamp()
        except ValueError:
            raise MalformedPayload("d.timestamp is not an ISO 8601 time") from None
        sent_at = sent_time(written, self.now(), replay_window=None)  # the gateway is live: nothing to replay
        is_new = content.strip().lower() in NEW_COMMANDS
        message = self._message(d, author, text, snowflake(d.get("id"), "d.id"), sent_at,
                                NEW_SESSION if is_new else None, addressed=self._addressed(d, content, command=is_new))
        return [message]

    def _addressed(self, d: dict[str, Any], content: str, command: bool) -> bool:
        """A DM; or in a guild: the bot in mentions[] (or <@id> in the content), a reply to the bot's message
        (referenced_message), or a text command."""
        kind = GROUP if d.get("guild_id") else DM
        bot = self.bot_user_id
        mentions = d.get("mentions") if isinstance(d.get("mentions"), list) else []
        mentioned = bot is not None and (
            any(isinstance(m, dict) and m.get("id") == bot for m in mentions)
            or f"<@{bot}>" in content or f"<@!{bot}>" in content)
        referenced = d.get("referenced_message")
        author = referenced.get("author") if isinstance(referenced, dict) else None
        replied = bot is not None and isinstance(author, dict) and author.get("id") == bot
        return policies.addressed(kind, mentioned=mentioned, replied_to_bot=replied, command=command)

    @parser
    def interaction(self, body: bytes) -> tuple[dict[str, Any], list[InboundMessage]]:
        """The immediate HTTP answer to an interaction and the turns it starts."""
        doc = load_json(body)
        kind = doc.get("type") if isinstance(doc, dict) else None
        if kind == 1:
            return {"type": 1}, []
        if kind != 2:
            raise MalformedPayload(f"unsupported interaction type {kind!r}")
        data = require(doc, "data", dict, "interaction")
        interaction_id = snowflake(doc.get("id"), "interaction.id")
        member = doc.get("member") if isinstance(doc.get("member"), dict) else {}
        user = member.get("user") or doc.get("user")
        if not isinstance(user, dict):
            raise MalformedPayload("interaction has neither member.user nor user")
        name = data.get("name")
        if name == "new":
            text, command, reply = "/new", NEW_SESSION, "Starting a new conversation."
        elif name == "ask":
            options = {o.get("name"): o.get("value") for o in data.get("options") or [] if isinstance(o, dict)}
            if not isinstance(options.get("question"), str):
                raise MalformedPayload("/ask needs a 'question' option")
            text, command, reply = options["question"], None, "Got it, answering here shortly."
        else:
            raise MalformedPayload(f"unknown application command {name!r}")
        sent_at = _snowflake_time(interaction_id)
        # An application command is addressed to the bot by construction.
        message = self._message(doc, user, text, f"interaction:{interaction_id}", sent_at, command, addressed=True)
        return {"type": 4, "data": {"content": reply}}, [message]

    def _message(
        self, d: dict[str, Any], user: dict[str, Any], text: str, msg_id: str, sent_at: float, command: str | None,
        addressed: bool,
    ) -> InboundMessage:
        """Gateway messages and interactions in one channel land in the same session. A thread is a channel of its
        own (chat_id, where the reply goes); with threads off its session is its parent's when the parent is known
        (an interaction's `channel`, or the gateway's thread events)."""
        channel_id = snowflake(d.get("channel_id"), "d.channel_id")
        kind = GROUP if d.get("guild_id") else DM
        user_id = snowflake(user.get("id"), "author.id")
        parent = self._note_thread(d.get("channel")) or self.thread_parents.get(channel_id)
        return inbound_message(
            self.config, kind=kind, chat_id=channel_id, sender_id=user_id,
            sender_name=str(user.get("global_name") or user.get("username") or user_id), text=text,
            message_id=msg_id, sent_at=sent_at, command=command, addressed=addressed,
            thread_id=channel_id if parent else None,
            boundary=parent if parent and not policies.threads_enabled(self.config) else channel_id,
        )

    def nonce(self, reply_id: int, chunk: int) -> str:
        """The Create Message nonce of one chunk of a stored reply: the same in every process of this deployment
        (SECRET_KEY's tag, the reply's database id, the chunk's index), unique per chunk, at most 25 characters."""
        return f"{self.deployment_tag}{_base36(reply_id)}.{_base36(chunk)}"

    def send(self, chat_id: str, chat_kind: str, text: str, fence: Fence | None = None,
             thread_id: str | None = None, reply_id: int | None = None) -> Delivery:
        """With `reply_id`, each chunk goes with an enforced nonce: Discord answers a create whose nonce it saw from
        this bot in the past few minutes with that first message and posts nothing, so a successor (or an HTTP retry)
        resending a chunk that was already accepted does not post it twice."""
        if not is_snowflake(chat_id):  # final: no retry, and nothing of it reaches a URL (nor the error: it is logged)
            return Delivery(ok=False, error="chat_id is not a Discord snowflake: not sent", attempts=0)
        url = f"{self.config.api_base}/channels/{chat_id}/messages"
        before = gate(self, chat_id, chat_kind, fence)

        def create(index: int, chunk: str) -> Delivery:
            payload: dict[str, Any] = {"content": chunk, "allowed_mentions": {"parse": []}}  # never @everyone/roles
            if reply_id is not None:
                payload |= {"nonce": self.nonce(reply_id, index), "enforce_nonce": True}
            return self.sender.post(url, payload, _message_id, before)

        return send_chunks(text, TEXT_LIMIT, create)
