"""Inbound platform payloads in the platforms' real formats (see tests/fixtures), and the headers that sign them.

Used by `chatsessions demo`, the tests and load generators: build a dict, `encode()` it, POST it with the
matching headers to /webhooks/<channel_id>. Discord gateway messages are MESSAGE_CREATE `d` objects, for
`StandInGateway.dispatch_message`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

DISCORD_EPOCH_MS = 1420070400000


def encode(payload: dict[str, Any]) -> bytes:
    """The exact bytes to POST (and to sign)."""
    return json.dumps(payload, separators=(",", ":")).encode()


# -- WhatsApp Cloud API ----------------------------------------------------------------------------------------------

def whatsapp_text(phone_number_id: str, from_: str, name: str, text: str, msg_id: str,
                  group_id: str | None = None, timestamp: float | None = None) -> dict[str, Any]:
    """A `messages` webhook with one text message from `from_` (wa_id), in a group when group_id is given."""
    message: dict[str, Any] = {"from": from_, "id": msg_id, "timestamp": str(int(timestamp or time.time())),
                               "text": {"body": text}, "type": "text"}
    if group_id:
        message["group_id"] = group_id
    return _whatsapp_event(phone_number_id, contacts=[{"profile": {"name": name}, "wa_id": from_}],
                           messages=[message])


WHATSAPP_STATUSES = ("sent", "delivered", "read")  # what Meta posts for each message we send, in that order


def whatsapp_status(phone_number_id: str, recipient_id: str, msg_id: str, status: str,
                    timestamp: float | None = None) -> dict[str, Any]:
    """A `messages` webhook with one status of a message we sent to `recipient_id` (wa_id): `statuses[]` instead
    of `messages[]`. `sent` and `delivered` carry the conversation and pricing objects (`sent` with the
    conversation's expiration), `read` neither, as Meta sends them."""
    at = int(timestamp or time.time())
    entry: dict[str, Any] = {"id": msg_id, "status": status, "timestamp": str(at), "recipient_id": recipient_id}
    if status in ("sent", "delivered"):
        conversation: dict[str, Any] = {"id": hashlib.sha256(recipient_id.encode()).hexdigest()[:32]}
        if status == "sent":
            conversation["expiration_timestamp"] = str(at + 86400)
        entry["conversation"] = conversation | {"origin": {"type": "service"}}
        entry["pricing"] = {"billable": True, "pricing_model": "PMP", "category": "service"}
    return _whatsapp_event(phone_number_id, statuses=[entry])


def _whatsapp_event(phone_number_id: str, **fields: Any) -> dict[str, Any]:
    """The envelope of a `messages` webhook for our phone number: one entry, one change, `fields` in its value."""
    value = {"messaging_product": "whatsapp",
             "metadata": {"display_phone_number": "15550783881", "phone_number_id": str(phone_number_id)}} | fields
    return {"object": "whatsapp_business_account",
            "entry": [{"id": "102290129340398", "changes": [{"value": value, "field": "messages"}]}]}


def sign_whatsapp(body: bytes, app_secret: str) -> dict[str, str]:
    """Headers Meta sends: X-Hub-Signature-256 is the HMAC-SHA256 of the raw body with the app secret."""
    digest = hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={digest}"}


# -- Telegram Bot API ------------------------------------------------------------------------------------------------

def telegram_text(chat_id: int, chat_type: str, user_id: int, first_name: str, text: str, message_id: int,
                  update_id: int, title: str | None = None, date: float | None = None) -> dict[str, Any]:
    """An Update with one text message; chat_type "private", "group" or "supergroup" (groups need a title).

    A leading /command or @mention gets the entity Telegram attaches to it.
    """
    user = {"id": user_id, "is_bot": False, "first_name": first_name, "language_code": "en"}
    if chat_type == "private":
        chat: dict[str, Any] = {"id": chat_id, "first_name": first_name, "type": "private"}
    else:
        chat = {"id": chat_id, "title": title or "Group", "type": chat_type}
    message: dict[str, Any] = {"message_id": message_id, "from": user, "chat": chat,
                               "date": int(date or time.time()), "text": text}
    first = text.split(maxsplit=1)[0] if text.strip() else ""
    if first[:1] in ("/", "@") and len(first) > 1:
        kind = "bot_command" if first.startswith("/") else "mention"
        message["entities"] = [{"offset": 0, "length": len(first), "type": kind}]
    return {"update_id": update_id, "message": message}


def telegram_headers(secret_token: str) -> dict[str, str]:
    """Telegram echoes the webhook's secret_token in this header on every update."""
    return {"Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": secret_token}


# -- Discord ---------------------------------------------------------------------------------------------------------

def discord_snowflake(at: float | None = None, increment: int = 0) -> str:
    """A snowflake id for `at` (epoch seconds); vary `increment` for several ids in the same millisecond."""
    ms = int((time.time() if at is None else at) * 1000) - DISCORD_EPOCH_MS
    return str((ms << 22) | (increment & 0xFFF))


def discord_message(channel_id: str, author_id: str, username: str, content: str, msg_id: str,
                    guild_id: str | None = None, at: float | None = None) -> dict[str, Any]:
    """The `d` of a gateway MESSAGE_CREATE; a guild channel message when guild_id is given, else a DM."""
    when = datetime.fromtimestamp(time.time() if at is None else at, UTC)
    d: dict[str, Any] = {
        "type": 0, "tts": False, "timestamp": when.isoformat(), "pinned": False, "mentions": [],
        "mention_roles": [], "mention_everyone": False, "id": msg_id, "flags": 0, "embeds": [],
        "edited_timestamp": None, "content": content, "components": [], "channel_id": channel_id,
        "author": {"id": author_id, "username": username.lower(), "global_name": username, "discriminator": "0",
                   "avatar": None, "public_flags": 0},
        "attachments": [],
    }
    if guild_id:
        d["guild_id"] = guild_id
        d["member"] = {"roles": [], "joined_at": "2025-03-02T10:00:00.000000+00:00", "deaf": False, "mute": False,
                       "flags": 0}
    return d


def sign_discord(body: bytes, private_key: Ed25519PrivateKey, timestamp: int | None = None) -> dict[str, str]:
    """Headers of a signed HTTP interaction: Ed25519 over timestamp + body."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    signature = private_key.sign(ts.encode() + body).hex()
    return {"Content-Type": "application/json", "X-Signature-Ed25519": signature, "X-Signature-Timestamp": ts}
