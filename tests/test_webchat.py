"""The web chat channel through the real Flask app and a real Publisher (kombu's in-process memory broker, a
MemoryLedger), the real turn (TurnRunner on SQLite, the demo Agent) and both reply boxes (in-process and a real
Redis). The browser end of it runs in Chromium: tests/browser."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
from structlog.testing import capture_logs

from ingress.app import create_app
from ingress.ledger import MemoryLedger, RedisLedger
from ingress.publisher import Publisher
from ingress.webchat import COOKIE
from workers.agents import load_agent
from shared.channels import build_channel
from shared.channels.base import WebhookRequest
from shared.policies import dm_key
from shared.channels.webchat import VISITOR, WebChatChannel, new_visitor_id, visitor_pseudonym
from shared.config import ChannelConfig, SessionOptions, Settings, load_settings
from shared.db import engine_for
from shared.errors import ConfigError, InvalidSignature
from shared.logs import pseudonym as log_pseudonym
from shared.messages import DM, NEW_SESSION, InboundMessage
from shared.migrate import upgrade
from shared.partitioning import partition_of, queue_name
from shared.session_queries import get_session
from shared.ratelimit import RedisLimiter
from shared.replybox import MemoryReplyBox, RedisReplyBox, box_key, reply_box
from shared.signing import keyed_hash, sign, unsign
from shared.models import ChatSession
from shared.transcripts import transcript
from workers.store import SEQ_RESTART_IDLE_S, SEQ_TTL_S, LeaseLost, Store, now
from workers.runner import TurnRunner
from workers.turn import NEW_SESSION_REPLY

WEB = "web"
REDIS_URL = os.environ.get("WEBCHAT_REDIS_URL", "redis://127.0.0.1:6379/15")  # keys are unique and deleted

CONFIG = f"""
partitions = 16

[[channels]]
id = "{WEB}"
platform = "webchat"
agent = "demo"
options = {{ title = "Acme <b>support</b>", max_chars = 50 }}

[[channels]]
id = "tg"
platform = "telegram"
agent = "echo"
secrets = {{ bot_token = "WC_TG_BOT_TOKEN", secret_token = "WC_TG_SECRET" }}
options = {{ bot_username = "AcmeBot" }}
"""


def settings_for(tmp_path: Path, config: str = CONFIG, **env: str) -> Settings:
    path = tmp_path / "channels.toml"
    path.write_text(config)
    return load_settings({"CHATSESSIONS_CONFIG": str(path), "BROKER_URL": "memory://localhost/",
                          "DATABASE_URL": f"sqlite:///{tmp_path}/web.db",
                          "WC_TG_BOT_TOKEN": "1:tg-token-Xq7", "WC_TG_SECRET": "tg-secret-Mz2", **env})


def with_options(options: str) -> str:
    """CONFIG with more options on the web chat channel."""
    return CONFIG.replace("max_chars = 50", f"max_chars = 50, {options}")


def drain(publisher: Publisher, channel_id: str = WEB) -> list[tuple[str, dict[str, Any]]]:
    """Take this channel's tasks off the in-process broker's partition queues: (queue, message dict)."""
    found = []
    with publisher.app.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in [q.name for q in publisher.app.conf.task_queues]:
            keep = []
            while channel._size(queue):
                raw = channel._get(queue)
                args, _kwargs, _embed = channel.message_to_python(raw).decode()
                if args and args[0].get("channel_id") == channel_id:
                    found.append((queue, args[0]))
                else:
                    keep.append(raw)
            for raw in keep:  # another test's message (the memory broker is process-wide): put it back
                channel._put(queue, raw)
    return found


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    saved = structlog.get_config()
    structlog.configure(cache_logger_on_first_use=False)
    with capture_logs() as captured:
        yield captured
    structlog.configure(**saved)


class Web:
    """A Flask test client per visitor over one app, and the app's publisher."""

    def __init__(self, settings: Settings, ledger: Any = None):
        self.settings = settings
        self.publisher = Publisher(settings, ledger=ledger or MemoryLedger())
        self.app = create_app(settings, self.publisher)
        drain(self.publisher)

    def visitor(self) -> tuple[Any, str]:
        """A new visitor's client (cookie set by the page) and the visitor's pseudonym."""
        client = self.app.test_client()
        page = client.get(f"/chat/{WEB}")
        assert page.status_code == 200
        return client, self.pseudonym(client)

    def pseudonym(self, client: Any) -> str:
        cookie = client.get_cookie(COOKIE)
        assert cookie is not None
        pseudonym = visitor_pseudonym(self.settings.secret_key, cookie.value)
        assert pseudonym is not None, cookie.value
        return pseudonym


@pytest.fixture
def web(tmp_path) -> Web:
    return Web(settings_for(tmp_path))


