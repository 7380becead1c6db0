"""WhatsApp Cloud API: Meta webhook handshake and signatures, message normalization, replies via the Graph API."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from typing import Any, Callable, Mapping

import requests
import structlog

from shared import policies
from shared.channels.base import (
    TEMPLATES,
    Answer,
    WebhookRequest,
    gate,
    inbound_message,
    load_json,
    matching,
    parser,
    require,
    same_secret,
    sent_time,
)
from shared.config import ChannelConfig
from shared.errors import (
    HandshakeRefused,
    InvalidSignature,
    MalformedPayload,
    UnknownChannel,
)
from shared.messages import DM, GROUP, NEW_SESSION, Delivery, InboundMessage
from shared.outbound import Fence, HttpSender, send_chunks
from shared.ratelimit import Limiter

log = structlog.get_logger(__name__)

TEXT_LIMIT = 4096
MEDIA_TYPES = ("image", "video", "audio", "document", "sticker")
# Error codes WhatsApp may return with HTTP 400 that are really "slow down": throughput and pair rate limit.
RATE_LIMIT_CODES = frozenset({130429, 131056})
# Id formats: a user is their phone number (wa_id, digits); message ids ("wamid.…") and group ids are base64 text
# (Cloud API groups; "<digits>@g.us" where a provider passes WhatsApp's own group ids on).
USER_ID = re.compile(r"[0-9]{1,20}")
MESSAGE_ID = re.compile(r"[A-Za-z0-9._=+/-]{1,200}")
GROUP_ID = re.compile(r"[A-Za-z0-9._=+/@-]{1,100}")


def _rate_limited(response: requests.Response) -> bool:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and error.get("code") in RATE_LIMIT_CODES


def _message_id(body: Any) -> str | None:
    try:
        return str(body["messages"][0]["id"])
    except (TypeError, KeyError, IndexError):
        return None


def _list(value: dict[str, Any], key: str) -> list[Any]:
    """An optional list field: absent is empty, any other type is a malformed payload."""
    items = value.get(key, [])
    if not isinstance(items, list):
        raise MalformedPayload(f"value.{key} is not a list")
    return items


def _digits(value: Any) -> str:
    return re.sub(r"\D", "", value) if isinstance(value, str) else ""


def _addressed_in_group(msg: dict[str, Any], text: str, our_number: str) -> tuple[bool, bool]:
    """(mentioned, replied to us) for a group message. The groups webhook carries no mention list; a reply names
    the replied-to message's author in `context.from` (our display number when it was ours), and a client's
    mention of a number is written "@<number>" into the text (see shared/policies.py)."""
    if not our_number:
        return False, False
    context = msg.get("context")
    replied = isinstance(context, dict) and _digits(context.get("from")) == our_number
    mentioned = re.search(rf"@\+?{our_number}(?!\d)", text) is not None
    return mentioned, replied


def _text_of(msg: dict[str, Any]) -> str:
    """The user's text, or a placeholder the Agent can read for anything that is not plain text."""
    kind = str(msg.get("type") or "unknown")
    part = msg.get(kind) if isinstance(msg.get(kind), dict) else {}
    if kind == "text":
        return str(part.get("body", ""))
    if kind in MEDIA_TYPES:
        label = part.get("caption") or part.get("filename")
        return f"[{kind}: {label}]" if label else f"[{kind}]"
    if kind == "location":
        return f"[location: {part.get('latitude')}, {part.get('longitude')}]"
    if kind == "interactive":
        reply = part.get(str(part.get("type"))) or {}
        return str(reply.get("title") or "[interactive]") if isinstance(reply, dict) else "[interactive]"
    if kind == "button":
        return str(part.get("text") or "[button]")
    if kind == "reaction":
        return f"[reaction: {part['emoji']}]" if part.get("emoji") else "[reaction]"
    if kind == "unsupported":
        return "[unsupported message]"
    return f"[{kind}]"


