"""The hardened Redis transport (shared/broker.py) against a private redis-server that the test stops."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import base64
import json

import pytest
import redis
from kombu import Connection

from shared.broker import TRANSPORT


def _start_redis(tmp_path, *options):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path), *options], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, port, client


@pytest.fixture
def private_redis(tmp_path):
    proc, port, client = _start_redis(tmp_path)
    yield port, client
    proc.kill()
    proc.wait()


@pytest.fixture(params=["redis 6", "acl"])
def without_blmpop(request, tmp_path):
    """A server without BLMPOP, as Redis 6 is, or one whose ACL does not let the user run it."""
    if request.param == "redis 6":
        proc, port, client = _start_redis(tmp_path, "--rename-command", "BLMPOP", "")
    else:
        proc, port, client = _start_redis(tmp_path)
        client.execute_command("ACL", "SETUSER", "default", "-blmpop")
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


def _consume(conn, prefetch: int | None = None) -> tuple[object, list]:
    channel = conn.channel()
    channel.queue_declare("sessions.0")
    if prefetch:
        channel.basic_qos(0, prefetch, False)
    received: list = []
    channel.basic_consume("sessions.0", False, received.append, "worker")
    return channel, received


def _publish(channel, count: int) -> None:
    for n in range(count):
        channel.basic_publish(channel.prepare_message(f"m{n}"), exchange="", routing_key="sessions.0")


def test_one_poll_takes_a_batch_and_files_every_message_as_unacked(private_redis):
    """A green pool's consumer took one message per round trip: a thousand queued messages drained at ~100/s."""
    port, client = private_redis
    with Connection(f"redis://127.0.0.1:{port}/0", transport=TRANSPORT) as conn:
        channel, received = _consume(conn)
        _publish(channel, 10)
        conn.drain_events(timeout=1)
        assert [m.body.decode() for m in received] == [f"m{n}" for n in range(10)]  # all ten, in queue order
        assert client.hlen("unacked") == 10 and client.zcard("unacked_index") == 10
        assert client.llen("sessions.0") == 0
        received[0].ack()
        assert client.hlen("unacked") == 9 and not client.hexists("unacked", received[0].delivery_tag)


def test_an_ack_waits_for_a_free_connection_instead_of_failing(private_redis):
    """A pool whose turns end together acks together: with every connection of the channel's pool busy, an ack
    waits for one (kombu's pool raised MaxConnectionsError and the message stayed unacked until its timeout)."""
    port, client = private_redis
    with Connection(f"redis://127.0.0.1:{port}/0", transport=TRANSPORT,
                    transport_options={"max_connections": 2}) as conn:
        channel, received = _consume(conn)
        _publish(channel, 3)
        conn.drain_events(timeout=1)
        held = [channel.pool.get_connection() for _ in range(2)]  # both connections busy
        acked = threading.Thread(target=received[0].ack)
        try:
            acked.start()
            acked.join(0.3)
            assert acked.is_alive() and client.hlen("unacked") == 3  # waiting, not failed
            channel.pool.release(held.pop())
            acked.join(5)
            assert not acked.is_alive() and client.hlen("unacked") == 2
        finally:
            for conn in held:
                channel.pool.release(conn)
            acked.join(5)


def test_a_batch_never_exceeds_the_free_prefetch_slots(private_redis):
    port, client = private_redis
    with Connection(f"redis://127.0.0.1:{port}/0", transport=TRANSPORT) as conn:
        channel, received = _consume(conn, prefetch=3)
        _publish(channel, 10)
        conn.drain_events(timeout=1)
        assert len(received) == 3 and client.llen("sessions.0") == 7
        received[0].ack()
        conn.drain_events(timeout=1)
        assert len(received) == 4  # one slot came free, one more message