def post(client: Any, body: Any, **kw: Any):
    return client.post(f"/chat/{WEB}/messages", data=json.dumps(body), content_type="application/json", **kw)


def rejected(events: list[dict[str, Any]], status: int) -> list[str]:
    return [e["reason"] for e in events if e["event"] == "ingress.rejected" and e["status"] == status]


# -- the page --------------------------------------------------------------------------------------------------------

def test_page_gives_each_browser_its_own_visitor_cookie(web):
    client = web.app.test_client()
    page = client.get(f"/chat/{WEB}")
    assert page.status_code == 200 and page.mimetype == "text/html"
    cookie = page.headers["Set-Cookie"]
    assert f"{COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/;" in cookie
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    html = page.get_data(as_text=True)
    assert "<title>Acme &lt;b&gt;support&lt;/b&gt;</title>" in html  # the configured title, escaped
    assert 'id="new"' in html and "New conversation" in html and "/chat-static/webchat.js" in html
    assert "<script>" not in html  # no inline script: the CSP forbids it
    # Same browser again: the cookie is kept. Another browser: another visitor.
    assert "Set-Cookie" not in client.get(f"/chat/{WEB}").headers
    _, other = web.visitor()
    assert other != web.pseudonym(client)
    with web.app.test_client().get("/chat-static/webchat.js") as script:
        assert script.status_code == 200


def test_the_cookie_is_secure_and_host_only_unless_turned_off_for_plain_http(tmp_path):
    """SECURE_COOKIES (on outside `chatsessions run`): Secure, and the __Host- prefix, which the browser honours only
    with Secure, Path=/ and no Domain — so no sibling subdomain or plain-http page can plant or shadow it."""
    web = Web(settings_for(tmp_path, SECURE_COOKIES="true"))
    client = web.app.test_client()
    set_cookie = client.get(f"/chat/{WEB}", base_url="https://chat.example.com").headers["Set-Cookie"]
    attributes = [a.strip() for a in set_cookie.split(";")]
    assert attributes[0].startswith("__Host-chatsessions_visitor=")
    assert {"Secure", "HttpOnly", "Path=/", "SameSite=Lax"} <= set(attributes)
    assert not any(a.lower().startswith("domain") for a in attributes) and "Partitioned" not in attributes
    cookie = client.get_cookie("__Host-chatsessions_visitor", domain="chat.example.com")
    assert visitor_pseudonym(web.settings.secret_key, cookie.value) is not None
    assert post(client, {"id": "secure-0001", "text": "hi"}, base_url="https://chat.example.com").status_code == 200
    # The opt-out for plain http (the embedded default): no Secure, so no prefix either.
    plain = Web(settings_for(tmp_path, SECURE_COOKIES="false"))
    set_cookie = plain.app.test_client().get(f"/chat/{WEB}").headers["Set-Cookie"]
    assert set_cookie.startswith(f"{COOKIE}=") and "Secure" not in set_cookie and "Path=/;" in set_cookie


FRAMED = 'frame_ancestors = ["\'self\'", "https://www.acme.example", "https://*.acme-shop.example:8443"]'


@pytest.mark.parametrize("options, policy, frame_options", [
    ("", "frame-ancestors 'self'", "SAMEORIGIN"),
    ("""frame_ancestors = ["'none'"]""", "frame-ancestors 'none'", "DENY"),
    (FRAMED, "frame-ancestors 'self' https://www.acme.example https://*.acme-shop.example:8443", None),
])
def test_who_may_frame_the_page_is_the_channels_choice(tmp_path, options, policy, frame_options):
    web = Web(settings_for(tmp_path, with_options(options) if options else CONFIG))
    page = web.app.test_client().get(f"/chat/{WEB}")
    assert page.headers["Content-Security-Policy"].endswith("; " + policy)
    assert page.headers["Content-Security-Policy"].count("frame-ancestors") == 1
    assert page.headers.get("X-Frame-Options") == frame_options  # it cannot name other sites: CSP alone then
    assert page.headers["X-Content-Type-Options"] == "nosniff"


def test_a_page_framed_by_another_site_gets_a_cookie_that_reaches_it_there(tmp_path):
    """In a customer's iframe the page is a third party: only a SameSite=None cookie is sent back, and
    Partitioned keeps it to that site (CHIPS), so it cannot follow the visitor across sites."""
    web = Web(settings_for(tmp_path, with_options(FRAMED), SECURE_COOKIES="true"))
    attributes = {a.strip() for a in web.app.test_client().get(
        f"/chat/{WEB}", base_url="https://chat.example.com").headers["Set-Cookie"].split(";")}
    assert {"Secure", "HttpOnly", "Path=/", "SameSite=None", "Partitioned"} <= attributes
    # Plain http (SECURE_COOKIES=false) cannot have SameSite=None cookies: Lax, and the page works first-party.
    plain = Web(settings_for(tmp_path, with_options(FRAMED), SECURE_COOKIES="false"))
    attributes = {a.strip() for a in plain.app.test_client().get(f"/chat/{WEB}").headers["Set-Cookie"].split(";")}
    assert "SameSite=Lax" in attributes and "Partitioned" not in attributes


