"""Configuration: infrastructure from the environment, channels from a TOML file; read and validated once."""

from __future__ import annotations

import functools
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from shared.errors import ConfigError, UnknownChannel

DEFAULT_CONFIG = Path(__file__).with_name("default_channels.toml")

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
}


@dataclass(frozen=True)
class SessionOptions:
    idle_minutes: float = 30.0  # active -> dormant after this long without a message
    history_limit: int = 50  # most recent messages of the current generation given to the Agent


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


@dataclass(frozen=True)
class Settings:
    database_url: str
    broker_url: str
    redis_url: str | None  # ingress sequence/dedupe ledger; None = in-process (embedded only)
    partitions: int
    lease_seconds: float
    visibility_timeout: float
    worker_concurrency: int
    log_format: str  # "json" or "console"
    log_level: str
    config_path: Path
    channels: Mapping[str, ChannelConfig]

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
    for name in spec["secrets"]:
        var = secret_env.get(name)
        if not var:
            raise ConfigError(f"{where}: secrets.{name} must name an environment variable")
        value = env.get(var)
        if not value:
            raise ConfigError(f"{where}: environment variable {var} (secrets.{name}) is not set")
        secrets[name] = value
    options = dict(raw.get("options", {}))
    for name in spec["options"]:
        if name not in options:
            raise ConfigError(f"{where}: options.{name} is required for {platform}")
    session_raw = raw.get("session", {})
    unknown = set(session_raw) - {"idle_minutes", "history_limit"}
    if unknown:
        raise ConfigError(f"{where}: unknown session options {sorted(unknown)}")
    session = SessionOptions(**session_raw)
    if session.idle_minutes <= 0 or session.history_limit <= 0:
        raise ConfigError(f"{where}: session.idle_minutes and session.history_limit must be positive")
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
    broker_url = env.get("BROKER_URL") or "memory://localhost/"
    redis_url = env.get("REDIS_URL") or (broker_url if broker_url.startswith("redis") else None)
    if redis_url is None and not broker_url.startswith("memory://"):
        raise ConfigError(f"REDIS_URL is required with the broker {broker_url.split('://')[0]}:// "
                          "(sequence numbers, dedupe and rate limits are shared through Redis)")
    lease = _number(env, "LEASE_SECONDS", doc.get("lease_seconds", 120))
    visibility = _number(env, "VISIBILITY_TIMEOUT", max(lease * 2, 300))
    if visibility <= lease:
        raise ConfigError("VISIBILITY_TIMEOUT must be longer than LEASE_SECONDS")
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
        worker_concurrency=_number(env, "WORKER_CONCURRENCY", 16, int),
        log_format=log_format,
        log_level=(env.get("LOG_LEVEL") or "INFO").upper(),
        config_path=path,
        channels=channels,
    )


@functools.cache
def get_settings() -> Settings:
    """The process-wide Settings, read once."""
    return load_settings()