def test_a_batched_message_of_a_dead_consumer_comes_back(private_redis):
    port, client = private_redis
    url, options = f"redis://127.0.0.1:{port}/0", {"visibility_timeout": 1}
    with Connection(url, transport=TRANSPORT, transport_options=options) as conn:
        channel, received = _consume(conn)
        _publish(channel, 3)
        conn.drain_events(timeout=1)
        assert len(received) == 3  # taken, never acked: the worker dies
        restored = json.loads(client.hget("unacked", received[1].delivery_tag))
        assert restored[1:] == ["", "sessions.0"] and restored[0]["properties"]["delivery_tag"] == \
            received[1].delivery_tag  # the record kombu's restore reads: message, exchange, routing key
    time.sleep(1.1)
    with Connection(url, transport=TRANSPORT, transport_options=options) as conn:
        conn.channel().qos.restore_visible()
    assert sorted(json.loads(raw)["body"] for raw in client.lrange("sessions.0", 0, -1)) == \
        sorted(m._raw["body"] for m in received)


def test_without_blmpop_the_consumer_takes_one_message_per_poll(without_blmpop):
    port, client = without_blmpop
    with Connection(f"redis://127.0.0.1:{port}/0", transport=TRANSPORT) as conn:
        channel, received = _consume(conn)
        _publish(channel, 3)
        for _ in range(5):
            try:
                conn.drain_events(timeout=1)
            except socket.timeout:
                break
        assert [m.body.decode() for m in received] == ["m0", "m1", "m2"]
        assert client.hlen("unacked") == 3


class Stopped(BaseException):
    """What a worker's consumer gets thrown while it waits for a free greenlet (GreenletExit, a warm shutdown)."""


def test_a_consumer_stopped_inside_a_batch_gives_the_rest_back_at_once_and_the_taken_part_at_close(private_redis):
    port, client = private_redis
    conn = Connection(f"redis://127.0.0.1:{port}/0", transport=TRANSPORT)
    channel = conn.channel()
    channel.queue_declare("sessions.0")
    taken: list = []

    def consume(message):
        if len(taken) == 3:
            raise Stopped()
        taken.append(message)

    channel.basic_consume("sessions.0", False, consume, "worker")
    _publish(channel, 10)
    with pytest.raises(Stopped):
        conn.drain_events(timeout=1)
    assert len(taken) == 3 and client.llen("sessions.0") == 6  # 4-9 back now, in their order ...
    assert [base64.b64decode(json.loads(raw)["body"]) for raw in client.lrange("sessions.0", 0, -1)][::-1] == \
        [f"m{n}".encode() for n in range(4, 10)]  # RPOP order: the next message first
    assert client.hlen("unacked") == 4  # ... the three taken and the one it stopped in stay unacked ...
    conn.close()  # ... until the consumer closes: kombu gives back everything it counted as delivered
    assert client.llen("sessions.0") == 10 and client.hlen("unacked") == 0


def test_an_item_that_is_not_a_message_does_not_take_its_batch_along(private_redis):
    port, client = private_redis
    with Connection(f"redis://127.0.0.1:{port}/0", transport=TRANSPORT) as conn:
        channel, received = _consume(conn)
        _publish(channel, 2)
        client.lpush("sessions.0", "not json", '{"no": "properties"}')
        _publish(channel, 2)
        conn.drain_events(timeout=1)
        assert [m.body.decode() for m in received] == ["m0", "m1", "m0", "m1"]
        assert client.hlen("unacked") == 4 and client.llen("sessions.0") == 0


def test_a_consumer_without_acks_takes_one_message_per_poll(private_redis):
    """Its messages are never acked, so a batch's unacked records would bring them back after the timeout."""
    port, client = private_redis
    with Connection(f"redis://127.0.0.1:{port}/0", transport=TRANSPORT) as conn:
        channel = conn.channel()
        channel.queue_declare("sessions.0")
        received: list = []
        channel.basic_consume("sessions.0", True, received.append, "reader")
        _publish(channel, 3)
        conn.drain_events(timeout=1)
        assert len(received) == 1 and client.hlen("unacked") == 0
