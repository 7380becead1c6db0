"""`chatsessions demo`: a scripted, interleaved conversation on WhatsApp, Telegram and Discord, through the real system.

Stand-ins play the platforms (their send APIs and the Discord gateway); everything between them is the real
thing: signed webhooks -> ingress -> partition queues -> worker turns -> SQLite -> replies. The demo then
prints each session's transcript and checks programmatically that no session saw another's facts.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cli.standins import payloads as p

REPLY_TIMEOUT_S = 20.0
WA_PHONE_ID, DISCORD_GUILD, DISCORD_CHANNEL = "106540352242922", "1280000000000000001", "1290000000000000001"
SECRETS = {  # env var -> demo value; names as in shared/default_channels.toml
    "ACME_WA_APP_SECRET": "demo-app-secret", "ACME_WA_VERIFY_TOKEN": "demo-verify-token",
    "ACME_WA_ACCESS_TOKEN": "demo-access-token", "ACME_TG_BOT_TOKEN": "123456:demo-bot-token",
    "ACME_TG_SECRET_TOKEN": "demo-secret-token", "ACME_DISCORD_BOT_TOKEN": "demo-discord-token",
}
CONFIG = """\
partitions = 4

[[channels]]
id = "acme-whatsapp"
platform = "whatsapp"
agent = "demo"
api_base = "{standin}/acme-whatsapp"
secrets = {{ app_secret = "ACME_WA_APP_SECRET", verify_token = "ACME_WA_VERIFY_TOKEN", access_token = "ACME_WA_ACCESS_TOKEN" }}
options = {{ phone_number_id = "{phone_id}", api_version = "v21.0" }}
session = {{ group_reply = "always" }}  # WhatsApp groups cannot @mention the number (docs/session-policies.md)

[[channels]]
id = "acme-telegram"
platform = "telegram"
agent = "demo"
api_base = "{standin}/acme-telegram"
secrets = {{ bot_token = "ACME_TG_BOT_TOKEN", secret_token = "ACME_TG_SECRET_TOKEN" }}
options = {{ bot_username = "AcmeSupportBot" }}

