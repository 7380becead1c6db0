"""The simulated chats: each session's chat and members on its platform, the messages sent to it, and the signed
webhook request the platform would POST for each (a user message, or a WhatsApp status callback)."""

from __future__ import annotations

import itertools
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from cli.loadgen.targets import Target

KINDS = ("dm", "group")
NAMES = ("Ana", "Bruno", "Carla", "Diego", "Eve", "Farid", "Gita", "Hugo")
DISCORD_GUILD = "1280000000000000001"


@dataclass(eq=False)
class Session:
    index: int
    target: Target
    kind: str  # dm | group
    chat_id: str  # where its replies must arrive (the stand-in's chat id)
    members: list[tuple[str, str]]  # (platform user id, display name)
    next_k: int = 0
    reserved: int = 0
    outstanding: int = 0
    queued: bool = False
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def label(self) -> str:
        return f"{self.target.platform}:{self.kind}"


@dataclass(eq=False)
class Msg:
    session: Session
    k: int
    platform_message_id: str
    t_sched: float  # when it was due (open loop) or taken (closed loop), epoch seconds
    t_sent: float = 0.0
    t_accepted: float | None = None
    status: int | None = None  # HTTP status of the last attempt; None = transport error
    attempts: int = 0
    receipts: list[tuple[int, float, str, str]] = field(default_factory=list)  # (arrival no., at, prefix, chat)
    event: threading.Event | None = None


def _session(index: int, run_num: int, target: Target, kind: str) -> Session:
    tail = f"{run_num}{index:07d}"
    name = NAMES[index % len(NAMES)]
    if target.platform == "whatsapp":
        if kind == "dm":
            phone = f"1{tail}"
            return Session(index, target, kind, phone, [(phone, f"{name} {index}")])
        members = [(f"2{tail}{m}", NAMES[(index + m) % len(NAMES)]) for m in range(3)]
        return Session(index, target, kind, f"LG{run_num}G{index}", members)
    if target.platform == "telegram":
        if kind == "dm":
            return Session(index, target, kind, tail, [(tail, name)])
        members = [(f"7{tail}{m}", NAMES[(index + m) % len(NAMES)]) for m in range(3)]
        return Session(index, target, kind, f"-100{tail}", members)
    channel = str(1_300_000_000_000_000_000 + run_num * 10_000_000 + index)
    if kind == "dm":
        return Session(index, target, kind, channel, [(str(400_000_000_000_000_000 + int(tail)), name)])
    members = [(str(500_000_000_000_000_000 + int(tail) * 10 + m), NAMES[(index + m) % len(NAMES)]) for m in range(3)]
    return Session(index, target, kind, channel, members)


_update_ids = itertools.count(int(time.time()) % 1_000_000 * 1000)
_snowflake_inc = itertools.count()


def discord_interaction(session: Session, user: tuple[str, str], question: str) -> dict[str, Any]:
    """An APPLICATION_COMMAND `/ask question:<text>` interaction, as Discord POSTs it."""
    from cli.standins import payloads as p

    uid, name = user
    u = {"id": uid, "username": name.lower(), "global_name": name, "discriminator": "0", "avatar": None,
         "public_flags": 0}
    doc: dict[str, Any] = {
        "type": 2, "id": p.discord_snowflake(increment=next(_snowflake_inc)),
        "application_id": str(session.target.options.get("application_id", "1")),
        "token": f"lg-token-{random.getrandbits(64):x}", "version": 1, "channel_id": session.chat_id,
        "data": {"id": "1300000000000000001", "name": "ask", "type": 1,
                 "options": [{"name": "question", "type": 3, "value": question}]},
    }
    if session.kind == "group":
        doc["guild_id"] = DISCORD_GUILD
        doc["member"] = {"user": u, "roles": [], "permissions": "0"}
    else:
        doc["user"] = u
    return doc


def build_status_request(session: Session, k: int, run_num: int) -> tuple[str, bytes, dict[str, str], str]:
    """(path, body, headers, message id) of status callback `k` of a WhatsApp DM session, signed now: the statuses
    of our replies to it in the order Meta posts them, sent, delivered, read for reply k // 3, then the next."""
    from cli.standins import payloads as p

    t = session.target
    msg_id = f"wamid.LGS{run_num}.{session.index}.{k // len(p.WHATSAPP_STATUSES)}"
    status = p.WHATSAPP_STATUSES[k % len(p.WHATSAPP_STATUSES)]
    body = p.encode(p.whatsapp_status(str(t.options["phone_number_id"]), session.chat_id, msg_id, status))
    return f"/webhooks/{t.channel_id}", body, p.sign_whatsapp(body, t.secrets["app_secret"]), msg_id


def build_request(session: Session, k: int, text: str, run_num: int) -> tuple[str, bytes, dict[str, str], str]:
    """(path, body, headers, platform message id) of message `k` of the session, signed now."""
    from cli.standins import payloads as p

    t = session.target
    user = session.members[k % len(session.members)]
    if t.platform == "whatsapp":
        msg_id = f"wamid.LG{run_num}.{session.index}.{k}"
        body = p.encode(p.whatsapp_text(str(t.options["phone_number_id"]), user[0], user[1], text, msg_id,
                                        group_id=session.chat_id if session.kind == "group" else None))
        return f"/webhooks/{t.channel_id}", body, p.sign_whatsapp(body, t.secrets["app_secret"]), msg_id
    if t.platform == "telegram":
        chat_type = "private" if session.kind == "dm" else "supergroup"
        body = p.encode(p.telegram_text(int(session.chat_id), chat_type, int(user[0]), user[1], text, k + 1,
                                        next(_update_ids), title=f"Load group {session.index}"))
        return (f"/webhooks/{t.channel_id}", body, p.telegram_headers(t.secrets["secret_token"]),
                f"{session.chat_id}:{k + 1}")
    doc = discord_interaction(session, user, text)
    body = p.encode(doc)
    assert t.discord_key is not None
    return f"/webhooks/{t.channel_id}/interactions", body, p.sign_discord(body, t.discord_key), f"interaction:{doc['id']}"

