"""The Redis broker transport, hardened for a Redis restart under load.

Two gaps in kombu's Redis transport, both hit when Redis goes away while workers consume:
- Closing a channel whose connection is already gone raises AttributeError (the connection's client is None),
  which Celery does not treat as a connection error: the worker process exits instead of reconnecting. Here
  it raises redis's ConnectionError, so Celery's own reconnect runs.
- A message is popped (BRPOP) and only then recorded as unacked; if Redis goes away in between, kombu drops the
  message it already holds. Here the worker runs it anyway: its first step stores it in the session's inbox,
  so only a worker that also dies before that commit can lose it.

And one gap of green pools (gevent): Celery runs them without an event loop, and without one kombu hands a dead
consumer's unacked messages back to their queues only after a poll that found nothing. Under steady traffic a poll
always finds something, so a killed worker's messages waited until the traffic stopped. Here the poller restores
them every `unacked_restore_interval`, busy or not, as the event loop's timer does for thread pools.

And one cost of green pools: their single consumer took one message per round trip (BRPOP, then a second round
trip to file it as unacked), and each of those waits resumed only after the gevent hub had run every runnable
turn, so a queue with a thousand messages drained at ~100/s while the pool idled. Here a poll takes up to
`batch_max` messages at once (BLMPOP ... COUNT, Redis 7; the free prefetch slots bound it, so a pool never holds
more than it can run) and files them all in one pipeline. On Redis 6 the server refuses BLMPOP and the channel
goes back to BRPOP for good.

`SentinelTransport` is the same for `sentinel://` broker URLs (Redis Sentinel, kombu's sentinel transport): the
channel asks the sentinels for the master and, after a failover, for the new one.
"""

from __future__ import annotations

import time
from queue import Empty
from typing import NamedTuple

import redis
import structlog
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

log = structlog.get_logger(__name__)

POOL_WAIT_S = 20.0  # how long an ack or publish waits for a free connection (then: a connection error)


class Popped(NamedTuple):
    """A message a batch poll took: its text as popped, decoded, its tag and its `"exchange", "routing_key"`."""

    raw: str
    payload: dict
    tag: str
    route: str


class QoS(kombu_redis.QoS):
    def append(self, message, delivery_tag) -> None:
        if delivery_tag in self.channel._filed:  # its batch was filed already (Channel._file_unacked)
            return virtual.QoS.append(self, message, delivery_tag)
        try:
            super().append(message, delivery_tag)
        except self.channel.connection_errors as exc:
            log.warning("broker.unacked_write_failed", delivery_tag=delivery_tag, error=exc.__class__.__name__)
            virtual.QoS.append(self, message, delivery_tag)  # track it in memory and deliver it


