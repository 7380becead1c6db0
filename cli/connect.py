"""`chatsessions setup <channel-id> --url https://...`: connect a configured channel to its platform. It does what the
platform's API allows (Telegram's webhook, the WhatsApp account's subscription of the app, Discord's commands), reads
back what it can check (whose token it is, what the platform will call), and prints the steps only a person can take,
in order. Safe to run again. docs/connecting.md walks through each platform.

Exit codes: 0 done (the steps left are printed), 1 the platform could not be reached, 2 bad usage or configuration, or
the platform refused: a wrong token or id, an address it does not accept, a setting that disagrees with it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import sys
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from cli.platform_api import PlatformError, call

OK, FAILED, USAGE = 0, 1, 2
TELEGRAM_PORTS = (443, 80, 88, 8443)  # setWebhook: "Ports currently supported for webhooks"
TELEGRAM_UPDATES = ("message",)  # the only update kind shared/channels/telegram.py reads
TELEGRAM_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")  # setWebhook's secret_token: only A-Z, a-z, 0-9, _ and -
MANAGE = "whatsapp_business_management"  # the Graph API permission POST /<WABA-ID>/subscribed_apps needs
MESSAGE_CONTENT_FLAGS = (1 << 18) | (1 << 19)  # application flags GATEWAY_MESSAGE_CONTENT and its _LIMITED form
# The bot's permissions in a server: VIEW_CHANNEL, SEND_MESSAGES, SEND_MESSAGES_IN_THREADS (replies never mention).
DISCORD_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 38)


def endpoint_path(channel: Any) -> str:
    """Where the ingress serves a channel: the path each platform is given (after the public address)."""
    return {"discord": f"/webhooks/{channel.id}/interactions",
            "webchat": f"/chat/{channel.id}"}.get(channel.platform, f"/webhooks/{channel.id}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("channel_id", help="a channel id of the configuration (CHATSESSIONS_CONFIG)")
    p.add_argument("--url", default=os.environ.get("PUBLIC_URL"),
                   help="the ingress's public address, e.g. https://chat.example.com (default: PUBLIC_URL)")
    p.add_argument("--drop-pending-updates", action="store_true",
                   help="Telegram: discard the updates that wait for delivery instead of receiving them")
    p.add_argument("--show-secrets", action="store_true",
                   help="WhatsApp: print the verify token to paste into Meta's dashboard, not only its variable")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request to the platform (default 10)")


class SetupFailed(Exception):
    """A step that cannot go on. The message says why, then what to do; `code` is the exit code."""

    def __init__(self, step: str, message: str, code: int = USAGE):
        super().__init__(message)
        self.step, self.code = step, code


@dataclass
class Setup:
    """One channel being connected: what setup knows, what it printed, and the steps left for a person."""

    settings: Any
    channel: Any
    base: str  # the ingress's public address, without a trailing slash
    args: argparse.Namespace
    todo: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.base + endpoint_path(self.channel)

    @property
    def where(self) -> str:
        return f"in {self.settings.config_path}, channel {self.channel.id!r}"

    def var(self, secret: str) -> str:
        return "$" + self.channel.secret_env.get(secret, f"<secrets.{secret}>")

    def line(self, mark: str, step: str, detail: str) -> None:
        print(f"  {mark:4}  {step:12}  {detail}", flush=True)

    def ok(self, step: str, detail: str) -> None:
        self.line("ok", step, detail)

    def note(self, step: str, detail: str) -> None:
        self.line("note", step, detail)

    def then(self, text: str) -> None:
        self.todo.append(text)

    def api(self, step: str, method: str, url: str, *, shown: str, headers: dict[str, str] | None = None,
            body: Any = None, refused: Callable[[PlatformError], str] = lambda exc: "") -> Any:
        """One platform request; a refusal is SetupFailed (exit 2) with `refused`'s advice, anything else exit 1."""
        try:
            return call(method, url, shown=shown, headers=headers, body=body, timeout=self.args.timeout)
        except PlatformError as exc:
            if exc.refused:
                advice = refused(exc)
                raise SetupFailed(step, f"refused: {exc}" + (f"\n{advice}" if advice else "")) from None
            raise SetupFailed(step, f"{exc}: the platform could not be reached or failed; try again", FAILED) from None