@pytest.mark.parametrize("value", ['"https://www.acme.example"', "[]", '["*"]', '["https://acme.example/chat"]',
                                   '["https://acme.example; script-src *"]', """["'unsafe-inline'"]""",
                                   '["javascript:alert(1)"]', """["'none'", "'self'"]""", '["acme.example"]',
                                   "[42]", '["https://acme.example\\n"]'])
def test_bad_frame_ancestors_are_config_errors(tmp_path, value):
    with pytest.raises(ConfigError, match="options.frame_ancestors"):
        build_channel(settings_for(tmp_path, with_options(f"frame_ancestors = {value}")).channel(WEB))


def test_a_malformed_cookie_is_replaced_on_the_page(web, events):
    client = web.app.test_client()
    client.set_cookie(COOKIE, "short", path="/chat/")
    page = client.get(f"/chat/{WEB}")
    assert f"{COOKIE}=" in page.headers["Set-Cookie"]
    assert client.get_cookie(COOKIE).value != "short"
    assert any(e["event"] == "webchat.cookie_replaced" for e in events)


def forged_cookies(key: str) -> dict[str, str]:
    """Cookies a visitor could present that this server never issued."""
    raw = new_visitor_id()
    genuine = sign(key, VISITOR, raw)
    return {
        "unsigned id (a cookie from before ids were signed)": raw,
        "signed with another key": sign("another-key-0123456789abcdefghijklmnop", VISITOR, raw),
        "signature tampered with": genuine[:-1] + ("A" if genuine[-1] != "A" else "B"),
        "signed for another purpose": sign(key, "admin", raw),
        "signed, but not a visitor id": sign(key, VISITOR, "../../etc/passwd"),
        "empty signature": raw + ".",
        "only a signature": genuine.partition(".")[2],
    }


@pytest.mark.parametrize("case", list(forged_cookies("k")))
def test_a_cookie_this_server_did_not_issue_is_a_new_visitor(web, events, case):
    forged = forged_cookies(web.settings.secret_key)[case]
    client = web.app.test_client()
    client.set_cookie(COOKIE, forged, path="/chat/")
    # Nothing is accepted or read with it: the same answer as no cookie at all.
    assert post(client, {"id": "forged-0001", "text": "hi"}).status_code == 400
    assert client.get(f"/chat/{WEB}/replies").status_code == 400
    assert len([r for r in rejected(events, 400) if "not issued by this server" in r]) == 2
    assert drain(web.publisher) == []
    # The page makes the browser a new visitor, with a cookie of its own.
    page = client.get(f"/chat/{WEB}")
    assert f"{COOKIE}=" in page.headers["Set-Cookie"]
    assert [e["reason"] for e in events if e["event"] == "webchat.cookie_replaced"] == [
        "visitor cookie malformed or not issued by this server"]
    assert client.get_cookie(COOKIE).value != forged
    assert post(client, {"id": "forged-0001", "text": "hi"}).status_code == 200
    assert forged not in json.dumps(drain(web.publisher)) and forged not in str(events)


def test_the_visitor_id_never_leaves_the_cookie(web, events):
    """Session key, chat/sender/message ids, the task's name, the reply box, the logs and the database name the
    visitor by its pseudonym, a keyed hash of the id: knowing them does not let anyone act as the visitor."""
    runner = runner_for(web.settings, reply_box(None))
    try:
        client, pseudonym = web.visitor()
        visitor_id = unsign(web.settings.secret_key, VISITOR, client.get_cookie(COOKIE).value)
        assert pseudonym == keyed_hash(web.settings.secret_key, VISITOR, visitor_id) != visitor_id
        assert post(client, {"id": "private-0001", "text": "my name is Ana"}).status_code == 200
        with web.publisher.app.connection_for_write() as conn:  # the task as Flower would show it
            channel = conn.default_channel
            raw = next(channel._get(q) for q in [q.name for q in web.publisher.app.conf.task_queues]
                       if channel._size(q))
            task = channel.message_to_python(raw)
            channel._put(task.delivery_info["routing_key"], raw)
        # Flower names the task by the session's log pseudonym (shared/logs.py), never by the visitor's id.
        shown = log_pseudonym(web.settings.secret_key, dm_key(WEB, pseudonym))
        assert shown in task.headers["shadow"] and visitor_id not in json.dumps(task.headers)
        [(_, message)] = drain(web.publisher)
        m = InboundMessage.from_dict(message)
        assert (m.session_key, m.chat_id, m.sender_id) == (dm_key(WEB, pseudonym), pseudonym, pseudonym)
        assert m.platform_message_id == f"{pseudonym}:private-0001"
        assert visitor_id not in json.dumps(message)
        assert runner.handle(m) == "replied"
        # The reply reached the box the page reads (the worker knows the pseudonym only).
        assert [e["role"] for e in client.get(f"/chat/{WEB}/replies").json["entries"]] == ["user", "agent"]
        assert reply_box(None).read(WEB, pseudonym) and not reply_box(None).read(WEB, visitor_id)
        assert visitor_id not in str(events) and pseudonym in str(events)
        dump = "\n".join(engine_for(web.settings.database_url).raw_connection().driver_connection.iterdump())
        assert pseudonym in dump and visitor_id not in dump
    finally:
        engine_for(web.settings.database_url).dispose()


