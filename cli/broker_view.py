"""A read-only look at the partition queues of a Redis broker, for `chatsessions partitions` and `sessions stuck`:
what waits in each queue, what workers took and have not acknowledged, who consumes what."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping


from shared.db import batches
from shared.partitioning import queue_name
from shared import redis_keys






@dataclass(frozen=True)
class QueuedTask:
    task: str
    queue: str
    session_key: str | None
    seq: int | None
    received_at: float | None  # when the ingress accepted the message (epoch seconds)
    in_flight: bool  # delivered to a worker, not acknowledged yet


def decode_task(raw: bytes | str | dict, queue: str = "", in_flight: bool = False) -> QueuedTask | None:
    """A Celery message as kombu's Redis transport stores it (JSON envelope, base64 body) -> what it carries."""
    try:
        envelope = raw if isinstance(raw, dict) else json.loads(raw)
        headers = envelope.get("headers") or {}
        props = envelope.get("properties") or {}
        body = envelope.get("body")
        if props.get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0] if body else []
        queue = queue or (props.get("delivery_info") or {}).get("routing_key") or ""
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    message = args[0] if args and isinstance(args[0], dict) else {}
    session_key = message.get("session_key")
    if session_key is None and len(args) >= 2 and isinstance(args[1], str):  # drain_session(id, key, ...)
        session_key = args[1]
    received = message.get("received_at")
    return QueuedTask(str(headers.get("task", "?")), queue, session_key, message.get("seq"),
                      float(received) if isinstance(received, (int, float)) and received else None, in_flight)


class BrokerView:
    """Read-only look at the partition queues of a Redis broker (kombu: LPUSH to the queue list, consumers
    pop from its tail; delivered-but-unacked messages wait in the `unacked` hash until acked or restored)."""

    def __init__(self, client: Any, partitions: int, ledger: Any = None):
        self.redis = client
        self.partitions = partitions
        self.ledger = ledger if ledger is not None else client  # REDIS_URL may differ from the broker's

    def depth(self, queue: str) -> int:
        return int(self.redis.llen(queue))

    def oldest(self, queue: str) -> QueuedTask | None:
        raw = self.redis.lindex(queue, -1)
        return decode_task(raw, queue) if raw else None

    def queued(self, queue: str, limit: int = 10_000) -> list[QueuedTask]:
        """Up to `limit` waiting messages of a queue, oldest first."""
        raws = self.redis.lrange(queue, -limit, -1)
        return [t for t in (decode_task(r, queue) for r in reversed(raws)) if t]

    def in_flight(self) -> list[QueuedTask]:
        """Messages a worker took and has not acknowledged. The ingress files each message in the unacked hash
        already when it enqueues it (ingress/redis_enqueue.py), so those still waiting in a queue are left out."""
        queued = set()
        for queue in [queue_name(p) for p in range(self.partitions)]:
            for raw in self.redis.lrange(queue, 0, -1):
                try:
                    queued.add(json.loads(raw)["properties"]["delivery_tag"])
                except (ValueError, TypeError, KeyError):
                    continue
        out = []
        for tag, raw in self.redis.hscan_iter(redis_keys.UNACKED, count=1000):
            if (tag.decode() if isinstance(tag, bytes) else tag) in queued:
                continue
            try:
                payload, _exchange, routing_key = json.loads(raw)
            except (ValueError, TypeError):
                continue
            task = decode_task(payload, routing_key, in_flight=True)
            if task:
                out.append(task)
        return out

    def sequences(self, keys: list[str] | None = None) -> dict[str, int]:
        """The ingress's per-session counters (`seq:<key>`): all of them, or those of `keys`."""
        names = [redis_keys.SEQ_PREFIX + k for k in keys] if keys is not None else [
            (n.decode() if isinstance(n, bytes) else n) for n in self.ledger.scan_iter(redis_keys.SEQ_PREFIX + "*", count=1000)]
        out: dict[str, int] = {}
        for chunk in batches(names, 1000):
            for name, value in zip(chunk, self.ledger.mget(chunk)):
                if value is not None:
                    out[name[len(redis_keys.SEQ_PREFIX):]] = int(value)
        return out


def queue_consumers(app: Any, timeout: float = 1.0) -> dict[str, list[str]]:
    """queue name -> the workers consuming it, from `celery inspect active_queues` (only workers that answer
    within `timeout` are seen)."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    out: dict[str, list[str]] = {}
    for worker, queues in sorted(replies.items()):
        for q in queues or []:
            out.setdefault(q.get("name", "?"), []).append(worker)
    return out


@dataclass
class PartitionStatus:
    partition: int | None  # None for the maintenance queue
    queue: str
    depth: int
    in_flight: int
    oldest_age_s: float | None
    consumers: list[str] | None  # None: the workers could not be asked
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def partition_status(view: BrokerView, consumers: Mapping[str, list[str]] | None,
                     extra_queues: Iterable[str] = (), at: float | None = None) -> list[PartitionStatus]:
    """Per partition queue: depth, messages in flight, the oldest waiting message's age, its consumers."""
    at = time.time() if at is None else at
    flying: dict[str, list[QueuedTask]] = {}
    for task in view.in_flight():
        flying.setdefault(task.queue, []).append(task)
    out = []
    names = [(p, queue_name(p)) for p in range(view.partitions)] + [(None, q) for q in extra_queues]
    for p, q in names:
        ages = [at - t.received_at for t in flying.get(q, []) if t.received_at]
        tail = view.oldest(q)
        if tail and tail.received_at:
            ages.append(at - tail.received_at)
        status = PartitionStatus(p, q, view.depth(q), len(flying.get(q, [])), max(ages) if ages else None,
                                 None if consumers is None else list(consumers.get(q, [])))
        if status.consumers is not None:
            if not status.consumers:
                status.warnings.append("no consumer" + (f": {status.depth} message(s) wait" if status.depth else ""))
            elif len(status.consumers) > 1 and p is not None:  # the maintenance queue may have several
                status.warnings.append(f"{len(status.consumers)} consumers: {', '.join(status.consumers)}")
        out.append(status)
    return out
