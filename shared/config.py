"""Configuration: infrastructure from the environment, channels from a TOML file; read and validated once."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from shared.accounts import Account, load_accounts
from shared.errors import ConfigError, UnknownChannel

DEFAULT_CONFIG = Path(__file__).with_name("default_channels.toml")
# A channel id begins every session key: with 40, the longest key any valid platform ids can make (a per-member key
# in a topic: 40 + 100-character ids) stays within the 300 characters of sessions.key.
CHANNEL_ID_LIMIT = 40

PLATFORMS: dict[str, dict[str, Any]] = {
    "whatsapp": {
        "api_base": "https://graph.facebook.com",
        "secrets": ("app_secret", "verify_token", "access_token"),
        "options": ("phone_number_id",),
    },
    "telegram": {
        "api_base": "https://api.telegram.org",
        "secrets": ("bot_token", "secret_token"),
        "options": ("bot_username",),
    },
    "discord": {
        "api_base": "https://discord.com/api/v10",
        "secrets": ("bot_token", "public_key"),
        "options": (),
    },
    "webchat": {  # the ingress serves the page; options (shared/channels/webchat.py): title, max_chars, limits
        "api_base": "",
        "secrets": (),
        "options": (),
    },
}


# -- Session policies: [channels.session] and [[identities]] (key derivation from them: shared/policies.py) ----------

SCOPES = ("default", "per-member", "per-person")
RESETS = ("never", "idle", "daily")
GROUP_REPLIES = ("always", "mentioned")
BURSTS = ("queue", "collect", "latest")
# `threads` when the file does not set it: both values keep the keys the seed gave, per the platforms' docs.
# A Discord thread *is* a channel: its MESSAGE_CREATE carries the thread's own channel_id (and no parent id), so a
# thread has always been a session of its own, and merging it into its parent needs the GUILDS intent's thread
# events. A Telegram forum topic shares its supergroup's chat id (the topic is only `message_thread_id`), so topics
# have always shared the group's session. Either way InboundMessage.thread_id keeps the topic for the reply.
THREADS_DEFAULT = {"telegram": False, "discord": True}
WHATSAPP_WINDOW_HOURS = 24.0  # free-form replies only within 24 h of the user's last message (platform rule)
DEFAULT_RESET_NOTICE = "(This is a new conversation.)"
DEFAULT_HANDOFF_NOTICE = "A person will answer shortly."
PERSON_KEY_PREFIX = "person"  # per-person session keys start "person:"; no channel may have this id
_PERSON_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_TEMPLATE_NAME = re.compile(r"[a-z0-9_]{1,512}")
_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(_[A-Za-z]{2,4})?")
_WHATSAPP_ONLY = ("window_hours", "window_template", "window_template_language")


@dataclass(frozen=True)
class SessionOptions:
    """A channel's session policy ([channels.session]); every default is the seed's behaviour except
    group_reply, whose default follows the platforms' etiquette (answer in groups only when addressed)."""

    idle_minutes: float = 30.0  # active -> dormant after this long without a message
    history_limit: int = 50  # most recent messages of the current generation given to the Agent
    history_chars: int | None = None  # and at most this many characters of them (newest kept); None = no limit
    scope: str = "default"  # default | per-member (group: one session per member) | per-person (linked DMs)
    threads: bool | None = None  # topics/threads as sessions of their own; None = THREADS_DEFAULT[platform]
    reset: str = "never"  # never | idle (reset_idle_hours without a message) | daily (reset_hour in timezone)
    reset_idle_hours: float | None = None
    reset_hour: int | None = None  # 0-23, local time in `timezone`
    timezone: str = "UTC"  # IANA name, for reset = "daily"
    reset_notice: str = DEFAULT_RESET_NOTICE  # told to the user when a policy reset opened their session ("" = none)
    group_reply: str = "mentioned"  # always | mentioned (only messages with InboundMessage.addressed)
    burst: str = "queue"  # queue | collect | latest: messages that arrive while a turn of the session runs
    retention_days: float | None = None  # closed sessions' messages are deleted after this; None = kept
    window_hours: float = WHATSAPP_WINDOW_HOURS  # WhatsApp: free-form replies only this long after the user's message
    window_template: str | None = None  # WhatsApp: template sent outside the window (None: reply undeliverable)
    window_template_language: str = "en_US"  # WhatsApp: the template's language code
    # Handing over to a person (docs/operations.md): what a user writes to ask for one (the whole message, any
    # case), what they are told once per handoff, how an operator's reply starts ("{operator}: " names them), how
    # long a session an operator has stays silent before it returns to the Agent, and whether a turn the Agent
    # failed (a dead letter) asks for a person.
    handoff_keywords: tuple[str, ...] = ("/human",)
    handoff_notice: str = DEFAULT_HANDOFF_NOTICE
    operator_prefix: str = ""
    human_idle_minutes: float = 60.0
    handoff_on_failure: bool = False

    @property
    def zone(self) -> ZoneInfo:
        """The time zone of daily resets."""
        return ZoneInfo(self.timezone)