@pytest.mark.parametrize("path", ["/chat/tg", "/chat/nope", "/chat/tg/replies"])
def test_only_webchat_channels_have_a_page(web, path):
    assert web.app.test_client().get(path).status_code == 404


def test_the_webhook_route_refuses_webchat_channels(web):
    r = web.app.test_client().post(f"/webhooks/{WEB}", data=b"{}", content_type="application/json")
    assert r.status_code == 401
    assert drain(web.publisher) == []


# -- posting ---------------------------------------------------------------------------------------------------------

def test_a_message_is_published_on_its_sessions_partition(web):
    client, visitor = web.visitor()
    r = post(client, {"id": "msg-00000001", "text": "  Hi, my order 48213 is late  "})
    assert r.status_code == 200 and r.json == {"accepted": True, "duplicate": False}
    [(queue, message)] = drain(web.publisher)
    key = dm_key(WEB, visitor)
    assert queue == queue_name(partition_of(key, web.settings.partitions))
    m = InboundMessage.from_dict(message)
    assert (m.platform, m.session_key, m.chat_id, m.chat_kind, m.sender_id) == ("webchat", key, visitor, DM, visitor)
    assert m.text == "Hi, my order 48213 is late" and m.command is None
    assert m.platform_message_id == f"{visitor}:msg-00000001" and m.seq == 1


def test_a_retried_post_is_deduplicated_and_seq_counts_per_session(web):
    client, visitor = web.visitor()
    other, _ = web.visitor()
    for _ in range(3):  # the page retries with the same id
        assert post(client, {"id": "same-id-123", "text": "hello"}).status_code == 200
    assert post(client, {"id": "same-id-123", "text": "hello"}).json["duplicate"] is True
    assert post(client, {"id": "next-id-456", "text": "again"}).json["duplicate"] is False
    # Another visitor may use the same client id: ids are scoped by visitor.
    assert post(other, {"id": "same-id-123", "text": "hello"}).json["duplicate"] is False
    published = [m for _, m in drain(web.publisher)]
    mine = [m for m in published if m["chat_id"] == visitor]
    assert [(m["text"], m["seq"]) for m in mine] == [("hello", 1), ("again", 2)]
    assert len(published) == 3
    # The box shows each accepted message once.
    entries = client.get(f"/chat/{WEB}/replies").json["entries"]
    assert [(e["role"], e["text"], e["id"]) for e in entries] == [("user", "hello", "same-id-123"),
                                                                    ("user", "again", "next-id-456")]


@pytest.mark.parametrize("body", [{"id": "new-conv-01", "command": "new"}, {"id": "new-conv-02", "text": "/new"}])
def test_new_conversation_is_the_new_session_command(web, body):
    client, _ = web.visitor()
    assert post(client, body).status_code == 200
    [(_, message)] = drain(web.publisher)
    assert message["command"] == NEW_SESSION and message["text"] == "/new"
    [entry] = client.get(f"/chat/{WEB}/replies").json["entries"]
    assert (entry["role"], entry["text"]) == ("event", "New conversation")


@pytest.mark.parametrize("body, status, reason", [
    ({"id": "abcdefgh", "text": "   "}, 400, "text is empty"),
    ({"id": "abcdefgh"}, 400, "text missing"),
    ({"id": "abcdefgh", "text": 42}, 400, "text missing or not a string"),
    ({"id": "abc", "text": "hi"}, 400, "id missing or malformed"),
    ({"id": "bad id with spaces", "text": "hi"}, 400, "id missing or malformed"),
    ({"text": "hi"}, 400, "id missing or malformed"),
    ({"id": "abcdefgh", "command": "erase"}, 400, "unknown command"),
    (["not", "an", "object"], 400, "not a JSON object"),
    ({"id": "abcdefgh", "text": "x" * 51}, 413, "text longer than 50 characters"),
    ({"id": "abcdefgh", "text": "\ud800"}, 400, "not valid Unicode"),
])
def test_bad_messages_get_a_4xx_and_a_logged_reason(web, events, body, status, reason):
    client, _ = web.visitor()
    r = post(client, body)
    assert r.status_code == status and reason in r.json["error"]
    assert any(reason in logged for logged in rejected(events, status)), events
    assert drain(web.publisher) == []


