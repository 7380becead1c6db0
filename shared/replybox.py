"""The web chat's reply box: where a worker's `send` leaves a reply for the ingress to hand to the browser.

The web chat has no platform API to post to, so the "platform" is a short Redis stream per visitor chat
(`webchat:<channel>:<visitor pseudonym>`, capped and expiring), shared by every ingress and worker process. The
embedded mode (`chatsessions run`: no Redis, one process) uses an in-process box instead. The ingress also
records the visitor's own accepted messages there, so a reloaded page shows the recent conversation.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol
from shared import redis_keys

MAX_ENTRIES = 200  # per visitor chat; older entries are trimmed
TTL_SECONDS = 24 * 3600  # a chat's box expires this long after its last entry
READ_LIMIT = 100  # entries per read
CURSOR = re.compile(r"^\d{1,20}-\d{1,20}$")  # a stream id; the client treats it as opaque


@dataclass(frozen=True)
class Entry:
    cursor: str  # read again after this to get only newer entries
    role: str  # "user" (the visitor), "agent" (a reply) or "event" (a new conversation)
    text: str
    at: float  # epoch seconds; a visitor's message is stamped before it is published, so it sorts before its reply
    id: str | None = None  # the client's message id, for entries the page sent itself

    def to_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "role": self.role, "text": self.text, "at": self.at, "id": self.id}


class ReplyBox(Protocol):
    def push(self, channel_id: str, chat_id: str, role: str, text: str, id: str | None = None,
             at: float | None = None) -> str:
        """Append an entry (`at`: when it happened, default now); returns its cursor."""

    def read(self, channel_id: str, chat_id: str, after: str | None = None) -> list[Entry]:
        """Entries after `after` (all kept entries if None), oldest first, at most READ_LIMIT."""


def box_key(channel_id: str, chat_id: str) -> str:
    return redis_keys.reply_box(channel_id, chat_id)


def _after(cursor: str) -> tuple[int, int]:
    ms, _, n = cursor.partition("-")
    return int(ms), int(n)


class RedisReplyBox:
    """One capped, expiring stream per chat; any process with the same REDIS_URL reads what another wrote."""

    def __init__(self, url: str, ttl_s: int = TTL_SECONDS, max_entries: int = MAX_ENTRIES):
        from shared.redis_client import redis_client

        self.redis = redis_client(url, socket_connect_timeout=3, socket_timeout=5)
        self.ttl_s, self.max_entries = ttl_s, max_entries

    def push(self, channel_id: str, chat_id: str, role: str, text: str, id: str | None = None,
             at: float | None = None) -> str:
        key = box_key(channel_id, chat_id)
        fields = {"entry": json.dumps({"role": role, "text": text, "at": at or time.time(), "id": id})}
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(key, fields, maxlen=self.max_entries, approximate=True)
            pipe.expire(key, self.ttl_s)
            cursor, _ = pipe.execute()
        return cursor.decode() if isinstance(cursor, bytes) else str(cursor)

    def read(self, channel_id: str, chat_id: str, after: str | None = None) -> list[Entry]:
        start = f"({after}" if after else "-"  # exclusive start (Redis >= 6.2)
        rows = self.redis.xrange(box_key(channel_id, chat_id), min=start, max="+", count=READ_LIMIT)
        out = []
        for cursor, fields in rows:
            doc = json.loads(fields[b"entry"])
            out.append(Entry(cursor.decode(), doc["role"], doc["text"], doc["at"], doc.get("id")))
        return out

    def ping(self) -> None:
        self.redis.ping()


class MemoryReplyBox:
    """The same, in one process (embedded mode); entries expire like the Redis ones."""

    def __init__(self, ttl_s: int = TTL_SECONDS, max_entries: int = MAX_ENTRIES):
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self.lock = threading.Lock()
        self.chats: dict[str, tuple[float, deque[Entry]]] = {}
        self.last = (0, 0)  # the last cursor given, as (milliseconds, n): increasing, like a stream id

    def push(self, channel_id: str, chat_id: str, role: str, text: str, id: str | None = None,
             at: float | None = None) -> str:
        key, t = box_key(channel_id, chat_id), time.time()
        with self.lock:
            self._expire(t)
            ms = max(int(t * 1000), self.last[0])
            self.last = (ms, self.last[1] + 1 if ms == self.last[0] else 0)
            cursor = f"{ms}-{self.last[1]}"
            _, entries = self.chats.get(key, (t, deque(maxlen=self.max_entries)))
            entries.append(Entry(cursor, role, text, at or t, id))
            self.chats[key] = (t, entries)
        return cursor

    def read(self, channel_id: str, chat_id: str, after: str | None = None) -> list[Entry]:
        with self.lock:
            self._expire(time.time())
            _, entries = self.chats.get(box_key(channel_id, chat_id), (0.0, deque()))
            newer = [e for e in entries if after is None or _after(e.cursor) > _after(after)]
        return newer[:READ_LIMIT]

    def _expire(self, t: float) -> None:
        for key in [k for k, (last, _) in self.chats.items() if t - last > self.ttl_s]:
            del self.chats[key]

    def ping(self) -> None:
        return None


@functools.cache
def reply_box(redis_url: str | None) -> RedisReplyBox | MemoryReplyBox:
    """The process's box for a REDIS_URL; None is the in-process box the embedded ingress and workers share."""
    return RedisReplyBox(redis_url) if redis_url else MemoryReplyBox()
