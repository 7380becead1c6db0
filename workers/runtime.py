"""The per-process pieces a turn needs, built once from the validated settings."""

from __future__ import annotations

import functools

from workers.agents import load_agent
from shared.channels import build_channel
from shared.config import get_settings
from workers.deliveries import MemoryJournal, RedisJournal
from shared.ratelimit import LocalLimiter, RedisLimiter
from workers.store import Store
from workers.runner import TurnRunner


@functools.cache
def runner() -> TurnRunner:
    """Loads every channel's Agent now, so a bad Agent name fails at start, not at the first message."""
    settings = get_settings()
    store = Store(settings.database_url)
    store.sync_channels(settings.channels.values())
    limiter = RedisLimiter(settings.redis_url) if settings.redis_url else LocalLimiter()
    return TurnRunner(
        settings=settings,
        store=store,
        channels={cid: build_channel(c, limiter, settings.secret_key) for cid, c in settings.channels.items()},
        agents={cid: load_agent(c.agent, c.agent_options) for cid, c in settings.channels.items()},
        journal=RedisJournal(settings.redis_url) if settings.redis_url else MemoryJournal(),
    )