def test_bad_requests_are_refused_before_anything_is_published(web, events):
    client, _ = web.visitor()
    r = client.post(f"/chat/{WEB}/messages", data="id=abcdefgh&text=hi",
                    content_type="application/x-www-form-urlencoded")  # what a cross-site form could send
    assert r.status_code == 415
    r = client.post(f"/chat/{WEB}/messages", data=b"{not json", content_type="application/json")
    assert r.status_code == 400 and "not JSON" in r.json["error"]
    stranger = web.app.test_client()  # never loaded the page: no cookie
    assert post(stranger, {"id": "abcdefgh", "text": "hi"}).status_code == 400
    forged = web.app.test_client()
    forged.set_cookie(COOKIE, "../../etc/passwd-not-an-id", path="/chat/")
    assert post(forged, {"id": "abcdefgh", "text": "hi"}).status_code == 400
    assert forged.get(f"/chat/{WEB}/replies").status_code == 400
    assert client.get(f"/chat/{WEB}/replies?after=0;DROP").status_code == 400
    assert post(client, {"id": "abcdefgh", "text": "x" * 2_000_000}).status_code == 413  # over the body limit
    assert len(rejected(events, 400)) == 5 and rejected(events, 415) and rejected(events, 413)
    assert any("visitor cookie missing, malformed or not issued by this server" in r for r in rejected(events, 400))
    assert drain(web.publisher) == []


def test_a_broker_outage_is_a_503_and_the_retry_is_not_a_duplicate(web, monkeypatch):
    client, _ = web.visitor()

    def down(*_a: Any, **_kw: Any) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(web.publisher.app, "send_task", down)
    assert post(client, {"id": "retry-me-1", "text": "hello"}).status_code == 503
    monkeypatch.undo()
    r = post(client, {"id": "retry-me-1", "text": "hello"})
    assert r.status_code == 200 and r.json["duplicate"] is False
    assert [m["seq"] for _, m in drain(web.publisher)] == [1]


def test_a_visitor_posting_too_fast_gets_429_with_retry_after(tmp_path, events):
    web = Web(settings_for(tmp_path, with_options("messages_per_minute = 2")))
    client, _ = web.visitor()
    other, _ = web.visitor()
    assert [post(client, {"id": f"fast-{n:04d}", "text": "hi"}).status_code for n in range(2)] == [200, 200]
    r = post(client, {"id": "fast-0002", "text": "hi"})
    assert r.status_code == 429 and r.json["error"] == "more than 2 messages a minute from this visitor"
    assert 1 <= int(r.headers["Retry-After"]) <= 30
    assert rejected(events, 429) == ["more than 2 messages a minute from this visitor"]
    assert post(other, {"id": "fast-0000", "text": "hi"}).status_code == 200  # per visitor
    assert len(drain(web.publisher)) == 3


def post_from(web: Web, address: str, message_id: str, **headers: str):
    """A new visitor (a fresh cookie, as a client minting visitors would have) posting from `address`."""
    client = web.app.test_client()
    client.get(f"/chat/{WEB}", environ_base={"REMOTE_ADDR": address})
    return post(client, {"id": message_id, "text": "hi"}, environ_base={"REMOTE_ADDR": address}, headers=headers)


def test_fresh_cookies_from_one_address_meet_the_address_limit(tmp_path, events):
    web = Web(settings_for(tmp_path, with_options("address_messages_per_minute = 2")))
    assert [post_from(web, "198.51.100.7", f"mint-{n:04d}").status_code for n in range(2)] == [200, 200]
    r = post_from(web, "198.51.100.7", "mint-0002")
    assert r.status_code == 429 and r.json["error"] == "more than 2 messages a minute from this address"
    assert 1 <= int(r.headers["Retry-After"]) <= 30 and rejected(events, 429) == [r.json["error"]]
    assert post_from(web, "198.51.100.8", "mint-0003").status_code == 200  # another address
    # IPv6: one host has a whole /64, so the /64 is the address; the next /64 is another one.
    assert [post_from(web, f"2001:db8:1:2::{n}", f"six-{n:04d}").status_code for n in range(1, 4)] == [200, 200, 429]
    assert post_from(web, "2001:db8:1:3::1", "six-0004").status_code == 200
    assert len(drain(web.publisher)) == 6


