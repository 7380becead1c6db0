"""The hardened Redis transport (shared/broker.py) against a private redis-server that the test stops."""

from __future__ import annotations

import socket
import subprocess
import time

import json

import pytest
import redis
from kombu import Connection

from shared.broker import TRANSPORT


@pytest.fixture
def private_redis(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield port, client
    proc.kill()
    proc.wait()


def test_a_message_popped_just_before_redis_went_away_is_still_delivered(private_redis):
    port, client = private_redis
    with Connection(f"redis://127.0.0.1:{port}/0", transport=TRANSPORT) as conn:
        channel = conn.channel()
        channel.queue_declare("sessions.0")
        channel.basic_publish(channel.prepare_message("turn"), exchange="", routing_key="sessions.0")
        raw = client.rpop("sessions.0")  # what BRPOP handed the worker ...
        message = channel.Message(json.loads(raw), channel=channel)
        client.shutdown(nosave=True)  # ... and then Redis went away before the unacked record was written
        channel.qos.append(message, message.delivery_tag)  # kombu's own QoS raises ConnectionError here
        assert message.delivery_tag in channel.qos._delivered  # tracked, so the worker runs it
        conn.close()  # and closing the channel afterwards does not raise either


def test_a_closed_connection_answers_with_a_connection_error_not_attribute_error(private_redis):
    port, _ = private_redis
    conn = Connection(f"redis://127.0.0.1:{port}/0", transport=TRANSPORT)
    channel = conn.channel()
    conn.transport.client = None  # what kombu leaves behind once the connection is closed under a channel
    with pytest.raises(redis.exceptions.ConnectionError):
        channel._connparams()
    assert isinstance(redis.exceptions.ConnectionError(), conn.connection_errors)


def test_a_dead_consumers_message_comes_back_while_traffic_never_stops(private_redis):
    """Without an event loop (a gevent pool) kombu restored unacked messages only after an empty poll: with a
    message always waiting, a killed worker's message never went back to its queue."""
    port, client = private_redis
    url, options = f"redis://127.0.0.1:{port}/0", {"visibility_timeout": 1, "unacked_restore_interval": 0.5,
                                                   "unacked_restore_throttle": 1}
    dead = Connection(url, transport=TRANSPORT, transport_options=options)
    channel = dead.channel()
    channel.queue_declare("sessions.0")
    channel.basic_publish(channel.prepare_message("orphan"), exchange="", routing_key="sessions.0")
    assert channel.basic_get("sessions.0", no_ack=False).body == b"orphan"  # fetched, never acked: the worker died
    assert client.hlen("unacked") == 1
    time.sleep(1.1)  # past the visibility timeout

    received: list[str] = []
    with Connection(url, transport=TRANSPORT, transport_options=options) as live:
        consumer = live.channel()
        consumer.basic_consume("sessions.0", True, lambda m: received.append(m.body.decode()), "live")
        for n in range(60):  # every poll finds a message: the traffic never stops
            consumer.basic_publish(consumer.prepare_message(f"live-{n}"), exchange="", routing_key="sessions.0")
            live.drain_events(timeout=1)
            if "orphan" in received:
                break
            time.sleep(0.05)
    dead.close()
    assert "orphan" in received
    assert received.index("orphan") < 59  # not only once the traffic stopped