def public_base(raw: str | None) -> str:
    """The --url, checked: an http(s) address with a host and perhaps a path prefix, nothing else."""
    text = (raw or "").strip()
    if not text:
        raise SetupFailed("url", "setup needs the ingress's public address, where the platform will call it: "
                                 "--url https://chat.example.com (or PUBLIC_URL)")
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        parts = parts._replace(scheme="")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment or parts.username:
        raise SetupFailed("url", f"--url {text!r} is not an address such as https://chat.example.com "
                                 "(scheme, host, perhaps a port and a path prefix)")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _reachable_https(setup: Setup, platform: str) -> None:
    """The platforms call webhooks over https, from the internet: not this machine's or a private address."""
    parts = urlsplit(setup.base)
    if parts.scheme != "https":
        raise SetupFailed("url", f"{platform} calls only https:// addresses, not {setup.base}.\nPut the ingress behind "
                                 "a reverse proxy that terminates TLS (Caddy, nginx) or a tunnel that gives it an "
                                 "https:// address, and pass that address as --url.")
    host = parts.hostname or ""
    try:
        private = not ipaddress.ip_address(host).is_global
    except ValueError:
        private = host == "localhost" or host.endswith(".localhost")
    if private:
        raise SetupFailed("url", f"{platform} cannot reach {host}: --url must be the address the internet reaches the "
                                 "ingress at (a public name, or a tunnel's address).")


def _start_ingress(setup: Setup) -> None:
    how = ("`chatsessions run`" if setup.settings.embedded
           else "the ingress, workers and beat (Procfile, or deploy/)")
    setup.then(f"Start {how} with CHATSESSIONS_CONFIG={setup.settings.config_path}, reachable at {setup.base} "
               "(the proxy or tunnel forwards there to the ingress's port).")


# --------------------------------------------------------------------------------------------------------------------
# Telegram


def fill_option(path: Path, channel_id: str, key: str, value: str) -> bool:
    """Write `key = "value"` over the empty `key = ""` of one channel in the TOML file, keeping every other byte
    (comments, layout). False when that channel has no such empty value, or the file cannot be written."""
    try:
        text = path.read_text()
    except OSError:
        return False
    blocks = re.split(r"(?m)^(?=\[\[)", text)
    for i, block in enumerate(blocks):
        if not block.startswith("[[channels]]") or not re.search(
                rf'(?m)^\s*id\s*=\s*"{re.escape(channel_id)}"', block):
            continue
        blocks[i], found = re.subn(rf'(\b{re.escape(key)}\s*=\s*)""', lambda m: m.group(1) + json.dumps(value),
                                   block, count=1)
        candidate = "".join(blocks)
        try:
            doc = tomllib.loads(candidate)
        except tomllib.TOMLDecodeError:
            return False
        mine = [c for c in doc.get("channels", []) if c.get("id") == channel_id]
        if not found or len(mine) != 1 or mine[0].get("options", {}).get(key) != value:
            return False
        spare = path.with_name(f".{path.name}.setup")
        try:
            spare.write_text(candidate)
            shutil.copymode(path, spare)
            os.replace(spare, path)
        except OSError:
            spare.unlink(missing_ok=True)
            return False
        return True
    return False


def telegram_secret_problem(channel: Any) -> str | None:
    """Why Telegram's setWebhook would refuse the channel's secret token (never quoting it); None if it would not.
    A token it refuses can never be set, so the ingress would never get an update (`check` says it too)."""
    if channel.platform != "telegram" or TELEGRAM_SECRET.fullmatch(channel.secrets["secret_token"]):
        return None
    return (f"${channel.secret_env.get('secret_token', 'secrets.secret_token')} must be 1-256 characters of A-Z, a-z, "
            "0-9, _ and - (Telegram's setWebhook refuses others), e.g. python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'")