_SESSION_KEYS = frozenset(f.name for f in dataclasses.fields(SessionOptions))


def _session_options(raw: Any, platform: str, where: str) -> SessionOptions:
    """[channels.session] validated: every problem names the channel and the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: session must be a table")
    unknown = set(raw) - _SESSION_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown session options {sorted(unknown)}")

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{where}: session.{key} {why}, got {raw[key]!r}")

    def only_with(key: str, reset: str) -> ConfigError:
        return ConfigError(f'{where}: session.{key} applies only with session.reset = "{reset}"')

    values = dict(raw)
    for key in ("idle_minutes", "reset_idle_hours", "retention_days", "window_hours", "human_idle_minutes"):
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(key, "must be a number")
            if value <= 0:
                raise bad(key, "must be positive")
            values[key] = float(value)
    for key in ("history_limit", "history_chars"):
        if key in raw and (isinstance(raw[key], bool) or not isinstance(raw[key], int) or raw[key] <= 0):
            raise bad(key, "must be a positive whole number")
    for key, allowed in (("scope", SCOPES), ("reset", RESETS), ("group_reply", GROUP_REPLIES), ("burst", BURSTS)):
        if key in raw and (not isinstance(raw[key], str) or raw[key] not in allowed):
            raise bad(key, "must be one of " + " | ".join(f'"{a}"' for a in allowed))
    if "threads" in raw:
        if not isinstance(raw["threads"], bool):
            raise bad("threads", "must be true or false")
        if platform not in THREADS_DEFAULT:
            raise ConfigError(f"{where}: session.threads: {platform} has no threads or forum topics")
    else:
        values["threads"] = THREADS_DEFAULT.get(platform, False)
    reset = raw.get("reset", "never")
    if reset == "idle" and "reset_idle_hours" not in raw:
        raise ConfigError(f'{where}: session.reset = "idle" needs session.reset_idle_hours')
    if reset == "daily" and "reset_hour" not in raw:
        raise ConfigError(f'{where}: session.reset = "daily" needs session.reset_hour (0-23)')
    if "reset_idle_hours" in raw and reset != "idle":
        raise only_with("reset_idle_hours", "idle")
    for key in ("reset_hour", "timezone"):
        if key in raw and reset != "daily":
            raise only_with(key, "daily")
    if "reset_hour" in raw:
        hour = raw["reset_hour"]
        if isinstance(hour, bool) or not isinstance(hour, int) or not 0 <= hour <= 23:
            raise bad("reset_hour", "must be a whole hour from 0 to 23")
    if "timezone" in raw:
        if not isinstance(raw["timezone"], str):
            raise bad("timezone", 'must be an IANA time zone name such as "Europe/Berlin"')
        try:
            ZoneInfo(raw["timezone"])
        except (ZoneInfoNotFoundError, ValueError):
            raise bad("timezone", 'is not a known IANA time zone name (such as "Europe/Berlin"; the tz database '
                                  "comes from the system or the tzdata package)") from None
    for key in ("reset_notice", "handoff_notice"):
        if key in raw and not isinstance(raw[key], str):
            raise bad(key, 'must be text ("" to say nothing)')
    if "handoff_keywords" in raw:
        words = raw["handoff_keywords"]
        if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
            raise bad("handoff_keywords", 'must be a list of words or phrases, such as ["/human", "agent please"]')
        values["handoff_keywords"] = tuple(w.strip().lower() for w in words)
    if "operator_prefix" in raw:
        prefix = raw["operator_prefix"]
        try:
            if not isinstance(prefix, str):
                raise TypeError
            prefix.format(operator="x")
        except (TypeError, ValueError, KeyError, IndexError):
            raise bad("operator_prefix", 'must be text in which only {operator} is replaced, such as "{operator}: "'
                      ) from None
    if "handoff_on_failure" in raw and not isinstance(raw["handoff_on_failure"], bool):
        raise bad("handoff_on_failure", "must be true or false")
    for key in _WHATSAPP_ONLY:
        if key in raw and platform != "whatsapp":
            raise ConfigError(f"{where}: session.{key} applies to whatsapp channels only")
    if "window_hours" in raw and values["window_hours"] > WHATSAPP_WINDOW_HOURS:
        raise bad("window_hours", "cannot exceed WhatsApp's 24-hour customer-service window")
    if "window_template" in raw and (not isinstance(raw["window_template"], str)
                                     or not _TEMPLATE_NAME.fullmatch(raw["window_template"])):
        raise bad("window_template", "must be a WhatsApp template name (lower-case letters, digits and _)")
    if "window_template_language" in raw and (not isinstance(raw["window_template_language"], str)
                                              or not _LANGUAGE_CODE.fullmatch(raw["window_template_language"])):
        raise bad("window_template_language", 'must be a WhatsApp language code such as "en_US" or "pt_BR"')
    return SessionOptions(**values)


@dataclass(frozen=True)
class Identity:
    """One person's accounts ([[identities]]): on per-person channels their DMs share one session, and
    `sessions export/erase` act on all of them."""

    person: str
    ids: Mapping[str, tuple[str, ...]]  # platform -> that platform's user ids (normalized)

    def all_ids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(i for ids in self.ids.values() for i in ids))


def normalize_user_id(platform: str, value: Any) -> str:
    """A platform user id as the adapters see it (WhatsApp: digits without '+', spaces or dashes; Telegram and
    Discord: digits); ValueError if it cannot be one."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("must be a string or a number")
    text = str(value).strip()
    if platform == "whatsapp":
        text = re.sub(r"[\s()+-]", "", text)
    if platform in ("whatsapp", "telegram", "discord") and not text.isdigit():
        raise ValueError(f"is not a {platform} user id (digits)")
    if not text:
        raise ValueError("is empty")
    return text


