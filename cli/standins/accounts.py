"""The platforms' account and setup endpoints, for the stand-in (cli/standins/platforms.py): who a token belongs to,
where Telegram sends updates, which app a WhatsApp account's webhooks go to, a Discord application and its commands.

Answers and refusals have the real APIs' shapes and texts, so `chatsessions setup` runs its real paths in tests.
Register an account first (`telegram_bot`, `whatsapp_number`, `discord_app`); a token nobody registered is refused
the way the platform refuses it. Routes, after the stand-in's prefix:
  GET|POST /bot{token}/getMe | setWebhook | getWebhookInfo      Telegram Bot API (parameters as JSON or query)
  GET  /{version}/{phone_number_id}?fields=...                   Graph API: the business phone number
  GET  /{version}/debug_token?input_token=...                    Graph API: the token's granted scopes
  GET|POST /{version}/{waba_id}/subscribed_apps                  Graph API: the app subscribed to the account
  GET  /users/@me, GET /applications/@me                         Discord: the bot user, its application
  PUT  /applications/{application_id}/commands                   Discord: bulk-overwrite the global commands
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

Answer = tuple[int, Any]

TELEGRAM_WEBHOOK_PORTS = (443, 80, 88, 8443)
TELEGRAM_TOKEN = re.compile(r"[0-9]+:[A-Za-z0-9_-]+")
TELEGRAM_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")
UNRESOLVABLE = ".invalid"  # RFC 2606: a name that never resolves stands for a host Telegram cannot find
GRAPH_TRACE = "AStandInTraceId"
MANAGE = "whatsapp_business_management"
MESSAGING = "whatsapp_business_messaging"
COMMAND_NAME = re.compile(r"[-_a-z0-9]{1,32}")
OPTION_TYPES = range(1, 12)  # SUB_COMMAND .. ATTACHMENT

_routes = [
    ("telegram", re.compile(r"^/[^/]+/bot(?P<token>[^/]+)/(?P<method>getMe|setWebhook|getWebhookInfo)$")),
    ("debug_token", re.compile(r"^/[^/]+/v[\d.]+/debug_token$")),
    ("subscribed_apps", re.compile(r"^/[^/]+/v[\d.]+/(?P<waba>[^/]+)/subscribed_apps$")),
    ("phone_number", re.compile(r"^/[^/]+/v[\d.]+/(?P<node>[0-9]+)$")),
    ("discord_user", re.compile(r"^/[^/]+/users/@me$")),
    ("discord_application", re.compile(r"^/[^/]+/(oauth2/)?applications/@me$")),
    ("discord_commands", re.compile(r"^/[^/]+/applications/(?P<app>[^/]+)/commands$")),
]


@dataclass
class TelegramBot:
    token: str
    username: str
    can_read_all_group_messages: bool = False  # privacy mode off (BotFather /setprivacy)
    can_join_groups: bool = True
    pending_update_count: int = 0
    last_error_date: int | None = None
    last_error_message: str | None = None
    webhook: dict[str, Any] = field(default_factory=dict)  # the parameters of the webhook in force ({}: none)


@dataclass
class WhatsAppNumber:
    token: str
    phone_number_id: str
    business_account_id: str
    display_phone_number: str = "+1 555-010-0100"
    verified_name: str = "Acme Support"
    app_id: str = "880000000000001"
    app_name: str = "Acme chatsessions"
    can_manage: bool = True  # the token was granted whatsapp_business_management on the account
    subscribed: bool = False  # the app receives the account's webhooks (POST subscribed_apps)


@dataclass
class DiscordApp:
    token: str
    application_id: str
    bot_username: str
    public_key: str  # hex; Discord's verify_key
    flags: int = 1 << 19  # GATEWAY_MESSAGE_CONTENT_LIMITED: the Message Content intent is on
    interactions_endpoint_url: str | None = None
    commands: list[dict[str, Any]] = field(default_factory=list)


def _telegram_error(status: int, description: str) -> Answer:
    return status, {"ok": False, "error_code": status, "description": description}


def _graph_error(status: int, code: int, message: str, kind: str = "OAuthException", **extra: Any) -> Answer:
    return status, {"error": {"message": message, "type": kind, "code": code, **extra, "fbtrace_id": GRAPH_TRACE}}


def _unsupported(method: str, node: str) -> Answer:
    return _graph_error(400, 100, f"Unsupported {method.lower()} request. Object with ID '{node}' does not exist, "
                                  "cannot be loaded due to missing permissions, or does not support this operation. "
                                  "Please read the Graph API documentation at https://developers.facebook.com/docs/"
                                  "graph-api", "GraphMethodException", error_subcode=33)


def _form_error(index: int, key: str, code: str, message: str) -> Answer:
    return 400, {"code": 50035, "errors": {str(index): {key: {"_errors": [{"code": code, "message": message}]}}},
                 "message": "Invalid Form Body"}


class Accounts:
    """The registered accounts and the answers of their endpoints; StandInPlatforms asks `answer` first."""

    def __init__(self) -> None:
        self.telegram: dict[str, TelegramBot] = {}
        self.whatsapp: dict[str, WhatsAppNumber] = {}  # by phone_number_id
        self.discord: dict[str, DiscordApp] = {}  # by bot token
        self._ids = itertools.count(1)

    def telegram_bot(self, token: str, username: str, **state: Any) -> TelegramBot:
        self.telegram[token] = bot = TelegramBot(token, username, **state)
        return bot

    def whatsapp_number(self, token: str, phone_number_id: str, business_account_id: str,
                        **state: Any) -> WhatsAppNumber:
        self.whatsapp[phone_number_id] = number = WhatsAppNumber(token, phone_number_id, business_account_id, **state)
        return number

    def discord_app(self, token: str, application_id: str, bot_username: str, public_key: str,
                    **state: Any) -> DiscordApp:
        self.discord[token] = app = DiscordApp(token, application_id, bot_username, public_key, **state)
        return app

    def answer(self, method: str, target: str, headers: dict[str, str], raw: bytes) -> Answer | None:
        """The platform's answer to an account request; None when `target` is not one (a send route)."""
        parts = urlsplit(target)
        for name, pattern in _routes:
            if m := pattern.match(parts.path):
                break
        else:
            return None
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            body = None
        handler = getattr(self, f"_{name}")
        return handler(method, m, query, {k.lower(): v for k, v in headers.items()}, body)

    # -- Telegram ----------------------------------------------------------------------------------------------------

    def _telegram(self, method: str, m: re.Match[str], query: dict[str, str], headers: dict[str, str],
                  body: Any) -> Answer:
        token = m.group("token")
        if not TELEGRAM_TOKEN.fullmatch(token):
            return _telegram_error(404, "Not Found")
        bot = self.telegram.get(token)
        if bot is None:
            return _telegram_error(401, "Unauthorized")
        params = {**query, **(body if isinstance(body, dict) else {})}
        return getattr(self, f"_tg_{m.group('method')}")(bot, params)

    def _tg_getMe(self, bot: TelegramBot, params: dict[str, Any]) -> Answer:
        return 200, {"ok": True, "result": {
            "id": int(bot.token.partition(":")[0]), "is_bot": True, "first_name": bot.username.removesuffix("Bot"),
            "username": bot.username, "can_join_groups": bot.can_join_groups,
            "can_read_all_group_messages": bot.can_read_all_group_messages, "supports_inline_queries": False,
            "can_connect_to_business": False, "has_main_web_app": False}}

    def _tg_setWebhook(self, bot: TelegramBot, params: dict[str, Any]) -> Answer:
        url = str(params.get("url", ""))
        if not url:
            had, bot.webhook = bool(bot.webhook), {}
            return 200, {"ok": True, "result": True,
                         "description": "Webhook was deleted" if had else "Webhook is already deleted"}
        parts = urlsplit(url)
        if parts.scheme != "https":
            return _telegram_error(400, "Bad Request: bad webhook: An HTTPS URL must be provided for webhook")
        try:
            port = parts.port or 443
        except ValueError:
            port = -1
        if port not in TELEGRAM_WEBHOOK_PORTS:
            return _telegram_error(400, "Bad Request: bad webhook: Webhook can be set up only on ports 80, 88, 443 "
                                        "or 8443")
        if not parts.hostname or parts.hostname.endswith(UNRESOLVABLE):
            return _telegram_error(400, "Bad Request: bad webhook: Failed to resolve host: Name or service not known")
        secret = params.get("secret_token")
        if secret is not None and not TELEGRAM_SECRET.fullmatch(str(secret)):
            return _telegram_error(400, "Bad Request: secret token contains unallowed characters")
        allowed = params.get("allowed_updates")
        if isinstance(allowed, str):  # a query or form parameter: JSON-serialized
            allowed = json.loads(allowed) if allowed else []
        webhook = {"url": url, "secret_token": secret,
                   "allowed_updates": allowed if allowed is not None else bot.webhook.get("allowed_updates")}
        if params.get("drop_pending_updates") in (True, "true", "True"):
            bot.pending_update_count = 0
        if webhook["url"] != bot.webhook.get("url"):
            bot.last_error_date = bot.last_error_message = None
        same, bot.webhook = webhook == bot.webhook, webhook
        return 200, {"ok": True, "result": True, "description": "Webhook is already set" if same else "Webhook was set"}

    def _tg_getWebhookInfo(self, bot: TelegramBot, params: dict[str, Any]) -> Answer:
        info: dict[str, Any] = {"url": bot.webhook.get("url", ""), "has_custom_certificate": False,
                                "pending_update_count": bot.pending_update_count}
        if bot.webhook:
            info |= {"ip_address": "203.0.113.10", "max_connections": 40}
            if bot.webhook.get("allowed_updates"):
                info["allowed_updates"] = bot.webhook["allowed_updates"]
        if bot.last_error_date is not None:
            info |= {"last_error_date": bot.last_error_date, "last_error_message": bot.last_error_message}
        return 200, {"ok": True, "result": info}

    # -- WhatsApp (Graph API) ----------------------------------------------------------------------------------------

    def _graph_token(self, query: dict[str, str], headers: dict[str, str]) -> str | Answer:
        auth = headers.get("authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else query.get("access_token", "")
        if not any(n.token == token for n in self.whatsapp.values()) or not token:
            return _graph_error(401, 190, "Invalid OAuth access token - Cannot parse access token")
        return token

    def _phone_number(self, method: str, m: re.Match[str], query: dict[str, str], headers: dict[str, str],
                      body: Any) -> Answer:
        token = self._graph_token(query, headers)
        if not isinstance(token, str):
            return token
        number = self.whatsapp.get(m.group("node"))
        if method != "GET" or number is None or number.token != token:
            return _unsupported(method, m.group("node"))
        doc = {"verified_name": number.verified_name, "display_phone_number": number.display_phone_number,
               "quality_rating": "GREEN", "code_verification_status": "VERIFIED"}
        wanted = [f for f in query.get("fields", "").split(",") if f] or ["verified_name", "display_phone_number"]
        return 200, {**{f: doc[f] for f in wanted if f in doc}, "id": number.phone_number_id}

    def _debug_token(self, method: str, m: re.Match[str], query: dict[str, str], headers: dict[str, str],
                     body: Any) -> Answer:
        token = self._graph_token(query, headers)
        if not isinstance(token, str):
            return token
        numbers = [n for n in self.whatsapp.values() if n.token == query.get("input_token")]
        if not numbers:
            return 200, {"data": {"error": {"code": 190, "message": "Invalid OAuth access token."}, "is_valid": False,
                                  "scopes": []}}
        managed = sorted({n.business_account_id for n in numbers if n.can_manage})
        accounts = sorted({n.business_account_id for n in numbers})
        granular = [{"scope": MESSAGING, "target_ids": accounts}]
        if managed:
            granular.insert(0, {"scope": MANAGE, "target_ids": managed})
        return 200, {"data": {"app_id": numbers[0].app_id, "type": "SYSTEM_USER", "application": numbers[0].app_name,
                              "data_access_expires_at": 0, "expires_at": 0, "is_valid": True,
                              "scopes": [g["scope"] for g in granular], "granular_scopes": granular,
                              "user_id": "610000000000001"}}

    def _subscribed_apps(self, method: str, m: re.Match[str], query: dict[str, str], headers: dict[str, str],
                         body: Any) -> Answer:
        token = self._graph_token(query, headers)
        if not isinstance(token, str):
            return token
        waba = m.group("waba")
        numbers = [n for n in self.whatsapp.values() if n.business_account_id == waba and n.token == token]
        if not numbers or method not in ("GET", "POST"):
            return _unsupported(method, waba)
        if not all(n.can_manage for n in numbers):
            return _graph_error(403, 200, f"(#200) Requires {MANAGE} permission to manage the object")
        if method == "POST":
            for n in numbers:
                n.subscribed = True
            return 200, {"success": True}
        apps = {n.app_id: n for n in numbers if n.subscribed}
        return 200, {"data": [{"whatsapp_business_api_data": {
            "id": n.app_id, "link": f"https://www.facebook.com/games/?app_id={n.app_id}", "name": n.app_name}}
            for n in apps.values()]}

    # -- Discord -----------------------------------------------------------------------------------------------------

    def _authorized_app(self, method: str, headers: dict[str, str], allowed: tuple[str, ...]) -> DiscordApp | Answer:
        """The application whose bot token authorizes the request, or Discord's refusal."""
        auth = headers.get("authorization", "")
        app = self.discord.get(auth.removeprefix("Bot ")) if auth.startswith("Bot ") else None
        if app is None:
            return 401, {"message": "401: Unauthorized", "code": 0}
        if method not in allowed:
            return 405, {"message": "405: Method Not Allowed", "code": 0}
        return app

    @staticmethod
    def _bot_user(app: DiscordApp) -> dict[str, Any]:
        return {"id": app.application_id, "username": app.bot_username, "discriminator": "0", "global_name": None,
                "avatar": None, "bot": True, "flags": 0, "public_flags": 0}

    def _discord_user(self, method: str, m: re.Match[str], query: dict[str, str], headers: dict[str, str],
                      body: Any) -> Answer:
        app = self._authorized_app(method, headers, ("GET",))
        return app if not isinstance(app, DiscordApp) else (200, self._bot_user(app))

    def _discord_application(self, method: str, m: re.Match[str], query: dict[str, str], headers: dict[str, str],
                             body: Any) -> Answer:
        app = self._authorized_app(method, headers, ("GET",))
        if not isinstance(app, DiscordApp):
            return app
        return 200, {"id": app.application_id, "name": app.bot_username, "icon": None, "description": "",
                     "bot_public": True, "bot_require_code_grant": False, "verify_key": app.public_key,
                     "flags": app.flags, "interactions_endpoint_url": app.interactions_endpoint_url,
                     "bot": self._bot_user(app)}

    def _discord_commands(self, method: str, m: re.Match[str], query: dict[str, str], headers: dict[str, str],
                          body: Any) -> Answer:
        app = self._authorized_app(method, headers, ("GET", "PUT"))
        if not isinstance(app, DiscordApp):
            return app
        if m.group("app") != app.application_id:
            return 403, {"message": "Missing Access", "code": 50001}
        if method == "GET":
            return 200, app.commands
        if not isinstance(body, list):
            error = {"code": "MODEL_TYPE_CONVERT", "message": "Only iterables may be used in a ListType"}
            return 400, {"code": 50035, "errors": {"_errors": [error]}, "message": "Invalid Form Body"}
        names: set[str] = set()
        for i, command in enumerate(body):
            if refused := self._refuse_command(i, command, names):
                return refused
        app.commands = [{"id": str(1_310_000_000_000_000_000 + next(self._ids)), "application_id": app.application_id,
                         "version": str(1_310_000_000_000_000_000 + next(self._ids)), "type": c.get("type", 1),
                         "name": c["name"], "description": c["description"], "options": c.get("options", []),
                         "default_member_permissions": None, "contexts": c.get("contexts"),
                         "integration_types": c.get("integration_types", [0]), "nsfw": False} for c in body]
        return 200, app.commands

    @staticmethod
    def _refuse_command(i: int, command: Any, names: set[str]) -> Answer | None:
        """Discord's 400 for a chat-input command it would refuse (name, description, options)."""
        if not isinstance(command, dict) or not COMMAND_NAME.fullmatch(str(command.get("name", ""))):
            return _form_error(i, "name", "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
        if command["name"] in names:
            return _form_error(i, "name", "APPLICATION_COMMANDS_DUPLICATE_NAME", "Application command names must be "
                                                                                  "unique")
        names.add(command["name"])
        if not 1 <= len(str(command.get("description", ""))) <= 100:
            return _form_error(i, "description", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
        for option in command.get("options", []):
            if (not isinstance(option, dict) or option.get("type") not in OPTION_TYPES
                    or not COMMAND_NAME.fullmatch(str(option.get("name", "")))
                    or not 1 <= len(str(option.get("description", ""))) <= 100):
                return _form_error(i, "options", "APPLICATION_COMMAND_OPTIONS_INVALID", "Invalid command option")
        return None