def _telegram_refused(setup: Setup) -> Callable[[PlatformError], str]:
    token = setup.var("bot_token")

    def advice(exc: PlatformError) -> str:
        if exc.status == 401:
            return (f"Telegram knows no bot with the token in {token}: copy your bot's token from @BotFather "
                    "(/mybots → your bot → API Token); a revoked token stops working.")
        if exc.status == 404:
            return f"The token in {token} is malformed: a bot token looks like 123456789:AAH... (from @BotFather)."
        if "bad webhook" in exc.words:
            return (f"Telegram does not accept {setup.url} as a webhook: --url must be the ingress's public address "
                    "(a name the internet resolves, https, port 443, 80, 88 or 8443).")
        if "secret token" in exc.words:
            return f"{setup.var('secret_token')} may hold only 1-256 characters of A-Z a-z 0-9 _ -."
        return ""

    return advice


def _bot_username(setup: Setup, username: str) -> None:
    """options.bot_username is how the parser knows /new@bot and @mentions are for us: empty, fill it in; set, it
    must be the token's bot."""
    configured = str(setup.channel.options.get("bot_username", "")).lstrip("@")
    line = f'bot_username = "{username}"'
    if configured.lower() == username.lower():
        setup.ok("bot_username", f"options.bot_username is @{username}")
    elif configured:
        raise SetupFailed("bot_username", f"the token belongs to @{username}, but options.bot_username is "
                                          f"{configured!r}: /new@{username} and @{username} would not be recognized "
                                          f"as addressed to the bot.\nSet {line} {setup.where} (or put @{configured}'s "
                                          f"token in {setup.var('bot_token')}).")
    elif fill_option(setup.settings.config_path, setup.channel.id, "bot_username", username):
        setup.ok("bot_username", f"wrote {line} {setup.where} (it was empty; a running ingress reads it when "
                                 "restarted)")
    else:
        setup.note("bot_username", "options.bot_username is empty and the file could not be updated")
        setup.then(f"Set {line} {setup.where}: how the bot knows /new@{username} and @{username} are for it.")


def _privacy(setup: Setup, me: dict[str, Any]) -> None:
    """Group privacy (BotFather /setprivacy): on, Telegram delivers to the bot in groups only commands and replies to
    its messages (all messages where it is an admin); what that means depends on session.group_reply."""
    if me.get("can_join_groups") is False:
        setup.note("groups", "the bot cannot be added to groups (@BotFather: /setjoingroups); direct messages work")
        return
    reply = setup.channel.session.group_reply
    if me.get("can_read_all_group_messages") is True:
        setup.ok("groups", f'privacy mode is off: the bot gets every group message (group_reply = "{reply}")')
        return
    if reply == "always":
        setup.note("groups", 'privacy mode is on, yet group_reply = "always" means answering every group message: '
                             "Telegram delivers only commands and replies to the bot")
    else:
        setup.note("groups", "privacy mode is on: in groups Telegram delivers only commands and replies to the bot, "
                             "so @mentions go unanswered and the group's conversation is missing from the context")
    setup.then(f"For groups: in @BotFather send /setprivacy, choose @{me.get('username')}, then Disable (or make the "
               "bot an admin of the group); remove and add the bot again in groups it is already in.")


