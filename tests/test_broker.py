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