class Channel(kombu_redis.Channel):
    QoS = QoS
    batch_max = 64  # messages one poll takes at most
    _batch = 0  # the count the pending BLMPOP asked for; 0: the pending poll is a BRPOP
    _blmpop_refused = False

    def __init__(self, *args, **kwargs):
        self._filed: set[str] = set()  # delivery tags of the batch being delivered, filed as unacked already
        self._no_ack_queues: set[str] = set()
        super().__init__(*args, **kwargs)

    def basic_consume(self, queue, no_ack, *args, **kwargs):
        if no_ack:
            self._no_ack_queues.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def _batch_size(self) -> int:
        """Batches need acks that remove their unacked records (Celery's consumer acks; a no_ack one would not)."""
        if self._blmpop_refused or self.global_keyprefix or not self.ack_emulation or self._no_ack_queues:
            return 1
        free = self.qos.can_consume_max_estimate()
        return self.batch_max if free is None else max(1, min(free, self.batch_max))

    def _brpop_start(self, timeout=None):
        count = self._batch_size()
        if count == 1:
            self._batch = 0
            return super()._brpop_start(timeout)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        self._batch = count
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        timeout = self.brpop_timeout if timeout is None else timeout
        self.client.connection.send_command("BLMPOP", timeout or 0, len(keys), *keys, "RIGHT", "COUNT", count)

    def _brpop_read(self, **options):
        if not self._batch:
            return super()._brpop_read(**options)
        try:
            try:
                popped = self.client.parse_response(self.client.connection, "BLMPOP", **options)
            except self.ResponseError as exc:
                if "blmpop" not in str(exc).lower():
                    raise
                self._blmpop_refused = True  # Redis < 7, or an ACL without it: BRPOP from now on
                log.info("broker.batch_pop_unavailable", error=str(exc)[:200])
                raise Empty() from None
            except self.connection_errors:
                self.client.connection.disconnect()  # the next poll reconnects
                raise
            if not popped:
                raise Empty()
            key, items = popped
            queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            batch = self._parsed(items)
            self._file_unacked(batch)
            self._deliver_batch(batch, queue)
            return True
        finally:
            self._filed.clear()
            self._in_poll = None
            self._batch = 0
            self._flush_brpop_reauth()

    @staticmethod
    def _parsed(items) -> list[Popped]:
        """Each popped item; one that is not a kombu message is logged and dropped (kombu's own BRPOP read would
        raise on it, and it must not take the rest of its batch along)."""
        batch = []
        for item in items:
            raw = bytes_to_str(item)
            try:
                payload = loads(raw)
                delivery = payload["properties"]["delivery_info"]
                route = f"{dumps(delivery['exchange'])}, {dumps(delivery['routing_key'])}"
                batch.append(Popped(raw, payload, payload["properties"]["delivery_tag"], route))
            except (ValueError, TypeError, KeyError) as exc:
                log.error("broker.malformed_message", error=exc.__class__.__name__, size=len(raw))
        return batch

    def _file_unacked(self, batch: list[Popped]) -> None:
        """Record a popped batch as unacked in one round trip, in the form QoS.append writes one message, and count
        it as delivered at once: the prefetch sees the whole batch, and a worker stopping while part of it still
        waits for a free greenlet (the pool's spawn) gives that part back too."""
        records = {popped.tag: f"[{popped.raw}, {popped.route}]" for popped in batch}
        try:
            with self.conn_or_acquire() as client:
                client.pipeline().zadd(self.unacked_index_key, dict.fromkeys(records, time.time())) \
                    .hset(self.unacked_key, mapping=records).execute()
        except self.connection_errors as exc:  # delivered anyway, as QoS.append does (see above)
            log.warning("broker.unacked_write_failed", messages=len(records), error=exc.__class__.__name__)
        self._filed.update(records)
        for popped in batch:
            virtual.QoS.append(self.qos, self.Message(popped.payload, channel=self), popped.tag)

    def _deliver_batch(self, batch: list[Popped], queue: str) -> None:
        """Hand each message to the consumer; if that fails, the rest of the batch goes back to its queue now
        rather than after VISIBILITY_TIMEOUT."""
        for done, popped in enumerate(batch):
            try:
                self.connection._deliver(popped.payload, queue)
            except BaseException:
                for rest in reversed(batch[done + 1:]):  # each back to the head of its queue: the last first
                    self.qos._delivered.pop(rest.tag, None)
                    try:
                        self.qos.restore_by_tag(rest.tag)
                    except self.connection_errors:
                        pass  # its unacked record brings it back after VISIBILITY_TIMEOUT
                raise

    def _connparams(self, asynchronous: bool = False) -> dict:
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection is already closed")
        return super()._connparams(asynchronous=asynchronous)

    def _get_pool(self, asynchronous: bool = False):
        """The pool acks and publishes take their connections from waits for one when all `max_connections` (kombu's
        10) are busy: kombu's raised MaxConnectionsError, so 64 greenlets finishing at once left some of their
        messages unacked ("Couldn't ack", CRITICAL), run again after VISIBILITY_TIMEOUT."""
        if asynchronous:  # the poller's own connection
            return super()._get_pool(asynchronous=True)
        params = self._connparams()
        self.keyprefix_fanout = self.keyprefix_fanout.format(db=params["db"])
        return redis.BlockingConnectionPool(timeout=POOL_WAIT_S, **params)


class MultiChannelPoller(kombu_redis.MultiChannelPoller):
    restore_interval = float(kombu_redis.Channel.unacked_restore_interval)
    _restore_due = 0.0

    def get(self, callback, timeout=None):
        """A poll without an event loop (green pools): first the restore sweep, when it is due."""
        if time.monotonic() >= self._restore_due:
            self._restore_due = time.monotonic() + self.restore_interval
            self.maybe_restore_messages()
        return super().get(callback, timeout)


def _restore_on_every_poll(transport: kombu_redis.Transport) -> None:
    transport.cycle = MultiChannelPoller()
    interval = transport.client.transport_options.get("unacked_restore_interval") or 0
    if interval > 0:
        transport.cycle.restore_interval = float(interval)


class Transport(kombu_redis.Transport):
    Channel = Channel

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _restore_on_every_poll(self)


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """kombu's Sentinel-managed channel (master_name from the transport options) with the hardening above, but its
    pool (the sentinels' master-following one)."""

    _get_pool = kombu_redis.SentinelChannel._get_pool


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _restore_on_every_poll(self)


TRANSPORT = f"{__name__}:Transport"
SENTINEL_TRANSPORT = f"{__name__}:SentinelTransport"


def use_for_sentinel_urls() -> None:
    """Make `sentinel://` mean SentinelTransport in this process. Celery's `broker_transport` only sets the first
    connection's transport: when a reconnect fails, kombu moves to the next `;`-separated URL with
    `Connection.switch`, which takes the transport from the URL's scheme again (kombu's own sentinel transport, i.e.
    without the hardening, during exactly the failover it was needed for)."""
    from kombu.transport import TRANSPORT_ALIASES

    TRANSPORT_ALIASES["sentinel"] = SENTINEL_TRANSPORT