def test_the_address_is_the_one_a_trusted_proxy_reports_and_never_one_a_client_claims(tmp_path):
    web = Web(settings_for(tmp_path, with_options("address_messages_per_minute = 1"), TRUSTED_PROXIES="10.0.0.0/8"))
    # Behind the proxy: two clients, two addresses.
    assert post_from(web, "10.0.0.2", "proxied-01", X_Forwarded_For="203.0.113.1").status_code == 200
    assert post_from(web, "10.0.0.2", "proxied-02", X_Forwarded_For="203.0.113.2").status_code == 200
    assert post_from(web, "10.0.0.3", "proxied-03", X_Forwarded_For="203.0.113.2").status_code == 429
    # A client reaching the ingress directly cannot pick a new address per message.
    assert post_from(web, "198.51.100.9", "direct-01", X_Forwarded_For="203.0.113.50").status_code == 200
    assert post_from(web, "198.51.100.9", "direct-02", X_Forwarded_For="203.0.113.51").status_code == 429
    # Nor through the proxy: the proxy appends the address it saw; what the client wrote is left of it.
    assert post_from(web, "10.0.0.2", "spoofed-01", X_Forwarded_For="203.0.113.77, 198.51.100.9").status_code == 429


def test_the_channel_limit_holds_whoever_posts(tmp_path, events):
    web = Web(settings_for(tmp_path, with_options("channel_messages_per_minute = 3")))
    statuses = [post_from(web, f"198.51.100.{n}", f"chan-{n:04d}").status_code for n in range(1, 5)]
    assert statuses == [200, 200, 200, 429]
    assert rejected(events, 429) == ["more than 3 messages a minute on this channel"]
    assert len(drain(web.publisher)) == 3


@pytest.mark.parametrize("option", ["messages_per_minute", "address_messages_per_minute",
                                    "channel_messages_per_minute"])
@pytest.mark.parametrize("value", ["0", "-1", '"30"', "true", "inf", "nan"])
def test_bad_limits_are_config_errors(tmp_path, option, value):
    with pytest.raises(ConfigError, match=f"options.{option} must be a positive number"):
        build_channel(settings_for(tmp_path, with_options(f"{option} = {value}")).channel(WEB))


def test_limits_on_redis_are_all_or_nothing_and_say_which_one_refused():
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    limiter = RedisLimiter(REDIS_URL)
    channel = f"{WEB}-{uuid.uuid4().hex[:8]}"
    limits = WebChatChannel(ChannelConfig(channel, "webchat", "echo", "", {}, {"address_messages_per_minute": 1},
                                          SessionOptions()))
    try:
        first, second = limits.inbound_limits("visitor-a", "address-1"), limits.inbound_limits("visitor-b", "address-1")
        assert limiter.take(list(first)) == (0.0, None)
        wait, limited = limiter.take(list(second))
        assert wait > 0 and second[limited] == "more than 1 message a minute from this address"
        # The refusal took nothing: visitor b's bucket and the channel's are untouched.
        visitor_b, _, whole = list(second)
        assert client.hget(visitor_b.key, "tokens") is None
        assert float(client.hget(whole.key, "tokens")) == whole.burst - 1
    finally:
        client.delete(*(k for k in client.scan_iter(f"webchat-rl:{channel}*")))
        client.close()


# -- replies: the real turn, through the box -------------------------------------------------------------------------

def runner_for(settings: Settings, box: Any) -> TurnRunner:
    upgrade(settings.database_url)
    store = Store(settings.database_url)
    store.sync_channels(settings.channels.values())
    channels = {cid: (WebChatChannel(c, box=box) if c.platform == "webchat" else build_channel(c))
                for cid, c in settings.channels.items()}
    return TurnRunner(settings=settings, store=store, channels=channels,
                      agents={cid: load_agent(c.agent) for cid, c in settings.channels.items()},
                      agent_attempts=1, agent_backoff_s=0)