def _identities(raw: Any, path: Path) -> dict[str, Identity]:
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: identities must be [[identities]] tables")
    identities: dict[str, Identity] = {}
    owners: dict[tuple[str, str], str] = {}
    for n, entry in enumerate(raw, 1):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: [[identities]] #{n} must be a table")
        person = entry.get("person")
        if not isinstance(person, str) or not _PERSON_NAME.fullmatch(person):
            raise ConfigError(f"{path}: [[identities]] #{n}: person must be a name of letters, digits, '.', '_' or "
                              f"'-' (up to 100), got {person!r}")
        where = f"{path}: identity {person!r}"
        if person in identities:
            raise ConfigError(f"{where} appears twice")
        ids: dict[str, tuple[str, ...]] = {}
        for platform, value in entry.items():
            if platform == "person":
                continue
            if platform not in PLATFORMS:
                raise ConfigError(f"{where}: unknown key {platform!r} (person, or a platform: {sorted(PLATFORMS)})")
            normalized: list[str] = []
            for item in value if isinstance(value, list) else [value]:
                try:
                    user_id = normalize_user_id(platform, item)
                except ValueError as exc:
                    raise ConfigError(f"{where}: {platform} {item!r} {exc}") from None
                owner = owners.setdefault((platform, user_id), person)
                if owner != person:
                    raise ConfigError(f"{where}: {platform} user {user_id} already belongs to person {owner!r} "
                                      "(a platform user can be linked to one person only)")
                if user_id not in normalized:
                    normalized.append(user_id)
            if not normalized:
                raise ConfigError(f"{where}: {platform} lists no user id")
            ids[platform] = tuple(normalized)
        if not ids:
            raise ConfigError(f"{where} links no platform account (add e.g. whatsapp = \"15551234567\")")
        identities[person] = Identity(person, ids)
    return identities


