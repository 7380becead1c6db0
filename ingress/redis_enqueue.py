"""Dedupe, number and enqueue a message in one Redis round trip, when the broker is the ledger's Redis.

`send_task` costs the ingress more than everything else it does for a webhook (it builds, encodes and publishes
the message through kombu, and the two-phase dedupe claim and the sequence number add three round trips around
it). Here one Lua script does all of it atomically: refuse a platform message id already seen, take the session's
next sequence number, push the Celery message onto the partition queue, and remember the id — so there is no
window in which a claim exists without its message (no `pending` state to lapse, nothing to give back).

The message is a real Celery task message (protocol 2), the one kombu's Redis transport would push for
`send_task(..., queue=...)`: Flower and `celery inspect` see it, the workers run it. Its body is JSON, not base64
(`body_encoding: utf-8`), so the script can write the sequence number into it: the JSON is built with every
non-ASCII character escaped, and MARK (a non-ASCII character) stands where the number goes.

The script also files the message in kombu's unacked hash, as a worker does when it takes one. A worker killed
after Redis handed it the message and before it filed it there would otherwise lose the message (BRPOP has
already removed it from the queue); filed at publish, it is restored to its queue after VISIBILITY_TIMEOUT like
any unacked message. The worker's own filing replaces this one and its ack removes it. The price: a message still
waiting in its queue after VISIBILITY_TIMEOUT (a backlog that long) is restored once more, and that copy is a
duplicate the store recognises (it costs a worker one transaction).
"""

from __future__ import annotations

import json
import os
import socket
import uuid

from redis.exceptions import RedisError

from shared.config import Settings
from shared.messages import REPLAY_WINDOW_S, SEQ_TTL_S, InboundMessage
from shared.partitioning import partition_of, queue_name
from shared.queueing import HANDLE_INBOUND, shown_as
from shared.redis_client import redis_client
from shared import redis_keys

MARK = "\u00b6"  # where the sequence number goes; escaped JSON holds no raw non-ASCII character but this one
DUPLICATE, IN_FLIGHT = -1, -2

_ENQUEUE = f"""
local seen = redis.call('GET', KEYS[1])
if ARGV[1] == '1' and seen then
  if seen == 'pending' then return {IN_FLIGHT} end
  return {DUPLICATE}
end
local seq = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
local message = string.gsub(ARGV[5], '\\194\\182', tostring(seq))
redis.call('LPUSH', KEYS[3], message)
local t = redis.call('TIME')
redis.call('ZADD', KEYS[5], tonumber(t[1]) + tonumber(t[2]) / 1e6, ARGV[4])
redis.call('HSET', KEYS[4], ARGV[4], '[' .. message .. ', "", "' .. KEYS[3] .. '"]')
redis.call('SET', KEYS[1], 'done', 'EX', ARGV[2])
return seq
"""


class Duplicate(Exception):
    """The platform message id was enqueued before."""


class InFlight(Exception):
    """Another ingress (of the two-phase kind, during an upgrade) is publishing this message right now."""


def usable(settings: Settings) -> bool:
    """One Redis (and one database of it) is both the broker and the ledger."""
    url = settings.broker_url
    return url.startswith(("redis://", "rediss://", "unix://")) and settings.redis_url == url


class RedisEnqueue:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis = redis_client(settings.redis_url, socket_timeout=2, socket_connect_timeout=2,
                                  health_check_interval=30)
        self.script = self.redis.register_script(_ENQUEUE)
        self.origin = f"{os.getpid()}@{socket.gethostname()}"
        self.reply_to = str(uuid.uuid4())

    def enqueue(self, message: InboundMessage, received_at: float, dedupe: bool = True) -> int:
        """The message's sequence number; Duplicate, InFlight, or RedisError (nothing happened, or all of it)."""
        queue = queue_name(partition_of(message.session_key, self.settings.partitions))
        tag = str(uuid.uuid4())
        result = self.script(
            keys=[redis_keys.seen(message.channel_id, message.platform_message_id), redis_keys.seq(message.session_key),
                  queue, redis_keys.UNACKED, redis_keys.UNACKED_INDEX],
            args=["1" if dedupe else "0", REPLAY_WINDOW_S, SEQ_TTL_S, tag, self._message(message, received_at, queue,
                                                                                          tag)])
        if result == DUPLICATE:
            raise Duplicate(message.platform_message_id)
        if result == IN_FLIGHT:
            raise InFlight(message.platform_message_id)
        return int(result)

    def _message(self, message: InboundMessage, received_at: float, queue: str, tag: str) -> str:
        """The Celery task message kombu would push, with MARK for the sequence number (body and name)."""
        fields = message.to_dict()
        fields.pop("seq")
        fields["received_at"] = received_at
        args = json.dumps(fields, separators=(",", ":"))  # ensure_ascii: MARK cannot occur in it
        body = (f'[[{args[:-1]},"seq":{MARK}}}],{{}},'
                '{"callbacks":null,"errbacks":null,"chain":null,"chord":null}]')
        task_id = str(uuid.uuid4())
        shown = shown_as(self.settings, HANDLE_INBOUND, message.session_key, seq=MARK)
        envelope = {
            "body": body,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py", "task": HANDLE_INBOUND, "id": task_id, "shadow": shown["shadow"], "eta": None,
                "expires": None, "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
                "root_id": task_id, "parent_id": None, "argsrepr": shown["argsrepr"], "kwargsrepr": "{}",
                "origin": self.origin, "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None,
                "stamps": {},
            },
            "properties": {
                "correlation_id": task_id, "reply_to": self.reply_to, "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0, "body_encoding": "utf-8",
                "delivery_tag": tag,
            },
        }
        raw = json.dumps(envelope, ensure_ascii=False)
        if raw.count(MARK) != 3:  # the host name held one: never guess where the number goes
            raise ValueError("the message template holds a stray marker")
        return raw

    def ready(self) -> None:
        self.redis.ping()


__all__ = ["RedisEnqueue", "Duplicate", "InFlight", "RedisError", "usable"]