class WhatsAppChannel:
    capabilities = frozenset({TEMPLATES})

    def __init__(self, config: ChannelConfig, limiter: Limiter | None = None, now: Callable[[], float] = time.time):
        self.config = config
        self.limiter = limiter  # shared outbound pacing; None sends unpaced (tests)
        self.now = now  # the receive time, against which send times are checked
        self.phone_number_id = str(config.options["phone_number_id"])
        version = config.options.get("api_version", "v21.0")
        self.url = f"{config.api_base}/{version}/{self.phone_number_id}/messages"
        self.sender = HttpSender(
            {"Authorization": f"Bearer {config.secrets['access_token']}"}, retryable=_rate_limited
        )

    def receive(self, request: WebhookRequest) -> Answer:
        """A GET is Meta's subscription check; a POST, signed notifications."""
        if request.route:
            raise UnknownChannel(self.config.id)
        if request.method in ("GET", "HEAD"):
            return Answer(body=self.handshake(request.query))
        self.verify(request)
        return Answer(self.parse(request.body))

    def handshake(self, query: Mapping[str, str]) -> str:
        """Meta's GET subscription check: echo the challenge only to someone who knows our verify token."""
        if query.get("hub.mode") != "subscribe" or not same_secret(
            query.get("hub.verify_token"), self.config.secrets["verify_token"]
        ):
            raise HandshakeRefused("webhook verification token does not match")
        return query.get("hub.challenge", "")

    def verify(self, request: WebhookRequest) -> None:
        expected = hmac.new(self.config.secrets["app_secret"].encode(), request.body, hashlib.sha256).hexdigest()
        if not same_secret(request.header("X-Hub-Signature-256"), f"sha256={expected}"):
            raise InvalidSignature("X-Hub-Signature-256 missing or wrong")

    @parser
    def parse(self, body: bytes) -> list[InboundMessage]:
        doc = load_json(body)
        if not isinstance(doc, dict) or doc.get("object") != "whatsapp_business_account":
            raise MalformedPayload("body is not a whatsapp_business_account event")
        messages: list[InboundMessage] = []
        for entry in require(doc, "entry", list, "body"):
            for change in require(entry, "changes", list, "entry"):
                value = require(change, "value", dict, "change")
                metadata = value.get("metadata") if isinstance(value.get("metadata"), dict) else {}
                if str(metadata.get("phone_number_id")) != self.phone_number_id:
                    log.info("channel.ignored", channel=self.config.id, reason="other phone_number_id")
                    continue
                names = {
                    c.get("wa_id"): c["profile"].get("name")
                    for c in _list(value, "contacts")
                    if isinstance(c, dict) and isinstance(c.get("profile"), dict)
                }
                # statuses[] are receipts for our own replies, not user turns: nothing to do.
                our_number = _digits(metadata.get("display_phone_number"))
                now = self.now()
                messages.extend(self._message(msg, names, our_number, now) for msg in _list(value, "messages"))
        return messages

    def _message(self, msg: Any, names: Mapping[Any, Any], our_number: str, now: float) -> InboundMessage:
        msg_id = matching(require(msg, "id", str, "message"), MESSAGE_ID, "message.id")
        sender = matching(require(msg, "from", str, "message"), USER_ID, "message.from")
        sent_at = sent_time(msg.get("timestamp"), now)
        group_id = msg.get("group_id")
        kind, chat_id = (GROUP, matching(group_id, GROUP_ID, "message.group_id")) if group_id else (DM, sender)
        text = _text_of(msg)
        is_new = msg.get("type") == "text" and text.strip().lower() == "/new"
        mentioned, replied = _addressed_in_group(msg, text, our_number) if kind == GROUP else (False, False)
        return inbound_message(
            self.config, kind=kind, chat_id=chat_id, sender_id=sender, sender_name=str(names.get(sender) or sender),
            text=text, message_id=msg_id, sent_at=sent_at, command=NEW_SESSION if is_new else None,
            addressed=policies.addressed(kind, mentioned=mentioned, replied_to_bot=replied, command=is_new),
        )

    def send(self, chat_id: str, chat_kind: str, text: str, fence: Fence | None = None,
             thread_id: str | None = None, reply_id: int | None = None) -> Delivery:
        recipient = "group" if chat_kind == GROUP else "individual"
        before = gate(self, chat_id, chat_kind, fence)
        return send_chunks(text, TEXT_LIMIT, lambda _index, chunk: self.sender.post(self.url, {
            "messaging_product": "whatsapp",
            "recipient_type": recipient,
            "to": chat_id,
            "type": "text",
            "text": {"body": chunk},
        }, _message_id, before))

    def send_template(self, chat_id: str, chat_kind: str, name: str, language: str,
                      fence: Fence | None = None) -> Delivery:
        """Send an approved message template (Cloud API `type: "template"`): what WhatsApp allows outside the
        24-hour customer-service window, where free-form text is refused (error 131047)."""
        recipient = "group" if chat_kind == GROUP else "individual"
        return self.sender.post(self.url, {
            "messaging_product": "whatsapp",
            "recipient_type": recipient,
            "to": chat_id,
            "type": "template",
            "template": {"name": name, "language": {"code": language}},
        }, _message_id, gate(self, chat_id, chat_kind, fence))
