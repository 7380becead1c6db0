"""The ingress ledger on the real Redis and in process: dedupe claims and per-session numbering."""

import uuid

import pytest
import redis

from ingress.ledger import InFlight, MemoryLedger, RedisLedger


@pytest.fixture(params=["redis", "memory"])
def ledger(request):
    if request.param == "memory":
        return MemoryLedger()
    url = "redis://127.0.0.1:6379/13"
    try:
        redis.Redis.from_url(url).ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis at 127.0.0.1:6379 is not reachable (start it, make setup): {exc}")
    return RedisLedger(url)


def test_claim_is_two_phase(ledger):
    mid = uuid.uuid4().hex
    assert ledger.claim("wa", mid) is True
    with pytest.raises(InFlight):  # a copy arriving while the first is being published: retry later
        ledger.claim("wa", mid)
    ledger.confirm("wa", mid)
    assert ledger.claim("wa", mid) is False  # published: a duplicate
    assert ledger.claim("wa2", mid) is True  # ids are per channel


def test_a_released_claim_accepts_the_retry(ledger):
    mid = uuid.uuid4().hex
    assert ledger.claim("wa", mid) is True
    ledger.release("wa", mid)  # the publish failed
    assert ledger.claim("wa", mid) is True


def test_an_unconfirmed_claim_lapses():
    url = "redis://127.0.0.1:6379/13"
    ledger, mid = RedisLedger(url), uuid.uuid4().hex
    assert ledger.claim("wa", mid) is True  # ... and the release never happened (Redis was down)
    ttl = ledger.redis.ttl(f"seen:wa:{mid}")
    assert 0 < ttl <= 30  # so the platform's retry is accepted within half a minute, never answered 200 unsent


def test_numbers_are_per_session_and_returned_only_if_last(ledger):
    key = f"wa:dm:{uuid.uuid4().hex}"
    assert [ledger.next_seq(key) for _ in range(3)] == [1, 2, 3]
    ledger.return_seq(key, 3)  # its publish failed and nothing came after: the number is reused
    assert ledger.next_seq(key) == 3
    four = ledger.next_seq(key)
    five = ledger.next_seq(key)
    ledger.return_seq(key, four)  # a later number was handed out: keep going (the worker waits, bounded)
    assert (four, five, ledger.next_seq(key)) == (4, 5, 6)
    assert ledger.next_seq(f"wa:dm:{uuid.uuid4().hex}") == 1
