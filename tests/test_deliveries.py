"""The delivery journal against the machine's Redis: what a successor reads is what the sender noted."""

from __future__ import annotations

import os
import uuid

from workers.deliveries import RedisJournal
from shared.messages import Delivery

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/14")


def test_a_noted_outcome_is_read_back_by_another_process_client():
    reply_id = uuid.uuid4().int % 10**12
    writer, reader = RedisJournal(REDIS_URL), RedisJournal(REDIS_URL)
    assert reader.recall(reply_id) is None
    writer.remember(reply_id, Delivery(ok=True, platform_message_ids=("wamid.out.1",), attempts=2))
    assert reader.recall(reply_id) == Delivery(ok=True, platform_message_ids=("wamid.out.1",), attempts=2)
    assert 0 < writer.redis.ttl(f"delivered:{reply_id}") <= 7 * 24 * 3600
    writer.redis.delete(f"delivered:{reply_id}")