@dataclass(frozen=True)
class ChannelConfig:
    id: str
    platform: str
    agent: str  # "echo", "demo", "openai" or "package.module:Attribute"
    api_base: str
    secrets: Mapping[str, str] = field(repr=False)  # resolved values; never logged
    options: Mapping[str, Any]
    session: SessionOptions
    agent_options: Mapping[str, Any] = field(default_factory=dict)  # keyword arguments for the Agent's class
    # [[identities]] of this channel's platform: user id -> person (shared/policies.py derives keys from it)
    people: Mapping[str, str] = field(default_factory=dict, repr=False)
    # secrets.<name> -> the environment variable that holds it: what messages name instead of a value
    secret_env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    database_url: str
    broker_url: str
    redis_url: str | None  # ingress sequence/dedupe ledger; None = in-process (embedded only)
    partitions: int
    lease_seconds: float
    visibility_timeout: float
    worker_concurrency: int  # turns one worker process runs at once (threads, or greenlets with gevent)
    log_format: str  # "json" or "console"
    log_level: str
    config_path: Path
    channels: Mapping[str, ChannelConfig]
    admin_token: str | None = field(default=None, repr=False)  # ADMIN_TOKEN: the session browser; None = off
    # ADMIN_BIND: the session browser's own address (`chatsessions admin`); set, the ingress does not serve /admin
    admin_bind: str | None = None
    # [[operators]]: the operator console's named accounts (shared/accounts.py), by name
    operators: Mapping[str, Account] = field(default_factory=dict, repr=False)
    identities: Mapping[str, Identity] = field(default_factory=dict, repr=False)  # [[identities]] by person
    broker_queue_type: str = "classic"  # BROKER_QUEUE_TYPE: classic | quorum (RabbitMQ quorum queues; amqp:// only)
    redis_sentinel_master: str | None = None  # REDIS_SENTINEL_MASTER: the master of sentinel:// URLs (docs/scaling.md)
    # SECRET_KEY: keys the pseudonyms of personal ids in logs and signs web chat visitor ids (shared/signing.py)
    # WORKER_POOL: how a worker process waits — "threads" (OS threads; fast Agents) or "gevent" (greenlets; Agents
    # that wait on an LLM: a thousand turns in flight per process)
    worker_pool: str = "threads"
    sweep_seconds: float = 10.0  # SWEEP_SECONDS: how often beat sweeps (stranded sessions, dormancy, retention)
    heartbeat_file: str | None = None  # WORKER_HEARTBEAT_FILE; None: <tmp>/chatsessions-worker-<pid>.alive
    heartbeat_seconds: float = 10.0  # WORKER_HEARTBEAT_SECONDS: how often a connected worker touches it
    # LOG_TASK_LINES: Celery's own "Task ... received" / "succeeded" INFO lines, two per message (off: the turn's line)
    log_task_lines: bool = False
    secret_key: str = field(default="", repr=False)
    # TRUSTED_PROXIES: the reverse proxies whose X-Forwarded-For/-Proto the ingress believes (ingress/proxies.py)
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # SECURE_COOKIES: the web chat's cookie is Secure and __Host- (false only for plain http; embedded default)
    secure_cookies: bool = True

    def person_of(self, platform: str, user_id: str) -> str | None:
        """The person a platform user is linked to in [[identities]], if any."""
        try:
            user_id = normalize_user_id(platform, user_id)
        except ValueError:
            return None
        return next((i.person for i in self.identities.values() if user_id in i.ids.get(platform, ())), None)

    def identity_of(self, user: str) -> Identity | None:
        """The identity named `user`, or linking `user` as a user id on any platform (for export/erase)."""
        if user in self.identities:
            return self.identities[user]
        return next((i for i in self.identities.values() if user in i.all_ids()), None)

    def channel(self, channel_id: str) -> ChannelConfig:
        try:
            return self.channels[channel_id]
        except KeyError:
            raise UnknownChannel(f"no channel {channel_id!r} in {self.config_path}") from None

    @property
    def embedded(self) -> bool:
        return self.broker_url.startswith("memory://")


