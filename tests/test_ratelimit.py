"""Outbound pacing: token buckets per account and per chat, on the real Redis and in process."""

import threading
import uuid

import pytest
import redis

from shared.config import ChannelConfig, SessionOptions
from shared.messages import DM, GROUP
from shared.ratelimit import Bucket, LocalLimiter, RedisLimiter, buckets_for, pace


def config(platform="telegram", **rate_limits):
    return ChannelConfig(id="tg", platform=platform, agent="echo", api_base="http://x", secrets={},
                         options={"rate_limits": rate_limits} if rate_limits else {}, session=SessionOptions())


def test_platform_defaults_and_overrides():
    account, chat = buckets_for(config(), "42", DM)
    assert (account.key, account.per_s, chat.key, chat.per_s, chat.burst) == ("rl:tg", 30, "rl:tg:42", 1, 1)
    assert buckets_for(config(), "-100", GROUP)[1].burst == 20
    assert buckets_for(config("whatsapp"), "5511", DM)[1].per_s == pytest.approx(1 / 6)
    assert buckets_for(config(chat_per_s=5, chat_burst=10), "42", DM)[1] == Bucket("rl:tg:42", 5, 10)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_local_limiter_paces_a_burst_to_the_rate():
    clock = FakeClock()
    limiter = LocalLimiter(clock)
    buckets = [Bucket("acct", 100, 100), Bucket("chat", 2, 3)]  # 3 at once, then 2 per second
    waits = [pace(limiter, buckets, clock.sleep) for _ in range(7)]
    assert waits[:3] == [0, 0, 0]
    assert clock.now == pytest.approx(2.0, abs=0.01)  # 4 more tokens at 2/s


@pytest.fixture
def redis_limiter():
    url = "redis://127.0.0.1:6379/13"
    try:
        redis.Redis.from_url(url).ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis at 127.0.0.1:6379 is not reachable (start it, make setup): {exc}")
    return RedisLimiter(url)


def test_redis_buckets_are_shared_and_all_or_nothing(redis_limiter):
    tag = uuid.uuid4().hex
    account, chat_a, chat_b = Bucket(f"a{tag}", 0.001, 3), Bucket(f"ca{tag}", 0.001, 1), Bucket(f"cb{tag}", 0.001, 5)
    other_worker = RedisLimiter("redis://127.0.0.1:6379/13")
    assert redis_limiter.try_take([account, chat_a]) == 0
    wait = other_worker.try_take([account, chat_a])  # chat A is empty for every worker
    assert wait > 0
    # chat A's refusal took nothing from the account: two more fit for chat B, then the account is empty.
    assert other_worker.try_take([account, chat_b]) == 0
    assert redis_limiter.try_take([account, chat_b]) == 0
    assert redis_limiter.try_take([account, chat_b]) > 0


def test_peek_says_what_taking_would_without_taking(redis_limiter):
    tag = uuid.uuid4().hex
    for limiter, bucket in ((LocalLimiter(FakeClock()), Bucket("logins", 0.001, 2)),
                            (redis_limiter, Bucket(f"logins{tag}", 0.001, 2))):
        assert [limiter.peek([bucket]) for _ in range(5)] == [0] * 5  # nothing taken
        assert limiter.try_take([bucket]) == 0 and limiter.try_take([bucket]) == 0
        assert limiter.peek([bucket]) > 0  # empty now, and peeking says so
        assert limiter.try_take([bucket]) > 0


def test_more_senders_than_connections_wait_for_one_instead_of_failing(redis_limiter):
    """A green pool paces a thousand sends at once through one client: past its pool's max_connections a send
    waits for a connection to come back (redis-py's pool raised MaxConnectionsError, and the turn failed)."""
    assert_a_send_waits_for_a_connection(redis_limiter)


def assert_a_send_waits_for_a_connection(limiter: RedisLimiter) -> None:
    """With every connection of the limiter's pool held, a send's pacing waits, and goes on once one is back."""
    pool = limiter.redis.connection_pool
    held = [pool.get_connection() for _ in range(pool.max_connections)]
    waits: list[float] = []
    sender = threading.Thread(target=lambda: waits.append(limiter.try_take([Bucket(uuid.uuid4().hex, 1, 1)])))
    try:
        sender.start()
        sender.join(0.3)
        assert sender.is_alive() and waits == []  # waiting for a connection, not failed
        pool.release(held.pop())
        sender.join(5)
        assert waits == [0]
    finally:
        for conn in held:
            pool.release(conn)
        sender.join(5)
