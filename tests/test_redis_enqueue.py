"""The one-round-trip enqueue (ingress/redis_enqueue.py) against the real Redis, read back the way Celery's worker
reads it (kombu's Redis transport, Celery's message protocol), including the restore of a message a worker took and
died with before filing it."""

from __future__ import annotations

import os
import time
import uuid

import pytest
import redis

from ingress.publisher import Publisher
from shared.config import Settings, load_settings
from shared.errors import EnqueueFailed
from shared.logs import pseudonym
from shared.messages import DM, REPLAY_WINDOW_S, SEQ_TTL_S, InboundMessage
from shared.partitioning import partition_of, queue_name
from shared.queueing import HANDLE_INBOUND

REDIS_URL = os.environ.get("ENQUEUE_REDIS_URL", "redis://127.0.0.1:6379/9")  # this file's own database
CONFIG = """
[[channels]]
id = "wa"
platform = "whatsapp"
agent = "echo"
secrets = { app_secret = "E_WA", verify_token = "E_WA", access_token = "E_WA" }
options = { phone_number_id = "1065" }
"""


@pytest.fixture
def client() -> redis.Redis:
    c = redis.Redis.from_url(REDIS_URL)
    try:
        c.flushdb()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis at {REDIS_URL} is not reachable (start it: make setup): {exc}")
    yield c
    c.flushdb()


def settings_for(tmp_path, url: str = REDIS_URL, **env: str) -> Settings:
    path = tmp_path / "channels.toml"
    path.write_text(CONFIG)
    return load_settings({"CHATSESSIONS_CONFIG": str(path), "BROKER_URL": url, "E_WA": "x",
                          "SECRET_KEY": "enqueue-test-key-0123456789abcdefghijkl", **env})


def message(text: str = "héllo ¶ wörld", pid: str | None = None, chat: str = "5511") -> InboundMessage:
    return InboundMessage(channel_id="wa", platform="whatsapp", session_key=f"wa:dm:{chat}", chat_id=chat,
                          chat_kind=DM, sender_id=chat, sender_name="Ána", text=text,
                          platform_message_id=pid or f"wamid.{uuid.uuid4().hex}", sent_at=time.time())


def take(publisher: Publisher, queue: str):
    """The next task on a partition queue, as a worker receives it: (task name, args, headers)."""
    with publisher.app.connection_for_read() as conn:
        raw = conn.default_channel.basic_get(queue, no_ack=True)
        assert raw is not None, f"nothing on {queue}"
        args, kwargs, _embed = raw.decode()
        return raw.headers["task"], args, raw.headers, raw


def test_one_round_trip_enqueues_a_real_celery_task_with_its_number(tmp_path, client):
    settings = settings_for(tmp_path)
    publisher = Publisher(settings)
    assert publisher.direct is not None  # one Redis is broker and ledger: the one-script path
    first, second = message(), message(text='quote " and \\ backslash')
    assert publisher.publish([first, second]) == 2
    queue = queue_name(partition_of(first.session_key, settings.partitions))
    for expected, seq in ((first, 1), (second, 2)):
        name, args, headers, _ = take(publisher, queue)
        got = InboundMessage.from_dict(args[0])
        assert name == HANDLE_INBOUND and got.seq == seq and got.received_at > 0
        assert got == expected.with_ingress(seq, got.received_at)  # every field intact, text included
        assert headers["shadow"] == f"{HANDLE_INBOUND}[p{partition_of(first.session_key, 16)} " \
                                    f"{pseudonym(settings.secret_key, first.session_key)} #{seq}]"
        assert "5511" not in headers["argsrepr"] and "héllo" not in headers["argsrepr"]
    assert 0 < client.ttl(f"seq:{first.session_key}") <= SEQ_TTL_S
    assert client.get(f"seen:wa:{first.platform_message_id}") == b"done"
    assert REPLAY_WINDOW_S - 60 < client.ttl(f"seen:wa:{first.platform_message_id}") <= REPLAY_WINDOW_S


def test_a_seen_message_is_not_enqueued_again_unless_replayed(tmp_path, client):
    publisher = Publisher(settings_for(tmp_path))
    m = message()
    queue = queue_name(partition_of(m.session_key, 16))
    assert publisher.publish([m]) == 1
    assert publisher.publish([m]) == 0  # the platform's retry
    assert client.llen(queue) == 1 and client.get(f"seq:{m.session_key}") == b"1"
    assert publisher.publish([m], dedupe=False) == 1  # an operator's replay of a dead letter: a new number
    assert client.llen(queue) == 2 and client.get(f"seq:{m.session_key}") == b"2"


