"""Telegram Bot API: secret-token webhooks, one Update per request, replies via sendMessage."""

from __future__ import annotations

import time
from typing import Any, Callable

import structlog

from shared import policies
from shared.channels.base import (
    Answer,
    WebhookRequest,
    gate,
    inbound_message,
    integer_id,
    load_json,
    parser,
    require,
    same_secret,
    sent_time,
)
from shared.config import ChannelConfig
from shared.errors import InvalidSignature, MalformedPayload, UnknownChannel
from shared.messages import DM, GROUP, NEW_SESSION, Delivery, InboundMessage
from shared.outbound import Fence, HttpSender, send_chunks
from shared.ratelimit import Limiter

log = structlog.get_logger(__name__)

TEXT_LIMIT = 4096
CHAT_KINDS = {"private": DM, "group": GROUP, "supergroup": GROUP}
# Content a user sends without text; service messages (joins, pins, ...) are not turns and are dropped.
MEDIA_KINDS = (
    "photo", "video", "animation", "voice", "audio", "video_note", "sticker", "contact", "poll", "dice", "venue",
    "game", "story",
)


def _placeholder(message: dict[str, Any]) -> str | None:
    """A readable stand-in for a message without text, or None when it is not user content."""
    document = message.get("document")
    if isinstance(document, dict):
        return f"[document: {document['file_name']}]" if document.get("file_name") else "[document]"
    location = message.get("location")
    if isinstance(location, dict) and "venue" not in message:
        return f"[location: {location.get('latitude')}, {location.get('longitude')}]"
    return next((f"[{kind}]" for kind in MEDIA_KINDS if kind in message), None)


def _utf16(text: Any, offset: Any, length: Any) -> str:
    """The part of `text` an entity covers: Telegram counts entity offsets and lengths in UTF-16 code units."""
    if not isinstance(text, str) or not isinstance(offset, int) or not isinstance(length, int) or offset < 0:
        return ""
    data = text.encode("utf-16-le", "surrogatepass")
    return data[2 * offset:2 * (offset + length)].decode("utf-16-le", "ignore")


def _sender_name(user: dict[str, Any], fallback: str) -> str:
    full = " ".join(str(user[k]) for k in ("first_name", "last_name") if user.get(k))
    return full or str(user.get("username") or user.get("title") or fallback)