def test_two_visitors_each_get_only_their_own_replies_and_new_conversation_forgets(web):
    runner = runner_for(web.settings, reply_box(None))  # the app's box too: no REDIS_URL, the in-process one
    try:
        ana, ana_id = web.visitor()
        bruno, bruno_id = web.visitor()

        def say(client: Any, text: str | None = None) -> None:
            body = {"id": uuid.uuid4().hex, **({"text": text} if text else {"command": "new"})}
            assert post(client, body).status_code == 200
            for _, message in drain(web.publisher):
                runner.handle(InboundMessage.from_dict(message))

        say(ana, "my name is Ana")
        say(bruno, "my name is Bruno")
        say(ana, "what is my name?")
        say(bruno, "what is my name?")

        def agent_lines(client: Any, after: str | None = None) -> list[str]:
            query = f"?after={after}" if after else ""
            return [e["text"] for e in client.get(f"/chat/{WEB}/replies{query}").json["entries"]
                    if e["role"] == "agent"]

        assert agent_lines(ana)[-1] == "Your name is Ana." and not any("Bruno" in t for t in agent_lines(ana))
        assert agent_lines(bruno)[-1] == "Your name is Bruno." and not any("Ana" in t for t in agent_lines(bruno))

        cursor = ana.get(f"/chat/{WEB}/replies").json["cursor"]
        say(ana, None)  # "New conversation"
        say(ana, "what is my name?")
        assert agent_lines(ana, cursor) == [NEW_SESSION_REPLY, "You haven't told me your name yet."]
        assert ana.get(f"/chat/{WEB}/replies?after={cursor}").json["entries"][0]["role"] == "event"
        assert agent_lines(bruno)[-1] == "Your name is Bruno."  # untouched
        # The store agrees: Ana's session is in generation 2, Bruno's in 1, every reply marked sent.
        url = web.settings.database_url
        assert get_session(url, dm_key(WEB, ana_id)).generation == 2
        assert get_session(url, dm_key(WEB, bruno_id)).generation == 1
        _, lines = transcript(url, dm_key(WEB, ana_id))
        assert {line.delivery_status for line in lines if line.kind == "assistant"} == {"sent"}
    finally:
        engine_for(web.settings.database_url).dispose()


def test_a_visitor_back_after_the_counter_expired_is_numbered_and_ordered_again(tmp_path):
    """The ingress's per-session counter (real Redis) expires SEQ_TTL_S after its last number, so Redis keeps
    nothing of sessions that ended. A visitor who comes back later is numbered from 1 again, and the store starts
    the session's order over: the new messages are ordered like any others."""
    web = Web(settings_for(tmp_path), ledger=RedisLedger(REDIS_URL))
    runner = runner_for(web.settings, reply_box(None))
    redis_client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    client, pseudonym = web.visitor()
    counter = f"seq:{dm_key(WEB, pseudonym)}"

    def say(*texts: str) -> list[InboundMessage]:
        for text in texts:
            assert post(client, {"id": uuid.uuid4().hex, "text": text}).status_code == 200
        return [InboundMessage.from_dict(m) for _, m in drain(web.publisher)]

    try:
        for m in say("my name is Ana", "my order 48213 has not arrived"):
            assert runner.handle(m) == "replied"
        assert SEQ_TTL_S - 60 <= redis_client.ttl(counter) <= SEQ_TTL_S
        redis_client.expire(counter, 100)
        [third] = say("thanks")
        assert third.seq == 3 and SEQ_TTL_S - 60 <= redis_client.ttl(counter)  # every number renews it
        runner.handle(third)
        # A month of silence: the counter expires (really, in Redis); the session keeps its last_seq of 3.
        with engine_for(web.settings.database_url).begin() as c:
            c.execute(ChatSession.__table__.update().where(ChatSession.key == dm_key(WEB, pseudonym))
                      .values(last_activity_at=now() - timedelta(seconds=SEQ_RESTART_IDLE_S + 3600)))
        redis_client.pexpire(counter, 1)
        time.sleep(0.05)
        assert redis_client.exists(counter) == 0
        first, second = say("what is my name?", "where is my order?")
        assert (first.seq, second.seq) == (1, 2)
        assert runner.handle(second) == "queued"  # it waits for its predecessor, as in any session
        assert runner.handle(first) == "replied"
        agent = [e["text"] for e in client.get(f"/chat/{WEB}/replies").json["entries"] if e["role"] == "agent"]
        assert agent[-2] == "Your name is Ana." and "48213" in agent[-1]
        _, lines = transcript(web.settings.database_url, dm_key(WEB, pseudonym))
        assert [line.text for line in lines if line.kind == "user"][-2:] == ["what is my name?", "where is my order?"]
    finally:
        redis_client.delete(counter, *redis_client.scan_iter(f"seen:{WEB}:{pseudonym}:*"))
        redis_client.close()
        engine_for(web.settings.database_url).dispose()


def test_send_runs_the_fence_right_before_delivering(tmp_path):
    box = MemoryReplyBox()
    channel = WebChatChannel(load_channel(tmp_path), box=box)
    visitor = new_visitor_id()
    calls: list[int] = []

    class Checked:
        def check(self) -> None:
            calls.append(len(box.read(WEB, visitor)))  # nothing delivered yet when the fence is checked

    delivery = channel.send(visitor, DM, "hello", fence=Checked())
    assert delivery.ok and calls == [0] and [e.text for e in box.read(WEB, visitor)] == ["hello"]
    assert delivery.platform_message_ids == (box.read(WEB, visitor)[0].cursor,)

    class Lost:
        def check(self) -> None:
            raise LeaseLost("stale holder")

    with pytest.raises(LeaseLost):
        channel.send(visitor, DM, "must not arrive", fence=Lost())
    assert [e.text for e in box.read(WEB, visitor)] == ["hello"]
    assert channel.send(visitor, DM, "no fence").ok  # fence is optional