def telegram(setup: Setup) -> None:
    """getMe (the token's bot; fills bot_username), setWebhook (URL, secret token, the updates the parser reads),
    getWebhookInfo (what Telegram will do: pending updates, its last delivery error), privacy advice for groups."""
    _reachable_https(setup, "Telegram")
    port = urlsplit(setup.base).port or 443
    if port not in TELEGRAM_PORTS:
        raise SetupFailed("url", f"Telegram calls webhooks only on ports 443, 80, 88 and 8443, not {port}: have the "
                                 "proxy listen on 443 (it may forward to the ingress on any port).")
    if problem := telegram_secret_problem(setup.channel):
        raise SetupFailed("secret", problem)
    api = f"{setup.channel.api_base}/bot{setup.channel.secrets['bot_token']}"
    shown = f"{setup.channel.api_base}/bot<token>"  # the token is part of the URL: never shown
    refused = _telegram_refused(setup)

    def bot_api(step: str, method: str, body: dict[str, Any] | None = None) -> Any:
        doc = setup.api(step, "POST", f"{api}/{method}", shown=f"{shown}/{method}", body=body, refused=refused)
        if not isinstance(doc, dict) or doc.get("ok") is not True or "result" not in doc:
            raise SetupFailed(step, f"Telegram's {method} did not answer ok: {str(doc)[:200]}", FAILED)
        return doc

    me = bot_api("token", "getMe")["result"]
    username = str(me.get("username", ""))
    setup.ok("token", f"bot @{username} (id {me.get('id')}) holds the token in {setup.var('bot_token')}")
    _bot_username(setup, username)
    body: dict[str, Any] = {"url": setup.url, "secret_token": setup.channel.secrets["secret_token"],
                            "allowed_updates": list(TELEGRAM_UPDATES)}
    if setup.args.drop_pending_updates:
        body["drop_pending_updates"] = True
    done = bot_api("setWebhook", "setWebhook", body)
    setup.ok("setWebhook", f"{done.get('description') or 'webhook set'}: {setup.url}, updates "
                           f"{', '.join(TELEGRAM_UPDATES)}, secret token {setup.var('secret_token')}"
             + ("; pending updates dropped" if setup.args.drop_pending_updates else ""))
    info = bot_api("webhook", "getWebhookInfo")["result"]
    if info.get("url") != setup.url:
        raise SetupFailed("webhook", f"Telegram now sends updates to {info.get('url') or 'nowhere'}, not {setup.url}: "
                                     "something else set the webhook meanwhile (another deployment with this bot's "
                                     "token?). Only one address can receive a bot's updates.", FAILED)
    setup.ok("webhook", f"Telegram confirms {info['url']}; {info.get('pending_update_count', 0)} update(s) waiting "
                        "for delivery")
    if info.get("last_error_date"):
        when = datetime.fromtimestamp(int(info["last_error_date"]), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        setup.note("last error", f"{when}: {info.get('last_error_message', '?')} (Telegram's last failed delivery, "
                                 "perhaps before this setup; it retries)")
    _privacy(setup, me)
    setup.then(f"Write to the bot: https://t.me/{username}. Running this setup again shows what Telegram sees "
               "(updates waiting, its last delivery error).")


# --------------------------------------------------------------------------------------------------------------------
# WhatsApp


def _graph_refused(setup: Setup, number: str) -> Callable[[PlatformError], str]:
    token = setup.var("access_token")

    def advice(exc: PlatformError) -> str:
        if exc.code == 190:
            return (f"Meta refused the access token in {token}. A temporary token (API Setup) expires after 24 hours: "
                    "create a lasting one for a system user (Business settings → Users → System users → Generate "
                    f"token) with whatsapp_business_messaging and {MANAGE}.")
        if exc.code == 100:
            return (f"Meta knows no phone number id {number} for this token: copy the Phone number ID (your app → "
                    f"WhatsApp → API Setup; the id, not the number) into options.phone_number_id {setup.where}, and "
                    "give the token's system user the WhatsApp account (Business settings → System users → Assign "
                    "assets).")
        return ""

    return advice


def _business_account(setup: Setup, graph: str, auth: dict[str, str]) -> str | None:
    """options.business_account_id, or the one WhatsApp Business Account the token may manage (debug_token's
    granular scopes); None, with the step to take, when neither says."""
    configured = str(setup.channel.options.get("business_account_id") or "").strip()
    if configured:
        return configured
    try:
        doc = call("GET", f"{graph}/debug_token?input_token={setup.channel.secrets['access_token']}", headers=auth,
                   shown=f"{graph}/debug_token", timeout=setup.args.timeout)
    except PlatformError as exc:
        doc = {}
        setup.note("account", f"could not read the token's grants: {exc}")
    scopes = (doc.get("data") or {}).get("granular_scopes") or [] if isinstance(doc, dict) else []
    accounts = next((s.get("target_ids") for s in scopes if isinstance(s, dict) and s.get("scope") == MANAGE), None)
    if accounts and len(accounts) == 1:
        setup.ok("account", f"WhatsApp Business Account {accounts[0]} (the one the token may manage)")
        return str(accounts[0])
    if accounts:
        setup.note("account", f"the token manages {len(accounts)} WhatsApp Business Accounts: {', '.join(accounts)}")
    else:
        setup.note("account", f"the token names no WhatsApp Business Account it may manage ({MANAGE})")
    setup.then(f"Set options.business_account_id {setup.where} to the WhatsApp Business Account ID (your app → "
               "WhatsApp → API Setup) and run this setup again, so it can subscribe the app to the account.")
    return None


def _subscribe(setup: Setup, graph: str, auth: dict[str, str], account: str, number: str) -> None:
    """POST /<WABA-ID>/subscribed_apps: the app receives the account's webhooks. The webhook fields (`messages`) are
    the app's own setting, made in the dashboard with the callback URL."""
    try:
        call("POST", f"{graph}/{account}/subscribed_apps", headers=auth, shown=f"{graph}/{account}/subscribed_apps",
             timeout=setup.args.timeout)
    except PlatformError as exc:
        if exc.status == 403 or exc.code == 10 or (isinstance(exc.code, int) and 200 <= exc.code <= 299):
            setup.note("subscribe", f"the token may not subscribe the app ({exc.words or exc})")
            setup.then(f"Subscribe the app to WhatsApp Business Account {account}: generate the system user's token "
                       f"with {MANAGE} and run this setup again, or send POST /{account}/subscribed_apps from the "
                       "Graph API Explorer with such a token.")
            return
        if exc.refused:
            raise SetupFailed("subscribe", f"refused: {exc}\nIs {account} the WhatsApp Business Account of phone "
                                           f"number id {number}? (options.business_account_id {setup.where})") from None
        raise SetupFailed("subscribe", f"{exc}: the platform could not be reached or failed; try again",
                          FAILED) from None
    apps = setup.api("subscribe", "GET", f"{graph}/{account}/subscribed_apps", headers=auth,
                     shown=f"{graph}/{account}/subscribed_apps").get("data") or []
    names = [str((a.get("whatsapp_business_api_data") or {}).get("name", "?")) for a in apps if isinstance(a, dict)]
    setup.ok("subscribe", f"account {account} sends its webhooks to: {', '.join(names) or 'no app (yet)'}")


def whatsapp(setup: Setup) -> None:
    """Checks the access token and phone number id (Graph API), subscribes the app to the WhatsApp Business Account
    where the token may, and prints the callback URL and verify token to paste into the app's dashboard."""
    _reachable_https(setup, "Meta")
    number = str(setup.channel.options.get("phone_number_id") or "").strip()
    if not number:
        raise SetupFailed("number", f"options.phone_number_id is empty {setup.where}: copy the Phone number ID from "
                                    "your app → WhatsApp → API Setup (the id, not the phone number).")
    graph = f"{setup.channel.api_base}/{setup.channel.options.get('api_version', 'v21.0')}"
    auth = {"Authorization": f"Bearer {setup.channel.secrets['access_token']}"}
    doc = setup.api("number", "GET", f"{graph}/{number}?fields=display_phone_number,verified_name", headers=auth,
                    shown=f"{graph}/{number}", refused=_graph_refused(setup, number))
    display = str(doc.get("display_phone_number") or number)
    setup.ok("number", f"{display}" + (f" ({doc['verified_name']})" if doc.get("verified_name") else "")
             + f": the token in {setup.var('access_token')} may use phone number id {number}")
    account = _business_account(setup, graph, auth)
    if account:
        _subscribe(setup, graph, auth, account, number)
    verify = (f"{setup.channel.secrets['verify_token']} (from {setup.var('verify_token')})" if setup.args.show_secrets
              else f"the value of {setup.var('verify_token')} (or run setup with --show-secrets to print it)")
    setup.then(f"In your Meta app: WhatsApp → Configuration → Webhook → Edit. Callback URL: {setup.url} — Verify "
               f"token: {verify}. Then Verify and save: Meta calls the ingress right then, so it must be running.")
    setup.then("On the same page, Webhook fields: subscribe to messages (what chatsessions reads). The ingress checks "
               f"every webhook's signature with {setup.var('app_secret')}, the App secret of this app (App settings → "
               "Basic): with another one it refuses them all (401).")
    setup.then(f"Write to {display} from WhatsApp.")


# --------------------------------------------------------------------------------------------------------------------
# Discord


def _intents(channel: Any) -> list[str]:
    """The gateway intents ingress/discord_gateway.py asks for this channel, by name."""
    from ingress import discord_gateway as g

    wanted = g.intents(channel)
    names = {g.GUILDS: "GUILDS", g.GUILD_MESSAGES: "GUILD_MESSAGES", g.DIRECT_MESSAGES: "DIRECT_MESSAGES",
             g.MESSAGE_CONTENT: "MESSAGE_CONTENT"}
    return [name for bit, name in sorted(names.items()) if wanted & bit]


def discord(setup: Setup) -> None:
    """Checks the bot token (/users/@me) and the application (its id and public key against the config), registers
    the /new and /ask commands, and prints the interactions endpoint, the intents and the invite link."""
    from shared.channels.discord import APPLICATION_COMMANDS

    _reachable_https(setup, "Discord")
    api, token = setup.channel.api_base, setup.var("bot_token")
    auth = {"Authorization": f"Bot {setup.channel.secrets['bot_token']}"}

    def refused(exc: PlatformError) -> str:
        if exc.status == 401:
            return (f"Discord refused the bot token in {token}: copy it from the Developer Portal → your application "
                    "→ Bot → Reset Token (resetting makes the old one stop working).")
        return ""

    user = setup.api("token", "GET", f"{api}/users/@me", headers=auth, shown=f"{api}/users/@me", refused=refused)
    setup.ok("token", f"bot {user.get('username')} (id {user.get('id')}) holds the token in {token}")
    app = setup.api("application", "GET", f"{api}/applications/@me", headers=auth, shown=f"{api}/applications/@me",
                    refused=refused)
    app_id = str(app.get("id"))
    configured = str(setup.channel.options.get("application_id") or "")
    if configured and configured != app_id:
        raise SetupFailed("application", f"the bot belongs to application {app_id}, but options.application_id is "
                                         f"{configured}.\nSet application_id = \"{app_id}\" {setup.where}.")
    key = str(app.get("verify_key") or "")
    if key.lower() != setup.channel.secrets["public_key"].lower():
        raise SetupFailed("public key", f"{setup.var('public_key')} is not this application's public key, so the "
                                        "ingress would refuse every interaction.\nCopy the Public Key from the "
                                        f"Developer Portal → General Information: {key}")
    setup.ok("application", f"{app.get('name')} (id {app_id}); {setup.var('public_key')} is its public key")
    commands = setup.api("commands", "PUT", f"{api}/applications/{app_id}/commands", headers=auth,
                         shown=f"{api}/applications/{app_id}/commands", body=list(APPLICATION_COMMANDS),
                         refused=refused)
    setup.ok("commands", "registered " + ", ".join(f"/{c.get('name')}" for c in commands)
             + " (global commands: every server with the bot, and DMs)")
    if app.get("interactions_endpoint_url") == setup.url:
        setup.ok("interactions", f"Discord sends interactions to {setup.url}")
    else:
        now = app.get("interactions_endpoint_url")
        setup.note("interactions", f"Discord sends interactions to {now}" if now else "no interactions endpoint yet")
    intents = _intents(setup.channel)
    if int(app.get("flags") or 0) & MESSAGE_CONTENT_FLAGS:
        setup.ok("intents", f"the gateway asks for {', '.join(intents)}; the Message Content intent is on")
    else:
        setup.note("intents", f"the gateway asks for {', '.join(intents)}, but the Message Content intent is off")
    if app.get("interactions_endpoint_url") != setup.url:
        setup.then(f"Developer Portal → your application → General Information → Interactions Endpoint URL: "
                   f"{setup.url}, then Save Changes: Discord calls it right then, so the ingress must be running.")
    if not int(app.get("flags") or 0) & MESSAGE_CONTENT_FLAGS:
        setup.then("Developer Portal → Bot → Privileged Gateway Intents: turn on Message Content Intent (without it "
                   "Discord closes the gateway connection with 4014).")
    setup.then(f"Add the bot to a server: https://discord.com/oauth2/authorize?client_id={app_id}"
               f"&scope=bot+applications.commands&permissions={DISCORD_PERMISSIONS}")
    gateway = f"`chatsessions gateway {setup.channel.id}` (one per bot), next to the ingress and workers"
    setup.then(f"Messages in channels and DMs arrive over the gateway: run {gateway}"
               + (" — with BROKER_URL=redis://..., as `chatsessions run` alone answers only /new and /ask."
                  if setup.settings.embedded else "."))


# --------------------------------------------------------------------------------------------------------------------
# Web chat


def webchat(setup: Setup) -> None:
    """The ingress serves the page itself: only its address to give out."""
    setup.ok("page", setup.url)
    if setup.base.startswith("http://") and setup.settings.secure_cookies:
        setup.note("cookies", "the visitor cookie is Secure (SECURE_COOKIES): browsers keep it only over https; "
                              "serve the page over https, or set SECURE_COOKIES=false on your own machine")
    setup.then(f"Open {setup.url}. To show it on your site in an iframe, list the site in options.frame_ancestors "
               f"{setup.where} (e.g. [\"'self'\", \"https://www.example.com\"]).")


PLATFORMS: dict[str, Callable[[Setup], None]] = {"telegram": telegram, "whatsapp": whatsapp, "discord": discord,
                                                 "webchat": webchat}


def main(args: argparse.Namespace) -> int:
    from shared.channels import build_channel
    from shared.config import load_settings
    from shared.errors import UnknownChannel

    settings = load_settings()  # a ConfigError is exit 2 with its message (cli/main.py)
    try:
        channel = settings.channel(args.channel_id)
    except UnknownChannel:
        print(f"chatsessions: no channel {args.channel_id!r} in {settings.config_path} (channels: "
              f"{', '.join(settings.channels)})", file=sys.stderr)
        return USAGE
    build_channel(channel)  # the adapter checks its options and keys
    try:
        setup = Setup(settings, channel, public_base(args.url), args)
        print(f"{channel.platform} channel {channel.id!r} → {setup.url}")
        _start_ingress(setup)  # the first step left, whatever the platform
        PLATFORMS[channel.platform](setup)
    except SetupFailed as exc:
        reason, _, advice = str(exc).partition("\n")
        print(f"  FAIL  {exc.step:12}  {reason}", flush=True)
        for line in advice.splitlines():
            print(f"        {line}")
        return exc.code
    print("Next:" if setup.todo else "Nothing left to do.")
    for n, text in enumerate(setup.todo, 1):
        print(f"  {n}. {text}")
    return OK
