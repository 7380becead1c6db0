"""The Redis broker transport, hardened for a Redis restart under load.

Two gaps in kombu's Redis transport, both hit when Redis goes away while workers consume:
- Closing a channel whose connection is already gone raises AttributeError (the connection's client is None),
  which Celery does not treat as a connection error: the worker process exits instead of reconnecting. Here
  it raises redis's ConnectionError, so Celery's own reconnect runs.
- A message is popped (BRPOP) and only then recorded as unacked; if Redis goes away in between, kombu drops the
  message it already holds. Here the worker runs it anyway: its first step stores it in the session's inbox,
  so only a worker that also dies before that commit can lose it.
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


TRANSPORT = f"{__name__}:Transport"