def test_send_reports_a_box_outage_as_a_failed_delivery(tmp_path, monkeypatch, events):
    monkeypatch.setattr("shared.channels.webchat.SEND_BACKOFF_S", 0)

    class Down:
        def push(self, *_a: Any, **_kw: Any) -> str:
            raise ConnectionError("redis down")

    fences: list[str] = []

    class Counted:
        def check(self) -> None:
            fences.append("x")

    delivery = WebChatChannel(load_channel(tmp_path), box=Down()).send(new_visitor_id(), DM, "hi", fence=Counted())
    assert not delivery.ok and "redis down" in delivery.error and delivery.attempts == 3
    assert len(fences) == 3  # checked again before every attempt
    assert len([e for e in events if e["event"] == "webchat.box_failed"]) == 3


def load_channel(tmp_path: Path):
    return settings_for(tmp_path).channel(WEB)


def test_channel_interface_and_options(tmp_path):
    config = load_channel(tmp_path)
    channel = build_channel(config)
    assert isinstance(channel, WebChatChannel) and channel.title == "Acme <b>support</b>" and channel.max_chars == 50
    with pytest.raises(InvalidSignature, match="posted to /chat/"):
        channel.receive(WebhookRequest("POST", {}))
    bad = CONFIG.replace("max_chars = 50", "max_chars = 0")
    with pytest.raises(ConfigError, match="max_chars"):
        build_channel(settings_for(tmp_path, bad).channel(WEB))
    assert not settings_for(tmp_path).channel(WEB).secrets


# -- the reply boxes -------------------------------------------------------------------------------------------------

@pytest.fixture(params=["memory", "redis"])
def box(request) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryReplyBox()
        return
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {REDIS_URL} is not reachable (start it, make setup): {exc}")
    real = RedisReplyBox(REDIS_URL, ttl_s=60, max_entries=20)
    yield real
    client.delete(*(k for k in client.scan_iter(f"webchat:{WEB}-*")))
    client.close()


def test_reply_box_reads_after_a_cursor_per_chat(box):
    channel = f"{WEB}-{uuid.uuid4().hex[:8]}"
    a, b = new_visitor_id(), new_visitor_id()
    first = box.push(channel, a, "user", "one", id="id-one-1")
    box.push(channel, b, "user", "other chat")
    box.push(channel, a, "agent", "two")
    entries = box.read(channel, a)
    assert [(e.role, e.text, e.id) for e in entries] == [("user", "one", "id-one-1"), ("agent", "two", None)]
    assert [e.text for e in box.read(channel, a, first)] == ["two"]
    assert box.read(channel, a, entries[-1].cursor) == []
    assert [e.text for e in box.read(channel, b)] == ["other chat"]
    assert box.read(channel, new_visitor_id()) == []
    box.push(channel, b, "user", "stamped", at=1234.5)  # the ingress stamps a visitor's line before publishing
    assert box.read(channel, b)[-1].at == 1234.5 and box.read(channel, b)[0].at > 1234.5


def test_redis_reply_box_is_capped_and_expires():
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    box = RedisReplyBox(REDIS_URL, ttl_s=30, max_entries=5)
    channel, visitor = f"{WEB}-{uuid.uuid4().hex[:8]}", new_visitor_id()
    try:
        for n in range(300):
            box.push(channel, visitor, "agent", f"reply {n}")
        key = box_key(channel, visitor)
        assert 0 < client.ttl(key) <= 30
        assert client.xlen(key) < 300  # trimmed (approximately, as Redis does it cheaply)
        assert box.read(channel, visitor)[-1].text == "reply 299"
    finally:
        client.delete(box_key(channel, visitor))
        client.close()


def test_chatsessions_ingress_refuses_bad_web_chat_options_before_gunicorn_starts(tmp_path, monkeypatch, capsys):
    from cli import main
    from shared.config import get_settings

    path = tmp_path / "channels.toml"
    path.write_text(with_options("channel_messages_per_minute = 0"))
    for name, value in {"CHATSESSIONS_CONFIG": str(path), "WC_TG_BOT_TOKEN": "1:t", "WC_TG_SECRET": "s"}.items():
        monkeypatch.setenv(name, value)
    started: list[list[str]] = []
    monkeypatch.setattr(main, "_exec", lambda argv: started.append(argv) or 0)
    get_settings.cache_clear()
    try:
        assert main.main(["ingress"]) == 2
    finally:
        get_settings.cache_clear()
    assert started == []
    assert "options.channel_messages_per_minute must be a positive number" in capsys.readouterr().err
