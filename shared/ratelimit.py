"""Outbound pacing shared by every worker: token buckets per platform account and per chat, in Redis.

A burst is paced instead of bouncing off the platforms' 429s; a reply waits, it is never dropped.
Limits default to what each platform documents and can be overridden per channel with
`options.rate_limits = { account_per_s = .., account_burst = .., chat_per_s = .., chat_burst = .. }`.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from shared.config import ChannelConfig
from shared.messages import GROUP
from shared.redis_client import redis_client
from shared import redis_keys


@dataclass(frozen=True)
class Bucket:
    key: str
    per_s: float  # refill rate
    burst: float  # capacity


# (per second, burst) for the whole account, a DM and a group.
PLATFORM_LIMITS: dict[str, dict[str, tuple[float, float]]] = {
    # Bot API FAQ: ~30 messages/s per bot, ~1/s per chat, 20/min per group.
    "telegram": {"account": (30, 30), "dm": (1, 1), "group": (20 / 60, 20)},
    # Cloud API: 80 messages/s per business number; pair rate limit 1 per 6 s to a user, bursts up to 45.
    "whatsapp": {"account": (80, 80), "dm": (1 / 6, 45), "group": (1 / 6, 45)},
    # ~50 requests/s global per bot; the create-message route is bucketed per channel (5 per 5 s).
    "discord": {"account": (50, 50), "dm": (1, 5), "group": (1, 5)},
}


def buckets_for(config: ChannelConfig, chat_id: str, chat_kind: str) -> list[Bucket]:
    limits = PLATFORM_LIMITS[config.platform]
    overrides = config.options.get("rate_limits", {})
    kind = "group" if chat_kind == GROUP else "dm"
    account = (overrides.get("account_per_s", limits["account"][0]), overrides.get("account_burst", limits["account"][1]))
    chat = (overrides.get("chat_per_s", limits[kind][0]), overrides.get("chat_burst", limits[kind][1]))
    return [Bucket(redis_keys.pacing(config.id), *account), Bucket(redis_keys.pacing(config.id, chat_id), *chat)]


class Limiter(Protocol):
    def try_take(self, buckets: list[Bucket]) -> float:
        """Take one token from every bucket and return 0, or take none and return the seconds to wait."""

    def peek(self, buckets: list[Bucket]) -> float:
        """What try_take would return, taking nothing: a check made before the thing that counts."""


# All buckets or none, atomically, on Redis' clock (so workers on several hosts agree). With a last argument "peek",
# only the wait is answered, nothing is taken.
_TAKE = """
local peek = ARGV[2 * #KEYS + 1] == 'peek'
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local wait, worst, tokens = 0, 0, {}
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2*i-1]), tonumber(ARGV[2*i])
  local s = redis.call('HMGET', key, 'tokens', 'ts')
  local have = math.min(burst, (tonumber(s[1]) or burst) + (now - (tonumber(s[2]) or now)) * rate)
  tokens[i] = have
  if have < 1 and (1 - have) / rate > wait then wait, worst = (1 - have) / rate, i end
end
if wait > 0 or peek then return {tostring(wait), worst} end
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2*i-1]), tonumber(ARGV[2*i])
  redis.call('HSET', key, 'tokens', tokens[i] - 1, 'ts', now)
  redis.call('EXPIRE', key, math.ceil(burst / rate) + 1)
end
return {'0', 0}
"""



class RedisLimiter:
    def __init__(self, url: str):
        self.redis = redis_client(url, socket_timeout=2, socket_connect_timeout=2)
        self.script = self.redis.register_script(_TAKE)

    def peek(self, buckets: list[Bucket]) -> float:
        return self.take(buckets, peek=True)[0]

    def try_take(self, buckets: list[Bucket]) -> float:
        return self.take(buckets)[0]

    def take(self, buckets: list[Bucket], peek: bool = False) -> tuple[float, Bucket | None]:
        """try_take, and the bucket that made the caller wait longest (None when it need not wait): which limit
        a refusal was for. `peek`: the same answer, taking nothing."""
        args = [v for b in buckets for v in (b.per_s, b.burst)] + (["peek"] if peek else [])
        wait, worst = self.script(keys=[b.key for b in buckets], args=args)
        return float(wait), buckets[int(worst) - 1] if int(worst) else None


class LocalLimiter:
    """The same buckets in process memory, for the embedded all-in-one process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.lock = threading.Lock()
        self.state: dict[str, tuple[float, float]] = {}

    def peek(self, buckets: list[Bucket]) -> float:
        return self.take(buckets, peek=True)[0]

    def try_take(self, buckets: list[Bucket]) -> float:
        return self.take(buckets)[0]

    def take(self, buckets: list[Bucket], peek: bool = False) -> tuple[float, Bucket | None]:
        with self.lock:
            now = self.clock()
            have = {}
            for b in buckets:
                tokens, ts = self.state.get(b.key, (b.burst, now))
                have[b.key] = min(b.burst, tokens + (now - ts) * b.per_s)
            wait, worst = max((((1 - have[b.key]) / b.per_s, b) for b in buckets if have[b.key] < 1),
                              default=(0.0, None), key=lambda pair: pair[0])
            if wait > 0 or peek:
                return wait, worst
            for b in buckets:
                self.state[b.key] = (have[b.key] - 1, now)
            return 0.0, None


def pace(limiter: Limiter, buckets: list[Bucket], sleep: Callable[[float], None] = time.sleep) -> float:
    """Block until one message may go to these buckets; returns the seconds waited."""
    waited = 0.0
    while (wait := limiter.try_take(buckets)) > 0:
        wait = min(math.ceil(wait * 1000) / 1000, 5.0)
        sleep(wait)
        waited += wait
    return waited