def test_a_copy_being_published_the_two_phase_way_is_a_503(tmp_path, client):
    """During a rolling upgrade an older ingress holds a `pending` claim: the platform must retry later."""
    m = message()
    client.set(f"seen:wa:{m.platform_message_id}", "pending", ex=30)
    with pytest.raises(EnqueueFailed, match="being enqueued"):
        Publisher(settings_for(tmp_path)).publish([m])
    assert client.llen(queue_name(partition_of(m.session_key, 16))) == 0


def test_redis_down_is_a_503(tmp_path):
    publisher = Publisher(settings_for(tmp_path, url="redis://127.0.0.1:1/0"))
    assert publisher.direct is not None
    with pytest.raises(EnqueueFailed, match="broker unreachable"):
        publisher.publish([message()])


def test_other_layouts_keep_the_two_phase_path(tmp_path):
    """A ledger on another Redis (or database) than the broker, or RabbitMQ: no script can do both."""
    assert Publisher(settings_for(tmp_path, REDIS_URL="redis://127.0.0.1:6379/8")).direct is None
    assert Publisher(settings_for(tmp_path, url="amqp://guest:guest@127.0.0.1:5672//",
                                  REDIS_URL=REDIS_URL)).direct is None


def test_a_message_a_worker_took_and_died_with_is_restored(tmp_path, client):
    """BRPOP removes the message from its queue before the worker files it as unacked: a worker killed in between
    used to lose it. Filed at publish, it comes back after the visibility timeout like any unacked message."""
    settings = settings_for(tmp_path, VISIBILITY_TIMEOUT="301", LEASE_SECONDS="2")
    publisher = Publisher(settings)
    m = message()
    queue = queue_name(partition_of(m.session_key, 16))
    assert publisher.publish([m]) == 1
    assert client.brpop([queue], timeout=1) is not None  # the worker got it ... and was killed here
    assert client.llen(queue) == 0 and client.hlen("unacked") == 1
    # kombu's periodic restore, as a worker runs it, once the message is older than the visibility timeout
    client.zadd("unacked_index", {client.hkeys("unacked")[0]: time.time() - 400})
    with publisher.app.connection_for_read() as conn:
        conn.default_channel.qos.restore_visible(num=100, interval=1)
    _, args, headers, _ = take(publisher, queue)
    assert InboundMessage.from_dict(args[0]).platform_message_id == m.platform_message_id
    assert headers.get("redelivered") is True and client.hlen("unacked") == 0


def test_a_worker_that_files_and_acks_the_message_leaves_nothing_behind(tmp_path, client):
    publisher = Publisher(settings_for(tmp_path))
    m = message()
    assert publisher.publish([m]) == 1
    _, _, _, raw = take(publisher, queue_name(partition_of(m.session_key, 16)))
    with publisher.app.connection_for_read() as conn:  # kombu files it under the same tag, then acks it
        qos = conn.default_channel.qos
        qos.append(raw, raw.delivery_tag)
        assert client.hlen("unacked") == 1
        qos.ack(raw.delivery_tag)
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0


def test_the_operators_view_counts_a_message_in_flight_only_once_a_worker_took_it(tmp_path, client):
    """`chatsessions partitions` / `sessions stuck` read in-flight turns from the unacked hash: a message the
    ingress filed there but which still waits in its queue is queued, not in flight."""
    from cli.broker_view import BrokerView

    publisher = Publisher(settings_for(tmp_path))
    waiting, taken = message(chat="5511"), message(chat="5522")
    assert publisher.publish([waiting, taken]) == 2
    view = BrokerView(client, 16)
    assert view.in_flight() == []
    queue = queue_name(partition_of(taken.session_key, 16))
    raw = client.rpop(queue)  # a worker took it (BRPOP) and has not acked it
    if taken.platform_message_id not in raw.decode():  # both may share a partition: take the right one
        client.rpush(queue, raw)
        client.lrem(queue, 1, next(r for r in client.lrange(queue, 0, -1) if taken.platform_message_id in r.decode()))
    [flying] = view.in_flight()
    assert flying.session_key == taken.session_key and flying.seq == 1
    assert sum(view.depth(queue_name(p)) for p in range(16)) == 1