[[channels]]
id = "acme-discord"
platform = "discord"
agent = "demo"
api_base = "{standin}/acme-discord"
secrets = {{ bot_token = "ACME_DISCORD_BOT_TOKEN", public_key = "ACME_DISCORD_PUBLIC_KEY" }}
options = {{ application_id = "1300000000000000001", gateway_url = "{gateway}" }}
session = {{ group_reply = "always" }}  # the script's #support members talk to the bot without @mentioning it
"""


@dataclass(frozen=True)
class Chat:
    """One conversation of the script: where it happens and who takes part (name -> platform user id)."""

    label: str
    channel: str  # channel id, also the stand-in prefix
    chat_id: str
    kind: str  # "dm" or "group"
    members: dict[str, tuple[str, str]]  # short name -> (user id, display name)
    title: str | None = None

    @property
    def where(self) -> str:
        return f"{self.label} ({self.title})" if self.title else self.label

    @property
    def session_key(self) -> str:
        return f"{self.channel}:{self.kind}:{self.chat_id}"


WA_GROUP = "HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA"
CHATS = {
    "ana": Chat("WhatsApp DM", "acme-whatsapp", "5511987650001", "dm", {"Ana": ("5511987650001", "Ana Souza")}),
    "bruno": Chat("WhatsApp DM", "acme-whatsapp", "5511987650002", "dm", {"Bruno": ("5511987650002", "Bruno Lima")}),
    "wa_group": Chat("WhatsApp group", "acme-whatsapp", WA_GROUP, "group",
                     {"Carla": ("5511987650003", "Carla Dias"), "Diego": ("5511987650004", "Diego Reis")}),
    "chen": Chat("Telegram DM", "acme-telegram", "381920001", "dm", {"Chen": ("381920001", "Chen")}),
    "tg_group": Chat("Telegram group", "acme-telegram", "-4012345678", "group",
                     {"Dana": ("381920002", "Dana"), "Eli": ("381920003", "Eli")}, title="Acme beta testers"),
    "discord": Chat("Discord #support", "acme-discord", DISCORD_CHANNEL, "group",
                    {"Eve": ("402911111111111111", "Eve"), "Farid": ("402922222222222222", "Farid")}),
}
SCRIPT = [  # (chat, member, text), interleaved across platforms
    ("ana", "Ana", "Hi, my name is Ana"),
    ("chen", "Chen", "Hello, my name is Chen"),
    ("bruno", "Bruno", "Hi, my name is Bruno"),
    ("discord", "Eve", "Hi, my order 90412 was charged twice"),
    ("ana", "Ana", "My order 48213 has not arrived"),
    ("wa_group", "Carla", "Hi! Our group order 66001 is for the office party"),
    ("bruno", "Bruno", "I'm waiting for order 77120"),
    ("tg_group", "Dana", "@AcmeSupportBot where is our order?"),
    ("chen", "Chen", "What is my name?"),
    ("wa_group", "Diego", "Where is the order?"),
    ("tg_group", "Eli", "@AcmeSupportBot it's order 31337"),
    ("bruno", "Bruno", "Where is my order?"),
    ("chen", "Chen", "/new"),
    ("discord", "Farid", "Any news on the order?"),
    ("ana", "Ana", "Where is my order?"),
    ("tg_group", "Dana", "@AcmeSupportBot thanks! And now, where is our order?"),
    ("chen", "Chen", "What is my name?"),
]


def _environment(workdir: Path, keep: bool, standin: str, gateway: str, public_key: str) -> str:
    """Config file and env, set before anything reads (and caches) the settings; returns the database URL."""
    config = workdir / "channels.toml"
    config.write_text(CONFIG.format(standin=standin, gateway=gateway, phone_id=WA_PHONE_ID))
    db = Path.cwd() / "chatsessions-demo.db" if keep else workdir / "demo.db"
    for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        stale.unlink(missing_ok=True)  # each run starts from an empty database
    os.environ.update(SECRETS, ACME_DISCORD_PUBLIC_KEY=public_key, CHATSESSIONS_CONFIG=str(config),
                      DATABASE_URL=f"sqlite:///{db}", BROKER_URL="memory://localhost/")
    os.environ.setdefault("LOG_LEVEL", "WARNING")  # the transcript is the output; logs only for trouble
    return os.environ["DATABASE_URL"]


class Player:
    """Sends the script's messages the way each platform would and waits for each reply at the stand-in."""

    def __init__(self, ingress_url: str, platforms, gateway):
        import requests

        self.http, self.url, self.platforms, self.gateway = requests.Session(), ingress_url, platforms, gateway
        self.ids = itertools.count(int(time.time() * 1000) % 10**9)  # unique per run, also with --keep

    def say(self, chat: Chat, member: str, text: str) -> str:
        user_id, name = chat.members[member]
        n = next(self.ids)
        before = len(self.platforms.sent)
        if chat.channel == "acme-whatsapp":
            group = chat.chat_id if chat.kind == "group" else None
            body = p.encode(p.whatsapp_text(WA_PHONE_ID, user_id, name, text, f"wamid.DEMO{n}", group_id=group))
            self._post(chat, body, p.sign_whatsapp(body, SECRETS["ACME_WA_APP_SECRET"]))
        elif chat.channel == "acme-telegram":
            chat_type = "private" if chat.kind == "dm" else "group"
            body = p.encode(p.telegram_text(int(chat.chat_id), chat_type, int(user_id), name, text, n, n, chat.title))
            self._post(chat, body, p.telegram_headers(SECRETS["ACME_TG_SECRET_TOKEN"]))
        else:
            d = p.discord_message(chat.chat_id, user_id, name, text, p.discord_snowflake(increment=n),
                                  guild_id=DISCORD_GUILD)
            self.gateway.dispatch_message(d)
        try:
            reply = self.platforms.wait_for(before + 1, REPLY_TIMEOUT_S)[before]
        except TimeoutError:
            raise RuntimeError(f"no reply in {chat.session_key} within {REPLY_TIMEOUT_S:.0f}s after {name}: {text!r}") from None
        if (reply.prefix, reply.chat_id) != (chat.channel, chat.chat_id):
            raise RuntimeError(f"the reply to {chat.session_key} went to {reply.prefix}/{reply.chat_id}")
        return reply.text

    def _post(self, chat: Chat, body: bytes, headers: dict[str, str]) -> None:
        response = self.http.post(f"{self.url}/webhooks/{chat.channel}", data=body, headers=headers, timeout=10)
        if response.status_code != 200:
            raise RuntimeError(f"ingress answered {response.status_code} for {chat.session_key}: {response.text.strip()}")


def _orders(texts: list[str]) -> set[str]:
    return set(re.findall(r"\b\d{5}\b", " ".join(texts)))


