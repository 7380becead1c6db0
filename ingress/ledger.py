"""Per-session ingress order and cheap redelivery dedupe, shared by every ingress process.

The database's unique platform message id stays the final guard; this only keeps obvious
redeliveries out of the queues and gives workers the order in which messages arrived.
"""

from __future__ import annotations

import threading
from typing import Protocol

from shared.errors import ChatSessionsError
from shared.messages import REPLAY_WINDOW_S, SEQ_TTL_S
from shared.redis_client import redis_client
from shared import redis_keys

DEDUPE_TTL_S = REPLAY_WINDOW_S  # parsers refuse messages older than this, so every accepted copy is still known here
PENDING_TTL_S = 30  # a claim whose publish never confirmed (the ingress died, Redis went away) lapses


class InFlight(ChatSessionsError):
    """Another copy of this message is being published right now; the platform should retry later."""


class Ledger(Protocol):
    def claim(self, channel_id: str, platform_message_id: str) -> bool:
        """True the first time a platform message is seen, False once a copy was published;
        InFlight while a copy's publish is not yet confirmed (two-phase, so a lost confirmation
        can never turn a message that was not enqueued into a 200 "duplicate")."""

    def confirm(self, channel_id: str, platform_message_id: str) -> None:
        """The claimed message is in the broker: later copies are duplicates."""

    def release(self, channel_id: str, platform_message_id: str) -> None:
        """Forget a claim whose publish failed, so the platform's retry is accepted."""

    def next_seq(self, session_key: str) -> int:
        """The next per-session sequence number (1, 2, ...). The counter expires SEQ_TTL_S after its last
        number (a session that ended leaves nothing behind); one that comes back starts at 1 again, and the store
        starts its order over (shared/store.py)."""

    def return_seq(self, session_key: str, seq: int) -> None:
        """Give back a number whose message was never published, if no later one was handed out
        (otherwise the worker sees a gap and waits for it, bounded)."""

    def ping(self) -> None:
        """Raise if the ledger cannot be reached."""


_CLAIM = """
local v = redis.call('GET', KEYS[1])
if not v then redis.call('SET', KEYS[1], 'pending', 'EX', ARGV[1]) return 1 end
if v == 'pending' then return 2 end
return 0
"""


class RedisLedger:
    def __init__(self, url: str):
        self.redis = redis_client(url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=30)
        self._claim = self.redis.register_script(_CLAIM)
        self._next_seq = self.redis.register_script(
            "local n = redis.call('INCR', KEYS[1]) redis.call('EXPIRE', KEYS[1], ARGV[1]) return n")
        self._return_seq = self.redis.register_script(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DECR', KEYS[1]) end return -1")

    def claim(self, channel_id: str, platform_message_id: str) -> bool:
        state = self._claim(keys=[redis_keys.seen(channel_id, platform_message_id)], args=[PENDING_TTL_S])
        if state == 2:
            raise InFlight(platform_message_id)
        return state == 1

    def confirm(self, channel_id: str, platform_message_id: str) -> None:
        self.redis.set(redis_keys.seen(channel_id, platform_message_id), "done", ex=DEDUPE_TTL_S)

    def release(self, channel_id: str, platform_message_id: str) -> None:
        self.redis.delete(redis_keys.seen(channel_id, platform_message_id))

    def next_seq(self, session_key: str) -> int:
        return int(self._next_seq(keys=[redis_keys.seq(session_key)], args=[SEQ_TTL_S]))

    def return_seq(self, session_key: str, seq: int) -> None:
        self._return_seq(keys=[redis_keys.seq(session_key)], args=[seq])

    def ping(self) -> None:
        self.redis.ping()


class MemoryLedger:
    """For the embedded all-in-one process only: state lives as long as the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], bool] = {}  # -> confirmed
        self._seq: dict[str, int] = {}

    def claim(self, channel_id: str, platform_message_id: str) -> bool:
        with self._lock:
            confirmed = self._seen.get((channel_id, platform_message_id))
            if confirmed is None:
                self._seen[(channel_id, platform_message_id)] = False
                return True
            if not confirmed:
                raise InFlight(platform_message_id)
            return False

    def confirm(self, channel_id: str, platform_message_id: str) -> None:
        with self._lock:
            self._seen[(channel_id, platform_message_id)] = True

    def release(self, channel_id: str, platform_message_id: str) -> None:
        with self._lock:
            self._seen.pop((channel_id, platform_message_id), None)

    def next_seq(self, session_key: str) -> int:
        with self._lock:
            self._seq[session_key] = self._seq.get(session_key, 0) + 1
            return self._seq[session_key]

    def return_seq(self, session_key: str, seq: int) -> None:
        with self._lock:
            if self._seq.get(session_key) == seq:
                self._seq[session_key] = seq - 1

    def ping(self) -> None:
        return None
