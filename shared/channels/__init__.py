"""One module per platform behind one surface: `Inbound` (a webhook request in, messages and the platform's answer
out) and `Outbound` (replies, and what else it can send); `build_channel` picks the module by platform."""

from __future__ import annotations

from shared.channels.base import Answer, Channel, Inbound, Outbound, WebhookRequest
from shared.config import ChannelConfig
from shared.ratelimit import Limiter


def build_channel(config: ChannelConfig, limiter: Limiter | None = None, secret_key: str = "") -> Channel:
    """The adapter for a configured channel; workers pass the shared outbound limiter and SECRET_KEY (what tells
    this deployment's Discord nonces from another's that uses the same bot)."""
    if config.platform == "whatsapp":
        from shared.channels.whatsapp import WhatsAppChannel

        return WhatsAppChannel(config, limiter)
    if config.platform == "telegram":
        from shared.channels.telegram import TelegramChannel

        return TelegramChannel(config, limiter)
    if config.platform == "discord":
        from shared.channels.discord import DiscordChannel

        return DiscordChannel(config, limiter, secret_key=secret_key)
    if config.platform == "webchat":
        from shared.channels.webchat import WebChatChannel

        return WebChatChannel(config, limiter)
    raise ValueError(f"unknown platform {config.platform!r}")


__all__ = ["Answer", "Channel", "Inbound", "Outbound", "WebhookRequest", "build_channel"]
