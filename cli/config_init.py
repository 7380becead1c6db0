"""`chatsessions config init --platform telegram [--platform ...]`: write a commented channels file, one channel per
platform asked for. Secrets are never in it: each is named by an environment variable, and the command prints them
with where their values come from. Once they are set, `chatsessions check` accepts the file, and
`chatsessions setup <id> --url https://...` connects each channel (docs/connecting.md).
"""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

OK, USAGE = 0, 2


@dataclass(frozen=True)
class Secret:
    var: str  # the environment variable the file names
    source: str  # where its value comes from
    generated: bool = False  # a value of our choosing: one is made up and printed


# Per platform: its [[channels]] table ({agent} filled in) and the variables it names, in order.
CHANNELS: dict[str, tuple[str, tuple[Secret, ...]]] = {
    "telegram": ('''
[[channels]]
id = "telegram"              # in the webhook address (/webhooks/telegram) and in session keys
platform = "telegram"
agent = {agent}
# bot_token: what @BotFather gives for your bot. secret_token: any 1-256 characters of A-Z a-z 0-9 _ - ; Telegram
# sends it with every update, and the ingress refuses updates without it.
secrets = {{ bot_token = "TELEGRAM_BOT_TOKEN", secret_token = "TELEGRAM_SECRET_TOKEN" }}
# The bot's username, how /new@bot and @mentions in groups are recognized: `chatsessions setup telegram` fills it in.
options = {{ bot_username = "" }}
# In groups: answer only messages addressed to the bot ("mentioned": @mention, reply, command) or all ("always").
session = {{ group_reply = "mentioned" }}
''', (Secret("TELEGRAM_BOT_TOKEN", "from @BotFather: /newbot (or /mybots → your bot → API Token)"),
      Secret("TELEGRAM_SECRET_TOKEN", "any 1-256 characters of A-Z a-z 0-9 _ -", generated=True))),
    "whatsapp": ('''
[[channels]]
id = "whatsapp"              # in the webhook address (/webhooks/whatsapp) and in session keys
platform = "whatsapp"
agent = {agent}
# From your Meta app (developers.facebook.com/apps). app_secret: App settings → Basic → App secret (the ingress checks
# each webhook's signature with it). verify_token: any text you choose, pasted into the app's webhook settings.
# access_token: a system user's token with whatsapp_business_messaging, and whatsapp_business_management so that
# `chatsessions setup whatsapp` can subscribe the app to your WhatsApp Business Account.
secrets = {{ app_secret = "WHATSAPP_APP_SECRET", verify_token = "WHATSAPP_VERIFY_TOKEN", access_token = "WHATSAPP_ACCESS_TOKEN" }}
# Your app → WhatsApp → API Setup shows both ids (the phone number's id, not the number). business_account_id may
# stay empty when the token may manage a single WhatsApp Business Account.
options = {{ phone_number_id = "", business_account_id = "", api_version = "v21.0" }}
# WhatsApp's group webhook carries no mention list: in groups, answer every message.
session = {{ group_reply = "always" }}
''', (Secret("WHATSAPP_APP_SECRET", "your Meta app → App settings → Basic → App secret"),
      Secret("WHATSAPP_VERIFY_TOKEN", "any text you choose; you paste it into the app's webhook settings",
             generated=True),
      Secret("WHATSAPP_ACCESS_TOKEN", "Business settings → Users → System users → Generate token"))),
    "discord": ('''
[[channels]]
id = "discord"               # interactions at /webhooks/discord/interactions; in session keys
platform = "discord"
agent = {agent}
# From the Developer Portal (discord.com/developers/applications), your application. bot_token: Bot → Reset Token.
# public_key: General Information → Public Key (hex; the ingress checks each interaction's signature with it).
secrets = {{ bot_token = "DISCORD_BOT_TOKEN", public_key = "DISCORD_PUBLIC_KEY" }}
# options = {{ application_id = "..." }}   # optional: `chatsessions setup discord` reads it from Discord
''', (Secret("DISCORD_BOT_TOKEN", "Developer Portal → your application → Bot → Reset Token"),
      Secret("DISCORD_PUBLIC_KEY", "Developer Portal → your application → General Information → Public Key"))),
    "webchat": ('''
[[channels]]
id = "webchat"               # the page is at /chat/webchat
platform = "webchat"
agent = {agent}
# Also max_chars, messages_per_minute and frame_ancestors (who may show the page in an iframe): see the README.
options = {{ title = "Chat with us" }}
''', ()),
}

HEADER = """\
# chatsessions channels, written by `chatsessions config init` ({platforms}).
# Secrets are never in this file: each names the environment variable that holds it.
# `chatsessions check` validates the file; `chatsessions setup <id> --url https://...` connects a channel
# (docs/connecting.md). The agent is echo, demo, openai or package.module:Attribute (README, Writing an Agent).

# partitions = 16         # partition queues: the ingress and every worker must agree
# lease_seconds = 120     # how long a turn may hold its session before another worker may take over
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--platform", action="append", required=True, choices=list(CHANNELS), dest="platforms",
                   help="a platform to write a channel for; repeat for several")
    p.add_argument("--out", default="channels.toml", help="the file to write (default channels.toml)")
    p.add_argument("--agent", default="demo", help="the Agent of every channel (default demo)")
    p.add_argument("--force", action="store_true", help="overwrite the file if it exists")


def render(platforms: list[str], agent: str) -> str:
    """The file's text: the header, then one [[channels]] table per platform in the order asked."""
    return HEADER.format(platforms=", ".join(platforms)) + "".join(
        CHANNELS[p][0].format(agent=json.dumps(agent)) for p in platforms)


def main(args: argparse.Namespace) -> int:
    platforms = list(dict.fromkeys(args.platforms))
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"chatsessions: {out} exists; --force replaces it (its channels would be lost)", file=sys.stderr)
        return USAGE
    out.write_text(render(platforms, args.agent))
    print(f"wrote {out}: channel{'s' if len(platforms) > 1 else ''} {', '.join(platforms)}")
    names = [s for p in platforms for s in CHANNELS[p][1]]
    lines = [(f"CHATSESSIONS_CONFIG={shlex.quote(str(out.resolve()))}", "this file")] + [
        (f"{s.var}={secrets.token_urlsafe(32) if s.generated else '...'}",
         f"made up now: {s.source}" if s.generated else s.source) for s in names]
    width = max(len(assignment) for assignment, _ in lines)
    print("Set the environment variables it names (their values never go into the file), e.g.:")
    for assignment, source in lines:
        print(f"  export {assignment:{width}}  # {source}")
    print("Then: chatsessions check")
    for p in platforms:
        print(f"      chatsessions setup {p} --url https://<the ingress's public address>")
    return OK
