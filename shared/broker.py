"""The Redis broker transport, hardened for a Redis restart under load.

Two gaps in kombu's Redis transport, both hit when Redis goes away while workers consume:
- Closing a channel whose connection is already gone raises AttributeError (the connection's client is None),
  which Celery does not treat as a connection error: the worker process exits instead of reconnecting. Here
  it raises redis's ConnectionError, so Celery's own reconnect runs.
- A message is popped (BRPOP) and only then recorded as unacked; if Redis goes away in between, kombu drops the
  message it already holds. Here the worker runs it anyway: its first step stores it in the session's inbox,
  so only a worker that also dies before that commit can lose it.

`SentinelTransport` is the same for `sentinel://` broker URLs (Redis Sentinel, kombu's sentinel transport): the
channel asks the sentinels for the master and, after a failover, for the new one.
"""

from __future__ import annotations

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


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """kombu's Sentinel-managed channel (master_name from the transport options) with the hardening above."""


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


TRANSPORT = f"{__name__}:Transport"
SENTINEL_TRANSPORT = f"{__name__}:SentinelTransport"


def use_for_sentinel_urls() -> None:
    """Make `sentinel://` mean SentinelTransport in this process. Celery's `broker_transport` only sets the first
    connection's transport: when a reconnect fails, kombu moves to the next `;`-separated URL with
    `Connection.switch`, which takes the transport from the URL's scheme again (kombu's own sentinel transport, i.e.
    without the hardening, during exactly the failover it was needed for)."""
    from kombu.transport import TRANSPORT_ALIASES

    TRANSPORT_ALIASES["sentinel"] = SENTINEL_TRANSPORT
