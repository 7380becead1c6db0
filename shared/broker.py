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

`SentinelTransport` is the same for `sentinel://` broker URLs (Redis Sentinel, kombu's sentinel transport): the
channel asks the sentinels for the master and, after a failover, for the new one.
"""

from __future__ import annotations

import time

import redis
import structlog
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

log = structlog.get_logger(__name__)


class QoS(kombu_redis.QoS):
    def append(self, message, delivery_tag) -> None:
        try:
            super().append(message, delivery_tag)
        except self.channel.connection_errors as exc:
            log.warning("broker.unacked_write_failed", delivery_tag=delivery_tag, error=exc.__class__.__name__)
            virtual.QoS.append(self, message, delivery_tag)  # track it in memory and deliver it


class Channel(kombu_redis.Channel):
    QoS = QoS

    def _connparams(self, asynchronous: bool = False) -> dict:
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection is already closed")
        return super()._connparams(asynchronous=asynchronous)


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
    """kombu's Sentinel-managed channel (master_name from the transport options) with the hardening above."""


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