class TelegramChannel:
    capabilities: frozenset[str] = frozenset()

    def __init__(self, config: ChannelConfig, limiter: Limiter | None = None, now: Callable[[], float] = time.time):
        self.config = config
        self.limiter = limiter  # shared outbound pacing; None sends unpaced (tests)
        self.now = now  # the receive time, against which send times are checked
        self.bot_username = str(config.options["bot_username"]).lstrip("@").lower()
        token_id = config.secrets["bot_token"].partition(":")[0]
        self.bot_id = token_id if token_id.isdigit() else None  # a bot token starts with the bot's user id
        # The token is part of the path; HttpSender logs only what precedes "/bot".
        self.url = f"{config.api_base}/bot{config.secrets['bot_token']}/sendMessage"
        self.sender = HttpSender({})

    def receive(self, request: WebhookRequest) -> Answer:
        """A signed POST with one Update. A malformed one is answered 200 and dropped: Telegram queues updates per
        chat, so refusing one would block every later update of its chat."""
        if request.route or request.method != "POST":
            raise UnknownChannel(self.config.id)
        self.verify(request)
        try:
            return Answer(self.parse(request.body))
        except MalformedPayload as exc:
            return Answer(body="dropped\n", dropped=str(exc))

    def verify(self, request: WebhookRequest) -> None:
        if not same_secret(request.header("X-Telegram-Bot-Api-Secret-Token"), self.config.secrets["secret_token"]):
            raise InvalidSignature("X-Telegram-Bot-Api-Secret-Token missing or wrong")

    @parser
    def parse(self, body: bytes) -> list[InboundMessage]:
        update = load_json(body)
        require(update, "update_id", int, "update")
        if "message" not in update:
            kind = next((k for k in update if k != "update_id"), "empty")
            log.info("channel.ignored", channel=self.config.id, reason="not a message", update_kind=kind)
            return []
        message = require(update, "message", dict, "update")
        chat = require(message, "chat", dict, "message")
        message_id = integer_id(message.get("message_id"), "message.message_id")
        chat_id = integer_id(chat.get("id"), "message.chat.id")
        kind = CHAT_KINDS.get(str(chat.get("type")))
        text = message.get("text") or message.get("caption") or _placeholder(message)
        if kind is None or not isinstance(text, str):
            log.info("channel.ignored", channel=self.config.id, reason="not a user turn", chat_type=chat.get("type"))
            return []
        user = message.get("from") or message.get("sender_chat")
        user = user if isinstance(user, dict) else {}
        sender_id = integer_id(user["id"], "message.from.id") if "id" in user else chat_id
        sent_at = sent_time(message.get("date"), self.now())
        command = self._command(message)
        # Forum topics: every message of a topic has is_topic_message and the topic's message_thread_id (replies
        # in ordinary supergroups may carry a message_thread_id too, without is_topic_message: not a topic).
        thread = message.get("message_thread_id")
        topic = integer_id(thread, "message.message_thread_id") if kind == GROUP and message.get(
            "is_topic_message") is True else None
        return [inbound_message(
            self.config, kind=kind, chat_id=chat_id, sender_id=sender_id, sender_name=_sender_name(user, sender_id),
            text=text, message_id=f"{chat_id}:{message_id}", sent_at=sent_at,
            command=NEW_SESSION if command == "/new" else None,
            addressed=policies.addressed(kind, mentioned=self._mentions_us(message),
                                         replied_to_bot=self._replies_to_us(message), command=command is not None),
            thread_id=topic, topic=topic,
        )]

    def _command(self, message: dict[str, Any]) -> str | None:
        """The command the text starts with ("/new"), lower-case, if it is ours: /cmd, or /cmd@<our bot> in groups;
        /cmd@OtherBot is addressed to someone else."""
        text, entities = message.get("text"), message.get("entities")
        for entity in entities if isinstance(entities, list) else []:
            if isinstance(entity, dict) and entity.get("type") == "bot_command" and entity.get("offset") == 0:
                name, _, bot = _utf16(text, 0, entity.get("length")).lower().partition("@")
                return name if len(name) > 1 and bot in ("", self.bot_username) else None
        return None

    def _is_us(self, user: dict[str, Any]) -> bool:
        username = user.get("username")
        return (isinstance(username, str) and username.lower() == self.bot_username) or (
            self.bot_id is not None and str(user.get("id")) == self.bot_id)

    def _mentions_us(self, message: dict[str, Any]) -> bool:
        """An @username mention of the bot, or a text_mention of it, in the text or the caption."""
        for text_key, entities_key in (("text", "entities"), ("caption", "caption_entities")):
            text, entities = message.get(text_key), message.get(entities_key)
            for entity in entities if isinstance(entities, list) else []:
                if not isinstance(entity, dict):
                    continue
                if entity.get("type") == "mention":
                    if _utf16(text, entity.get("offset"), entity.get("length")).lower() == f"@{self.bot_username}":
                        return True
                elif entity.get("type") == "text_mention" and isinstance(entity.get("user"), dict):
                    if self._is_us(entity["user"]):
                        return True
        return False

    def _replies_to_us(self, message: dict[str, Any]) -> bool:
        """A reply to one of the bot's messages. In a forum topic every message replies to the topic's creation
        (a service message), which does not count even when the bot opened the topic."""
        reply = message.get("reply_to_message")
        if not isinstance(reply, dict) or "forum_topic_created" in reply:
            return False
        author = reply.get("from")
        return isinstance(author, dict) and author.get("is_bot") is True and self._is_us(author)

    def send(self, chat_id: str, chat_kind: str, text: str, fence: Fence | None = None,
             thread_id: str | None = None, reply_id: int | None = None) -> Delivery:
        target: int | str = int(chat_id) if chat_id.lstrip("-").isdigit() else chat_id

        def message_id(body: Any) -> str | None:
            """Chat-scoped like inbound ids, because Telegram message ids are only unique per chat."""
            try:
                return f"{chat_id}:{body['result']['message_id']}"
            except (TypeError, KeyError):
                return None

        body: dict[str, Any] = {"chat_id": target}
        if thread_id is not None:  # a forum topic: the reply goes into the topic the message was posted in
            body["message_thread_id"] = int(thread_id) if thread_id.isdigit() else thread_id
        before = gate(self, chat_id, chat_kind, fence)
        return send_chunks(text, TEXT_LIMIT, lambda _index, chunk: self.sender.post(
            self.url, body | {"text": chunk}, message_id, before))
