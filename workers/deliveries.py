"""A second record of a send whose outcome the database could not take at once.

A reply goes out, then its outcome is stored. If the database is down at that moment, the sender keeps retrying
the write in place; but its lease may expire meanwhile, and the session's next holder would find the reply still
pending and send it again. So the sender first notes the outcome here (Redis), and a holder that inherits pending
replies from another checks here before sending: a reply noted as sent is recorded, not resent.
"""

from __future__ import annotations

import json
import threading
from typing import Protocol

from shared.messages import Delivery
from shared import redis_keys

TTL_S = 7 * 24 * 3600  # far longer than any database outage a sender retries through


class DeliveryJournal(Protocol):
    def remember(self, reply_id: int, delivery: Delivery) -> None:
        """Note a send's outcome (raises if the journal is unreachable)."""

    def recall(self, reply_id: int) -> Delivery | None:
        """The noted outcome of a reply's send, if any."""


def _encode(d: Delivery) -> str:
    return json.dumps({"ok": d.ok, "ids": list(d.platform_message_ids), "error": d.error, "attempts": d.attempts})


def _decode(raw: str | bytes) -> Delivery:
    v = json.loads(raw)
    return Delivery(ok=v["ok"], platform_message_ids=tuple(v["ids"]), error=v["error"], attempts=v["attempts"])


class RedisJournal:
    def __init__(self, url: str):
        from shared.redis_client import redis_client

        self.redis = redis_client(url, socket_timeout=2, socket_connect_timeout=2)

    def remember(self, reply_id: int, delivery: Delivery) -> None:
        self.redis.set(redis_keys.delivered(reply_id), _encode(delivery), ex=TTL_S)

    def recall(self, reply_id: int) -> Delivery | None:
        raw = self.redis.get(redis_keys.delivered(reply_id))
        return None if raw is None else _decode(raw)


class MemoryJournal:
    """For one process (the embedded mode and tests): a successor in the same process sees the note."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._notes: dict[int, str] = {}

    def remember(self, reply_id: int, delivery: Delivery) -> None:
        with self._lock:
            self._notes[reply_id] = _encode(delivery)

    def recall(self, reply_id: int) -> Delivery | None:
        with self._lock:
            raw = self._notes.get(reply_id)
        return None if raw is None else _decode(raw)
