"""Telegram Bot API: secret-token webhooks, one Update per request, replies via sendMessage."""

from __future__ import annotations

from typing import Any, Callable

import structlog

from shared.channels.base import (
    WebhookRequest,
    load_json,
    gate,
    parser,
    require,
    same_secret,
    session_key,
)
from shared.config import ChannelConfig
from shared.errors import InvalidSignature
from shared.messages import DM, GROUP, NEW_SESSION, Delivery, InboundMessage
from shared.outbound import HttpSender, send_chunks
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


def _sender_name(user: dict[str, Any], fallback: str) -> str:
    full = " ".join(str(user[k]) for k in ("first_name", "last_name") if user.get(k))
    return full or str(user.get("username") or user.get("title") or fallback)


class TelegramChannel:
    def __init__(self, config: ChannelConfig, limiter: Limiter | None = None):
        self.config = config
        self.limiter = limiter  # shared outbound pacing; None sends unpaced (tests)
        self.bot_username = str(config.options["bot_username"]).lstrip("@").lower()
        # The token is part of the path; HttpSender logs only what precedes "/bot".
        self.url = f"{config.api_base}/bot{config.secrets['bot_token']}/sendMessage"
        self.sender = HttpSender({})

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
        message_id = require(message, "message_id", int, "message")
        chat_id = str(require(chat, "id", int, "message.chat"))
        kind = CHAT_KINDS.get(str(chat.get("type")))
        text = message.get("text") or message.get("caption") or _placeholder(message)
        if kind is None or not isinstance(text, str):
            log.info("channel.ignored", channel=self.config.id, reason="not a user turn", chat_type=chat.get("type"))
            return []
        user = message.get("from") or message.get("sender_chat")
        user = user if isinstance(user, dict) else {}
        sender_id = str(user.get("id", chat_id))
        date = message.get("date")
        return [
            InboundMessage(
                channel_id=self.config.id,
                platform="telegram",
                session_key=session_key(self.config.id, kind, chat_id),
                chat_id=chat_id,
                chat_kind=kind,
                sender_id=sender_id,
                sender_name=_sender_name(user, sender_id),
                text=text,
                platform_message_id=f"{chat_id}:{message_id}",
                sent_at=float(date) if isinstance(date, (int, float)) else 0.0,
                command=NEW_SESSION if self._is_new(message) else None,
            )
        ]

    def _is_new(self, message: dict[str, Any]) -> bool:
        """/new, or /new@<our bot> in groups; /new@OtherBot is addressed to someone else."""
        text, entities = message.get("text"), message.get("entities")
        for entity in entities if isinstance(entities, list) else []:
            if isinstance(entity, dict) and entity.get("type") == "bot_command" and entity.get("offset") == 0:
                length = entity.get("length")
                command = text[:length].lower() if isinstance(text, str) and isinstance(length, int) else ""
                return command in ("/new", f"/new@{self.bot_username}")
        return False

    def send(self, chat_id: str, chat_kind: str, text: str, fence: Callable[[], None] | None = None) -> Delivery:
        target: int | str = int(chat_id) if chat_id.lstrip("-").isdigit() else chat_id

        def message_id(body: Any) -> str | None:
            """Chat-scoped like inbound ids, because Telegram message ids are only unique per chat."""
            try:
                return f"{chat_id}:{body['result']['message_id']}"
            except (TypeError, KeyError):
                return None

        before = gate(self, chat_id, chat_kind, fence)
        return send_chunks(text, TEXT_LIMIT, lambda chunk: self.sender.post(
            self.url, {"chat_id": target, "text": chunk}, message_id, before))
