"""The platform stand-in (cli/standins/platforms.py) behaves like the real send APIs where the product relies on it:
Discord's enforced nonce (Create Message with `nonce` + `enforce_nonce: true`), its limits, and slow answers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import requests

from cli.standins.platforms import StandInPlatforms

CHANNEL = "1290000000000000001"


@pytest.fixture
def standin() -> Iterator[StandInPlatforms]:
    s = StandInPlatforms().start()
    yield s
    s.stop()


def create(standin: StandInPlatforms, body: dict, token: str = "bot-a", chat: str = CHANNEL,
           prefix: str = "dc") -> requests.Response:
    return requests.post(f"{standin.base(prefix)}/channels/{chat}/messages", json=body,
                         headers={"Authorization": f"Bot {token}"}, timeout=10)


def test_an_enforced_nonce_seen_before_returns_the_first_message_and_posts_nothing(standin):
    body = {"content": "your refund is on its way", "nonce": "r42.0", "enforce_nonce": True}
    first, again = create(standin, body), create(standin, body)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and first.json()["nonce"] == "r42.0"
    assert [s.text for s in standin.sent] == ["your refund is on its way"]
    assert [s.body["nonce"] for s in standin.deduplicated] == ["r42.0"]


def test_a_nonce_is_only_checked_when_enforced(standin):
    body = {"content": "hello", "nonce": "r42.0"}
    ids = {create(standin, body).json()["id"], create(standin, body | {"enforce_nonce": False}).json()["id"]}
    assert len(ids) == 2 and len(standin.sent) == 2 and standin.deduplicated == []


def test_the_nonce_is_per_author(standin):
    """"If another message was created by the same author with the same nonce" -- another bot is another author."""
    body = {"content": "hello", "nonce": "r42.0", "enforce_nonce": True}
    assert create(standin, body, token="bot-a").json()["id"] != create(standin, body, token="bot-b").json()["id"]
    assert len(standin.sent) == 2 and standin.deduplicated == []


def test_different_nonces_post_different_messages(standin):
    for nonce in ("r42.0", "r42.1", 42):
        create(standin, {"content": "part", "nonce": nonce, "enforce_nonce": True})
    assert len(standin.sent) == 3 and standin.deduplicated == []


def test_the_nonce_is_forgotten_after_the_window():
    standin = StandInPlatforms(nonce_window_s=0.2).start()
    try:
        body = {"content": "hello", "nonce": "r42.0", "enforce_nonce": True}
        create(standin, body)
        time.sleep(0.3)
        create(standin, body)
    finally:
        standin.stop()
    assert len(standin.sent) == 2 and standin.deduplicated == []


@pytest.mark.parametrize("nonce", ["x" * 26, ["r42"], 1.5, True, 2**63])
def test_a_nonce_discord_would_refuse_is_400_and_posts_nothing(standin, nonce):
    answer = create(standin, {"content": "hello", "nonce": nonce, "enforce_nonce": True})
    assert answer.status_code == 400 and answer.json()["code"] == 50035
    assert "nonce" in answer.json()["errors"] and standin.sent == []


def test_a_25_character_nonce_is_accepted(standin):
    assert create(standin, {"content": "hello", "nonce": "x" * 25, "enforce_nonce": True}).status_code == 200


def test_slow_answers_come_after_the_message_is_created(standin):
    """The window a sender can stop in: the platform has the message, the sender does not know it yet."""
    standin.delay_answers("dc", 0.5)
    answered = threading.Event()

    def send() -> None:
        create(standin, {"content": "hello"})
        answered.set()
    started = time.monotonic()
    threading.Thread(target=send, daemon=True).start()
    standin.wait_for(1, timeout=5)
    assert not answered.is_set()  # created, not yet answered
    assert answered.wait(5) and time.monotonic() - started >= 0.5
    create(standin, {"content": "elsewhere"}, prefix="other")  # other prefixes answer at once
    assert time.monotonic() - started < 1.5