def _number(env: Mapping[str, str], name: str, default: float, kind=float) -> Any:
    raw = env.get(name)
    if raw is None or raw == "":
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {raw!r}")
    return value


# The embedded process's key when SECRET_KEY is unset: public, so only for `chatsessions run` on one's own machine.
DEV_SECRET_KEY = "chatsessions-development-key-never-use-in-production"
SECRET_KEY_MIN_CHARS = 32


def _secret_key(env: Mapping[str, str], embedded: bool) -> str:
    key = env.get("SECRET_KEY") or ""
    if not key:
        if embedded:
            return DEV_SECRET_KEY
        raise ConfigError("SECRET_KEY is required: a random string of at least 32 characters, the same for every "
                          "ingress and worker (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if len(key) < SECRET_KEY_MIN_CHARS:
        raise ConfigError(f"SECRET_KEY must be at least {SECRET_KEY_MIN_CHARS} characters, got {len(key)}")
    return key


def _trusted_proxies(env: Mapping[str, str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """TRUSTED_PROXIES: comma-separated addresses or networks (CIDR) of the proxies in front of the ingress. Unset:
    trust nobody, so a client can never choose the address or scheme the ingress sees."""
    networks = []
    for item in (part.strip() for part in (env.get("TRUSTED_PROXIES") or "").split(",")):
        if not item:
            continue
        if item == "*":
            raise ConfigError("TRUSTED_PROXIES cannot be '*' (any client could choose its address): list the "
                              "proxies' addresses or networks, e.g. 10.0.0.0/8")
        try:
            networks.append(ipaddress.ip_network(item))  # strict: 10.0.0.1/8 is a typo for 10.0.0.0/8 or 10.0.0.1
        except ValueError as exc:
            raise ConfigError(f"TRUSTED_PROXIES: {item!r} is not an IP address or network ({exc})") from None
    return tuple(networks)


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw not in _TRUE + _FALSE:
        raise ConfigError(f"{name} must be true or false, got {env.get(name)!r}")
    return raw in _TRUE


def _secure_cookies(env: Mapping[str, str], embedded: bool) -> bool:
    """SECURE_COOKIES: true unless set false. `chatsessions run` (embedded) defaults to false: it serves plain
    http on one's own machine, where some browsers refuse Secure cookies."""
    return _flag(env, "SECURE_COOKIES", not embedded)


# Turns a worker process runs at once by default, by WORKER_POOL: a thread holds its turn's whole Agent call; a
# greenlet costs a few kilobytes while it waits (docs/scaling.md sizes both).
DEFAULT_CONCURRENCY = {"threads": 16, "gevent": 1000}

BROKER_QUEUE_TYPES = ("classic", "quorum")
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


def _broker_ha(env: Mapping[str, str], broker_url: str, redis_url: str | None) -> tuple[str | None, str, str | None]:
    """BROKER_QUEUE_TYPE and REDIS_SENTINEL_MASTER checked against the URLs; a sentinel:// REDIS_URL gets the master
    name added (`?master_name=`), so every client built from it finds the master (shared/redis_client.py)."""
    from shared.redis_client import is_sentinel, parse_sentinel_url, with_master

    scheme = broker_url.split("://", 1)[0].lower()
    queue_type = (env.get("BROKER_QUEUE_TYPE") or "classic").lower()
    if queue_type not in BROKER_QUEUE_TYPES:
        raise ConfigError(f"BROKER_QUEUE_TYPE must be classic or quorum, got {env.get('BROKER_QUEUE_TYPE')!r}")
    if queue_type == "quorum" and scheme not in AMQP_SCHEMES:
        raise ConfigError(f"BROKER_QUEUE_TYPE=quorum needs RabbitMQ (BROKER_URL=amqp://...), not {scheme}://")
    master = env.get("REDIS_SENTINEL_MASTER") or None
    for name, url in (("BROKER_URL", broker_url), ("REDIS_URL", redis_url)):
        if is_sentinel(url):
            try:
                named = parse_sentinel_url(url).master_name
            except ValueError as exc:
                raise ConfigError(f"{name} is not a valid sentinel:// URL list: {exc}") from None
            if not master and not (named and name == "REDIS_URL"):
                raise ConfigError(f"{name} is a Redis Sentinel URL: set REDIS_SENTINEL_MASTER to the name of the "
                                  "master the sentinels monitor")
    if master and not (is_sentinel(broker_url) or is_sentinel(redis_url)):
        raise ConfigError("REDIS_SENTINEL_MASTER is set but neither BROKER_URL nor REDIS_URL is a sentinel:// URL")
    if is_sentinel(redis_url) and master:
        redis_url = with_master(redis_url, master)
    return redis_url, queue_type, master


ADMIN_TOKEN_MIN_CHARS = 32


def _admin_token(env: Mapping[str, str]) -> str | None:
    """ADMIN_TOKEN: the session browser's password, long enough that guessing it is hopeless."""
    token = env.get("ADMIN_TOKEN") or None
    if token is not None and len(token) < ADMIN_TOKEN_MIN_CHARS:
        raise ConfigError(f"ADMIN_TOKEN must be at least {ADMIN_TOKEN_MIN_CHARS} characters, got {len(token)} "
                          "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def _admin_bind(env: Mapping[str, str], has_accounts: bool) -> str | None:
    """ADMIN_BIND: host:port of the session browser's own process, kept off the public ingress."""
    bind = env.get("ADMIN_BIND") or None
    if bind is None:
        return None
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"ADMIN_BIND must be host:port (e.g. 127.0.0.1:8001), got {bind!r}")
    if not has_accounts:
        raise ConfigError("ADMIN_BIND is set but neither ADMIN_TOKEN nor [[operators]] is: nobody could log in")
    return bind


def _channel(raw: dict[str, Any], env: Mapping[str, str], path: Path) -> ChannelConfig:
    where = f"{path}: channel {raw.get('id', '?')!r}"
    for key in ("id", "platform", "agent"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"{where}: '{key}' is required")
    platform = raw["platform"]
    if platform not in PLATFORMS:
        raise ConfigError(f"{where}: platform must be one of {sorted(PLATFORMS)}, got {platform!r}")
    spec = PLATFORMS[platform]
    secret_env = raw.get("secrets", {})
    secrets: dict[str, str] = {}
    unset: list[str] = []
    for name in spec["secrets"]:
        var = secret_env.get(name)
        if not var:
            raise ConfigError(f"{where}: secrets.{name} must name an environment variable")
        value = env.get(var)
        if value:
            secrets[name] = value
        else:
            unset.append(f"{var} (secrets.{name})")
    if unset:  # all of them at once: a new channel has several to set
        raise ConfigError(f"{where}: environment variable{'s' if len(unset) > 1 else ''} {', '.join(unset)} "
                          f"{'are' if len(unset) > 1 else 'is'} not set")
    options = dict(raw.get("options", {}))
    for name in spec["options"]:
        if name not in options:
            raise ConfigError(f"{where}: options.{name} is required for {platform}")
    if ":" in raw["id"]:
        raise ConfigError(f"{where}: a channel id cannot contain ':' (it separates the parts of session keys)")
    if len(raw["id"]) > CHANNEL_ID_LIMIT:
        raise ConfigError(f"{where}: a channel id may have at most {CHANNEL_ID_LIMIT} characters")
    if raw["id"] == PERSON_KEY_PREFIX:
        raise ConfigError(f"{where}: the channel id {PERSON_KEY_PREFIX!r} is reserved "
                          f"(per-person session keys start with '{PERSON_KEY_PREFIX}:')")
    session = _session_options(raw.get("session", {}), platform, where)
    agent_options = raw.get("agent_options", {})
    if not isinstance(agent_options, dict):
        raise ConfigError(f"{where}: agent_options must be a table")
    api_base = raw.get("api_base") or spec["api_base"]
    return ChannelConfig(
        id=raw["id"],
        platform=platform,
        agent=raw["agent"],
        api_base=api_base.rstrip("/"),
        secrets=secrets,
        options=options,
        session=session,
        agent_options=dict(agent_options),
        secret_env={name: secret_env[name] for name in spec["secrets"]},
    )


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from an environment mapping (os.environ by default); ConfigError on anything wrong."""
    env = os.environ if env is None else env
    path = Path(env.get("CHATSESSIONS_CONFIG") or DEFAULT_CONFIG)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found (set CHATSESSIONS_CONFIG)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    channels: dict[str, ChannelConfig] = {}
    for raw in doc.get("channels", []):
        channel = _channel(raw, env, path)
        if channel.id in channels:
            raise ConfigError(f"{path}: channel id {channel.id!r} appears twice")
        channels[channel.id] = channel
    if not channels:
        raise ConfigError(f"{path}: no [[channels]] configured")
    identities = _identities(doc.get("identities", []), path)
    for channel in list(channels.values()):
        people = {user_id: i.person for i in identities.values() for user_id in i.ids.get(channel.platform, ())}
        if channel.session.scope == "per-person" and not people:
            raise ConfigError(f'{path}: channel {channel.id!r}: session.scope = "per-person" but no '
                              f"[[identities]] entry names a {channel.platform} user")
        channels[channel.id] = dataclasses.replace(channel, people=people)
    broker_url = env.get("BROKER_URL") or "memory://localhost/"
    redis_url = env.get("REDIS_URL") or (broker_url if broker_url.startswith(("redis", "sentinel")) else None)
    if redis_url is None and not broker_url.startswith("memory://"):
        raise ConfigError(f"REDIS_URL is required with the broker {broker_url.split('://')[0]}:// "
                          "(sequence numbers, dedupe and rate limits are shared through Redis)")
    redis_url, broker_queue_type, sentinel_master = _broker_ha(env, broker_url, redis_url)
    lease = _number(env, "LEASE_SECONDS", doc.get("lease_seconds", 120))
    visibility = _number(env, "VISIBILITY_TIMEOUT", max(lease * 2, 300))
    if visibility <= lease:
        raise ConfigError("VISIBILITY_TIMEOUT must be longer than LEASE_SECONDS")
    admin_token = _admin_token(env)
    operators = load_accounts(doc.get("operators", []), path)
    worker_pool = (env.get("WORKER_POOL") or "threads").lower()
    if worker_pool not in DEFAULT_CONCURRENCY:
        raise ConfigError(f"WORKER_POOL must be threads or gevent, got {env.get('WORKER_POOL')!r}")
    log_format = env.get("LOG_FORMAT") or "console"
    if log_format not in ("json", "console"):
        raise ConfigError(f"LOG_FORMAT must be json or console, got {log_format!r}")
    return Settings(
        database_url=env.get("DATABASE_URL") or "sqlite:///chatsessions.db",
        broker_url=broker_url,
        redis_url=redis_url,
        partitions=_number(env, "PARTITIONS", doc.get("partitions", 16), int),
        lease_seconds=lease,
        visibility_timeout=visibility,
        worker_concurrency=_number(env, "WORKER_CONCURRENCY", DEFAULT_CONCURRENCY[worker_pool], int),
        worker_pool=worker_pool,
        log_format=log_format,
        log_level=(env.get("LOG_LEVEL") or "INFO").upper(),
        log_task_lines=_flag(env, "LOG_TASK_LINES", False),
        sweep_seconds=_number(env, "SWEEP_SECONDS", 10.0),
        heartbeat_file=env.get("WORKER_HEARTBEAT_FILE") or None,
        heartbeat_seconds=_number(env, "WORKER_HEARTBEAT_SECONDS", 10.0),
        config_path=path,
        channels=channels,
        admin_token=admin_token,
        admin_bind=_admin_bind(env, bool(admin_token or operators)),
        operators=operators,
        identities=identities,
        broker_queue_type=broker_queue_type,
        redis_sentinel_master=sentinel_master,
        secret_key=_secret_key(env, broker_url.startswith("memory://")),
        trusted_proxies=_trusted_proxies(env),
        secure_cookies=_secure_cookies(env, broker_url.startswith("memory://")),
    )


@functools.cache
def get_settings() -> Settings:
    """The process-wide Settings, read once."""
    return load_settings()
