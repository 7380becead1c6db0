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


# -- The account and setup endpoints (cli/standins/accounts.py): the real APIs' answers and refusals ------------------

def api(standin: StandInPlatforms, method: str, path: str, prefix: str = "p", **kw) -> requests.Response:
    return requests.request(method, f"{standin.base(prefix)}{path}", timeout=10, **kw)


def test_telegram_account_answers_like_the_bot_api(standin):
    standin.accounts.telegram_bot("42:good", "AcmeSupportBot")
    assert api(standin, "GET", "/bot42:good/getMe").json()["result"]["username"] == "AcmeSupportBot"
    assert api(standin, "GET", "/bot43:bad/getMe").json() == {"ok": False, "error_code": 401,
                                                             "description": "Unauthorized"}
    assert api(standin, "GET", "/botbad/getMe").status_code == 404
    refusals = {
        "http://chat.example.com/h": "Bad Request: bad webhook: An HTTPS URL must be provided for webhook",
        "https://chat.example.com:8000/h": "Bad Request: bad webhook: Webhook can be set up only on ports 80, 88, "
                                           "443 or 8443",
        "https://chat.example.invalid/h": "Bad Request: bad webhook: Failed to resolve host: Name or service not "
                                          "known",
    }
    for url, description in refusals.items():
        answer = api(standin, "POST", "/bot42:good/setWebhook", json={"url": url})
        assert (answer.status_code, answer.json()["description"]) == (400, description)
    answer = api(standin, "POST", "/bot42:good/setWebhook", json={"url": "https://chat.example.com/h",
                                                                  "secret_token": "a+b"})
    assert answer.json()["description"] == "Bad Request: secret token contains unallowed characters"
    set_ = {"url": "https://chat.example.com:8443/h", "secret_token": "s_1", "allowed_updates": ["message"]}
    assert api(standin, "POST", "/bot42:good/setWebhook", json=set_).json()["description"] == "Webhook was set"
    assert api(standin, "POST", "/bot42:good/setWebhook", json=set_).json()["description"] == "Webhook is already set"
    info = api(standin, "POST", "/bot42:good/getWebhookInfo").json()["result"]
    assert info["url"] == set_["url"] and info["allowed_updates"] == ["message"] and info["pending_update_count"] == 0


def test_graph_api_account_answers_like_meta(standin):
    number = standin.accounts.whatsapp_number("tok", "1065", "1022", can_manage=False)
    auth = {"Authorization": "Bearer tok"}
    assert api(standin, "GET", "/v21.0/1065?fields=verified_name", headers=auth).json() == {
        "verified_name": "Acme Support", "id": "1065"}
    bad = api(standin, "GET", "/v21.0/1065", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == 190
    assert bad.json()["error"]["type"] == "OAuthException"
    unknown = api(standin, "GET", "/v21.0/1066", headers=auth).json()["error"]
    assert (unknown["code"], unknown["error_subcode"], unknown["type"]) == (100, 33, "GraphMethodException")
    denied = api(standin, "POST", "/v21.0/1022/subscribed_apps", headers=auth)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == 200 and not number.subscribed
    number.can_manage = True
    assert api(standin, "POST", "/v21.0/1022/subscribed_apps", headers=auth).json() == {"success": True}
    [app] = api(standin, "GET", "/v21.0/1022/subscribed_apps", headers=auth).json()["data"]
    assert app["whatsapp_business_api_data"]["name"] == "Acme chatsessions" and number.subscribed
    scopes = api(standin, "GET", "/v21.0/debug_token?input_token=tok", headers=auth).json()["data"]["granular_scopes"]
    assert {"scope": "whatsapp_business_management", "target_ids": ["1022"]} in scopes


def test_discord_account_answers_like_discord(standin):
    app = standin.accounts.discord_app("tok", "1300", "acmebot", "ab" * 32)
    auth = {"Authorization": "Bot tok"}
    assert api(standin, "GET", "/users/@me", headers=auth).json()["username"] == "acmebot"
    assert api(standin, "GET", "/applications/@me", headers=auth).json()["verify_key"] == "ab" * 32
    assert api(standin, "GET", "/users/@me", headers={"Authorization": "Bot nope"}).json() == {
        "message": "401: Unauthorized", "code": 0}
    bad = api(standin, "PUT", "/applications/1300/commands", headers=auth, json=[{"name": "New!", "description": "x"}])
    assert bad.status_code == 400 and bad.json()["code"] == 50035 and "name" in bad.json()["errors"]["0"]
    assert api(standin, "PUT", "/applications/1301/commands", headers=auth, json=[]).json()["code"] == 50001
    done = api(standin, "PUT", "/applications/1300/commands", headers=auth, json=[{"name": "new", "description": "x"}])
    assert [c["name"] for c in done.json()] == ["new"] == [c["name"] for c in app.commands]


def test_sends_are_answered_as_before_whatever_the_token(standin):
    """Registering accounts is only for the setup endpoints: every send is still accepted and recorded."""
    standin.accounts.telegram_bot("42:good", "AcmeSupportBot")
    answer = api(standin, "POST", "/botANY:token/sendMessage", prefix="tg", json={"chat_id": 5, "text": "hi"})
    assert answer.json()["ok"] is True and [s.text for s in standin.sent] == ["hi"]
    assert api(standin, "POST", "/nothing/here", data=b"not json").status_code == 400
