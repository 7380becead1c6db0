"""Every Redis client the code builds (ingress ledger, rate limiter, web chat reply box, operators' commands) comes
from `redis_client(url)`, so REDIS_URL may name a single Redis or a Redis Sentinel group.

URL forms:
  redis://[[user]:password@]host:6379/db, rediss://…, unix://…   one Redis (redis-py's `from_url`)
  sentinel://[[user]:password@]host:26379[/db];sentinel://host2:26379;…[?master_name=NAME]
      Redis Sentinel, written like BROKER_URL for kombu's sentinel transport: the `;`-separated sentinels are asked,
      in turn, for the address of the master NAME; the client connects there and asks again after a failover. The
      credentials and db of the first URL that has them apply to the master (as in kombu); the sentinels themselves
      are reached without a password. The master name is `master_name` in the query or the `master_name` argument;
      shared/config.py adds REDIS_SENTINEL_MASTER to REDIS_URL, so every client built from Settings.redis_url
      finds it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379
MASTER_PARAM = "master_name"
MAX_CONNECTIONS = 100  # per client (redis-py's default)


def is_sentinel(url: str | None) -> bool:
    return bool(url) and url.split("://", 1)[0].lower() == SENTINEL_SCHEME


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    master_name: str | None
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The sentinels, master name, db and credentials of a `sentinel://…;sentinel://…` URL (ValueError if bad)."""
    sentinels: list[tuple[str, int]] = []
    master = None
    db = None
    username = password = None
    for part in (p.strip() for p in url.split(";")):
        if not part:
            continue
        split = urlsplit(part)
        if split.scheme.lower() != SENTINEL_SCHEME:
            raise ValueError(f"every ';'-separated part must be a sentinel:// URL, got {split.scheme or part!r}")
        try:
            port = split.port or SENTINEL_PORT
        except ValueError:
            raise ValueError(f"bad port in {part.split('@')[-1]!r}") from None
        if not split.hostname:
            raise ValueError(f"no host in {part.split('@')[-1]!r}")
        sentinels.append((split.hostname, port))
        if password is None and split.password is not None:
            username, password = (unquote(split.username) if split.username else None), unquote(split.password)
        path = split.path.strip("/")
        if path and db is None:
            if not path.isdigit():
                raise ValueError(f"the path must be a database number, got {path!r}")
            db = int(path)
        names = parse_qs(split.query).get(MASTER_PARAM)
        if names:
            master = names[-1]
    if not sentinels:
        raise ValueError("no sentinel address")
    return SentinelTarget(tuple(sentinels), master, db or 0, username, password)


def with_master(url: str, master_name: str) -> str:
    """A sentinel URL that carries its master name (unchanged if it already names one)."""
    if parse_sentinel_url(url).master_name:
        return url
    return url + ("&" if "?" in url.rsplit(";", 1)[-1] else "?") + urlencode({MASTER_PARAM: master_name})


def sentinel_kwargs(timeout: float = 2.0) -> dict[str, Any]:
    """How the sentinels themselves are asked (here and by the broker's transport, shared/queueing.py): each once,
    with short timeouts — the list is the redundancy. With redis-py's default (three retries with backoff) every
    master lookup that met a sentinel that is down took ~3.5 s, and kombu looks the master up for each connection."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return {"socket_connect_timeout": timeout, "socket_timeout": timeout, "retry": Retry(NoBackoff(), 0)}


def redis_client(url: str, master_name: str | None = None, **kwargs: Any):
    """A `redis.Redis` for `url`; keyword arguments (socket_timeout, …) apply to the Redis connections. With Sentinel
    the client follows the master: a command sent to a master that was demoted fails with ConnectionError, and the
    client's retry (redis-py's default) asks the sentinels again and runs it on the new master."""
    import redis
    from redis.sentinel import Sentinel

    # At MAX_CONNECTIONS a command waits for a connection to come back, as long as it would wait for Redis's answer,
    # instead of failing at once with MaxConnectionsError: a green pool runs a thousand turns, each pacing its send
    # through one client, and a gevent ingress worker serves a thousand webhooks.
    waiting = {"max_connections": MAX_CONNECTIONS, "timeout": kwargs.get("socket_timeout") or 2.0}
    if not is_sentinel(url):
        return redis.Redis.from_pool(redis.BlockingConnectionPool.from_url(url, **waiting, **kwargs))
    target = parse_sentinel_url(url)
    master = master_name or target.master_name
    if not master:
        raise ValueError("a sentinel:// URL needs the master's name (REDIS_SENTINEL_MASTER or ?master_name=)")
    timeout = kwargs.get("socket_connect_timeout") or kwargs.get("socket_timeout") or 2.0
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs(timeout))
    return sentinel.master_for(master, redis_class=redis.Redis, connection_pool_class=_waiting_sentinel_pool(),
                               db=target.db, username=target.username, password=target.password, **waiting, **kwargs)


@functools.cache
def _waiting_sentinel_pool() -> type:
    """redis-py's pool that follows the sentinels' master, waiting at its limit like BlockingConnectionPool."""
    from redis import BlockingConnectionPool
    from redis.sentinel import SentinelConnectionPool

    return type("WaitingSentinelConnectionPool", (SentinelConnectionPool, BlockingConnectionPool), {})