def _checks(replies: dict[str, list[str]], said: dict[str, list[str]]) -> list[tuple[bool, str]]:
    """(passed, description) for every isolation property the script demonstrates."""
    ana, bruno, chen = replies["ana"], replies["bruno"], replies["chen"]
    new_at = said["chen"].index("/new")
    checks = [
        (any("77120" in r for r in bruno), "Bruno (WhatsApp DM) is told about his own order 77120"),
        (not any("48213" in r or "Ana" in r for r in bruno), "Bruno's replies never mention Ana or her order 48213"),
        (any("48213" in r for r in ana), "Ana (WhatsApp DM) is told about her own order 48213"),
        (not any("77120" in r for r in ana), "Ana's replies never mention Bruno's order 77120"),
        (any("Chen" in r for r in chen[:new_at]), "before /new, the Agent remembers Chen's name"),
        ("Started a new conversation" in chen[new_at], "/new starts a new conversation (generation 2)"),
        (not any("Chen" in r for r in chen[new_at + 1:]), "after /new, the Agent no longer knows Chen's name"),
        ("66001" in replies["wa_group"][-1], "WhatsApp group: Diego is told the order Carla gave (shared context)"),
        ("31337" in replies["tg_group"][-1], "Telegram group: Dana is told the order Eli gave (shared context)"),
        ("90412" in replies["discord"][-1], "Discord #support: Farid is told the order Eve gave (shared context)"),
    ]
    leaks = [f"{key}: {sorted(_orders(replies[key]) - _orders(said[key]))}" for key in CHATS
             if _orders(replies[key]) - _orders(said[key])]
    checks.append((not leaks, "every reply mentions only order numbers said in its own session"
                   + (f" (leaked {'; '.join(leaks)})" if leaks else "")))
    return checks


def main(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cli.standins.discord_gateway import StandInGateway
    from cli.standins.platforms import StandInPlatforms

    started = time.monotonic()
    keep = bool(getattr(args, "keep", False))
    platforms = StandInPlatforms().start()
    gateway = StandInGateway(token=SECRETS["ACME_DISCORD_BOT_TOKEN"], heartbeat_interval_ms=5000).start()
    workdir = tempfile.TemporaryDirectory(prefix="chatsessions-demo-")
    public_key = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
    db_url = _environment(Path(workdir.name), keep, platforms.base("").rstrip("/"), gateway.url, public_key)
    running = client = gateway_thread = None
    try:
        from cli import embedded
        from shared.transcripts import format_transcript
        from ingress.discord_gateway import GatewayClient
        from shared.channels.discord import DiscordChannel
        from shared.config import get_settings

        settings = get_settings()
        running = embedded.start(port=0, concurrency=8, beat=False)  # no beat: nothing goes idle in 2 s
        discord = settings.channel("acme-discord")
        client = GatewayClient(discord, DiscordChannel(discord), running.publisher.publish)
        gateway_thread = threading.Thread(target=lambda: asyncio.run(client.run()), name="demo-gateway", daemon=True)
        gateway_thread.start()
        if not gateway.wait_for_client(10):
            raise RuntimeError("the Discord gateway client did not connect to the stand-in gateway within 10s")

        print("chatsessions demo: one Agent (\"demo\") on three platforms, one isolated session per conversation")
        print(f"  ingress {running.url} | database {db_url} | broker in-process (memory://)")
        print(f"  stand-in platform APIs {platforms.base('')} | stand-in Discord gateway {gateway.url}\n")
        print("Conversation, as it happens (each reply is what the stand-in platform received)")
        player = Player(running.url, platforms, gateway)
        replies: dict[str, list[str]] = {key: [] for key in CHATS}
        said: dict[str, list[str]] = {key: [] for key in CHATS}
        for i, (key, member, text) in enumerate(SCRIPT, 1):
            chat = CHATS[key]
            print(f"  {i:2}. {chat.where:36} {chat.members[member][1]}: {text}")
            reply = player.say(chat, member, text)
            print(f"      {'':36} Agent: {reply}")
            replies[key].append(reply)
            said[key].append(text)

        print("\nTranscripts, per session (from the database)")
        for key, chat in CHATS.items():
            print(f"{chat.where}, {' and '.join(name for _, name in chat.members.values())}")
            print(format_transcript(chat.session_key, db_url))
            sent = [s for s in platforms.sent if s.prefix == chat.channel and s.chat_id == chat.chat_id]
            platform = chat.channel.split("-")[1]
            print(f"  => the {platform} stand-in received {len(sent)} replies for chat {chat.chat_id} "
                  f"(to {len(said[key])} messages)\n")
        total = sum(len(v) for v in said.values())
        checks = _checks(replies, said)
        checks.append((len(platforms.sent) == total, f"the platforms received exactly {total} replies, one per message"))

        print("Isolation check")
        for passed, what in checks:
            print(f"  {'PASS' if passed else 'FAIL'}  {what}")
        failed = sum(not ok for ok, _ in checks)
        print(f"\n{'All' if not failed else len(checks) - failed} of {len(checks)} checks passed"
              f"{'' if not failed else f', {failed} FAILED'} in {time.monotonic() - started:.1f}s.")
        if keep:
            print(f"Database kept at {db_url.removeprefix('sqlite:///')}; inspect it with\n"
                  f"  DATABASE_URL={db_url} chatsessions sessions list")
        return 1 if failed else 0
    except RuntimeError as exc:
        print(f"\nchatsessions demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.stop()
        if gateway_thread is not None:
            gateway_thread.join(10)
        if running is not None:
            running.stop()
        gateway.stop()
        platforms.stop()
        workdir.cleanup()
