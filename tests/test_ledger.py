"""The ingress ledger on the real Redis and in process: dedupe claims and per-session numbering."""

import uuid

import pytest
import redis

from ingress.ledger import MemoryLedger, RedisLedger


@pytest.fixture(params=["redis", "memory"])
def ledger(request):
    if request.param == "memory":
        return MemoryLedger()
    url = "redis://127.0.0.1:6379/13"
    try:
        redis.Redis.from_url(url).ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis at 127.0.0.1:6379 is not reachable (start it, see .ci/run): {exc}")
    return RedisLedger(url)


def test_claim_once_and_release(ledger):
    mid = uuid.uuid4().hex
    assert ledger.claim("wa", mid) is True
    assert ledger.claim("wa", mid) is False
    assert ledger.claim("wa2", mid) is True  # ids are per channel
    ledger.release("wa", mid)
    assert ledger.claim("wa", mid) is True


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
