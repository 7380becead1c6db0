"""The session browser (/admin) through the real Flask app, over sessions made by the real turn (TurnRunner, the
demo Agent) on SQLite: off without ADMIN_TOKEN, 401 without the right token, and no secret on any page."""

from __future__ import annotations

import base64
import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import structlog
from structlog.testing import capture_logs

from cli.processes import free_port
from ingress.app import create_app
from ingress.ledger import MemoryLedger
from ingress.publisher import Publisher
from workers.agents import load_agent
from shared.config import Settings, load_settings
from shared.db import engine_for
from shared.logs import pseudonym
from shared.messages import DM, GROUP, NEW_SESSION, InboundMessage
from shared.migrate import upgrade
from workers.store import Store
from workers.testing import RecordingChannel
from workers.runner import TurnRunner

REPO = Path(__file__).resolve().parents[1]
TOKEN = "admin-token-Jq84kLz0-session-browser"
REDIS_URL = os.environ.get("BROWSER_REDIS_URL", "redis://127.0.0.1:6379/10")  # unique keys per test; never flushed
# Distinctive values, so a leak cannot hide behind a common word.
SECRETS = {
    "SB_WA_APP_SECRET": "wa-app-secret-R7c2Vx", "SB_WA_VERIFY_TOKEN": "wa-verify-K9d1Qe",
    "SB_WA_ACCESS_TOKEN": "wa-access-token-P3n8Hs", "SB_TG_BOT_TOKEN": "77:tg-bot-token-W2m5Yu",
    "SB_TG_SECRET": "tg-secret-token-B6t0Ga",
}
CONFIG = """
partitions = 16

[[channels]]
id = "wa"
platform = "whatsapp"
agent = "demo"
secrets = { app_secret = "SB_WA_APP_SECRET", verify_token = "SB_WA_VERIFY_TOKEN", access_token = "SB_WA_ACCESS_TOKEN" }
options = { phone_number_id = "106540352242922" }

[[channels]]
id = "tg"
platform = "telegram"
agent = "demo"
secrets = { bot_token = "SB_TG_BOT_TOKEN", secret_token = "SB_TG_SECRET" }
options = { bot_username = "AcmeBot" }

[[channels]]
id = "web"
platform = "webchat"
agent = "demo"
"""
ANA = "5511900000001"
BRUNO = "5511900000002"
GROUP_ID = "120363000000000777@g.us"
_ids = itertools.count(1)


def settings_for(tmp_path: Path, **env: str) -> Settings:
    path = tmp_path / "channels.toml"
    path.write_text(CONFIG)
    return load_settings({"CHATSESSIONS_CONFIG": str(path), "BROKER_URL": "memory://localhost/",
                          "DATABASE_URL": f"sqlite:///{tmp_path}/browser.db", **SECRETS, **env})


def seed(settings: Settings) -> None:
    """Sessions made by the real turn: Ana's WhatsApp DM (two generations), a group, a Telegram DM."""
    url = settings.database_url
    upgrade(url)
    store = Store(url)
    store.sync_channels(settings.channels.values())
    runner = TurnRunner(settings, store, {cid: RecordingChannel(c) for cid, c in settings.channels.items()},
                        {cid: load_agent(c.agent) for cid, c in settings.channels.items()},
                        agent_attempts=1, agent_backoff_s=0)
    seqs: dict[str, int] = {}

    def say(channel: str, kind: str, chat: str, sender: str, name: str, text: str) -> None:
        key = f"{channel}:{kind}:{chat}"
        seqs[key] = seqs.get(key, 0) + 1
        runner.handle(InboundMessage(
            channel_id=channel, platform=settings.channel(channel).platform, session_key=key, chat_id=chat,
            chat_kind=kind, sender_id=sender, sender_name=name, text=text,
            platform_message_id=f"sb.{next(_ids)}", sent_at=time.time(),
            command=NEW_SESSION if text == "/new" else None, seq=seqs[key]))

    say("wa", DM, ANA, ANA, "Ana Souza", "my name is Ana <script>alert(1)</script>")
    say("wa", DM, ANA, ANA, "Ana Souza", "/new")
    say("wa", DM, ANA, ANA, "Ana Souza", "what is my name?")
    say("wa", GROUP, GROUP_ID, ANA, "Ana Souza", "my order 48213 is late")
    say("wa", GROUP, GROUP_ID, BRUNO, "Bruno Lima", "me too")
    say("tg", DM, "381920001", "381920001", "Chen", "hello")
    engine_for(url).dispose()


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    saved = structlog.get_config()
    structlog.configure(cache_logger_on_first_use=False)
    with capture_logs() as captured:
        yield captured
    structlog.configure(**saved)


def app_for(settings: Settings) -> Any:
    return create_app(settings, Publisher(settings, ledger=MemoryLedger())).test_client()


@pytest.fixture
def admin(tmp_path) -> Iterator[Any]:
    settings = settings_for(tmp_path, ADMIN_TOKEN=TOKEN)
    seed(settings)
    yield app_for(settings)
    engine_for(settings.database_url).dispose()


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


PAGES = ["/admin/", "/admin/sessions", "/admin/sessions?channel=wa", "/admin/sessions?status=active",
         f"/admin/sessions/wa:dm:{ANA}", f"/admin/sessions/wa:group:{GROUP_ID}", f"/admin/users?user={ANA}",
         "/admin/users", "/admin/static/browser.css"]


def get(client: Any, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
    with client.get(path, headers=headers or {}) as r:
        return r.status_code, r.get_data(as_text=True), r.headers


# -- off unless configured; authentication ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", PAGES)
def test_off_without_admin_token(tmp_path, path):
    client = app_for(settings_for(tmp_path))
    for headers in ({}, bearer(), bearer(""), basic("x", "")):
        assert get(client, path, headers)[0] == 404


@pytest.mark.parametrize("path", PAGES)
def test_every_page_needs_the_token(admin, events, path):
    for headers, reason in [({}, "no credentials"), (bearer("wrong"), "wrong password or token (bearer)"),
                            (basic("lead", "wrong"), "wrong password or token (basic)"), (bearer(TOKEN + "x"), "wrong password or token"),
                            ({"Authorization": f"Token {TOKEN}"}, "unsupported scheme")]:
        status, body, response_headers = get(admin, path, headers)
        assert status == 401, (path, headers)
        assert response_headers["WWW-Authenticate"].startswith("Basic realm=")
        assert "Ana" not in body and TOKEN not in body
        assert any(e["event"] == "browser.denied" and e["reason"].startswith(reason) for e in events), reason
    assert TOKEN not in repr(events)  # a presented token is never logged


@pytest.mark.parametrize("headers", [bearer(), basic("any-user", TOKEN), basic("", TOKEN)])
def test_the_token_by_bearer_or_basic_auth(admin, headers):
    status, body, response_headers = get(admin, "/admin/", headers)
    assert status == 200 and "<h1>Channels</h1>" in body
    assert response_headers["Cache-Control"] == "no-store"
    assert "frame-ancestors 'none'" in response_headers["Content-Security-Policy"]


def test_the_admin_token_is_read_once_into_settings_and_not_shown(tmp_path):
    settings = settings_for(tmp_path, ADMIN_TOKEN=TOKEN)
    assert settings.admin_token == TOKEN and TOKEN not in repr(settings)
    assert settings_for(tmp_path, ADMIN_TOKEN="").admin_token is None


def from_address(client: Any, path: str, address: str, headers: dict[str, str]) -> tuple[int, Any]:
    with client.get(path, headers=headers, environ_base={"REMOTE_ADDR": address}) as r:
        return r.status_code, r.headers


@pytest.mark.parametrize("shared", [False, True], ids=["in-process", "redis"])
def test_failed_logins_are_limited_per_client_address(tmp_path, events, shared):
    """After FAILED_LOGINS wrong tokens an address gets 429 (with Retry-After), even with the right token; other
    addresses, requests without credentials and successful logins are not affected. With REDIS_URL the count is
    shared by every ingress process."""
    from ingress.browser import FAILED_LOGIN_WINDOW_S, FAILED_LOGINS

    settings = settings_for(tmp_path, ADMIN_TOKEN=TOKEN, **({"REDIS_URL": REDIS_URL} if shared else {}))
    seed(settings)
    one, other = app_for(settings), app_for(settings) if shared else None
    attacker, lead, browser = (f"10.{n}.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}" for n in range(3))
    for _ in range(FAILED_LOGINS + 2):  # a lead at work, and a browser's first requests (no credentials)
        assert from_address(one, "/admin/", lead, bearer())[0] == 200
        assert from_address(one, "/admin/", browser, {})[0] == 401
    for n in range(FAILED_LOGINS):
        assert from_address(other or one, "/admin/", attacker, basic("x", f"guess-{n}"))[0] == 401
    status, headers = from_address(one, "/admin/", attacker, basic("x", "one more"))
    assert status == 429 and 1 <= int(headers["Retry-After"]) <= FAILED_LOGIN_WINDOW_S
    assert headers["Cache-Control"] == "no-store"
    assert from_address(one, f"/admin/sessions/wa:dm:{ANA}", attacker, bearer())[0] == 429  # even the right token
    assert from_address(one, "/admin/", lead, bearer())[0] == 200
    assert from_address(one, "/admin/", browser, bearer())[0] == 200
    limited = [e for e in events if e["event"] == "browser.login_limited"]
    assert len(limited) == 2 and {e["remote"] for e in limited} == {attacker}
    assert sum(e["event"] == "browser.denied" and e["remote"] == attacker for e in events) == FAILED_LOGINS


def test_views_are_logged_with_the_session_key_and_searched_id_only_where_they_are_pseudonymized(admin, events):
    """A transcript's path holds its session key, a search's query the user id: log lines name the page by its route
    and carry those as `session_key` and `user` only, fields shared/logs.py replaces by their pseudonyms."""
    from shared.logs import PERSONAL_IDS

    assert get(admin, f"/admin/sessions/wa:dm:{ANA}", bearer())[0] == 200
    assert get(admin, f"/admin/users?user={ANA}%20", bearer())[0] == 200
    assert get(admin, f"/admin/sessions/wa:dm:{ANA}?page=2", bearer("wrong"))[0] == 401
    assert get(admin, "/admin/users?user=" + ANA * 20, bearer())[0] == 400
    logged = [e for e in events if e["event"].startswith("browser.") or e["event"] == "ingress.rejected"]
    assert [e["event"] for e in logged] == ["browser.viewed", "browser.viewed", "browser.denied", "browser.viewed",
                                           "ingress.rejected"]
    for line in logged:
        assert ANA not in repr({k: v for k, v in line.items() if k not in PERSONAL_IDS}), line
    transcript, search, denied = logged[:3]
    assert transcript["page"] == "/admin/sessions/<path:key>" and transcript["session_key"] == f"wa:dm:{ANA}"
    assert search["page"] == "/admin/users" and search["user"] == ANA
    assert denied["session_key"] == f"wa:dm:{ANA}" and denied["query"] == {"page": "2"}


def test_the_console_on_its_own_address_knows_the_client_behind_a_trusted_proxy(tmp_path):
    """`chatsessions admin` behind a load balancer: the login limit counts the lead's address, not the proxy's,
    and a request that reached the proxy over TLS gets HSTS."""
    from ingress.browser import FAILED_LOGINS, create_app

    settings = settings_for(tmp_path, ADMIN_TOKEN=TOKEN, TRUSTED_PROXIES="127.0.0.1")
    seed(settings)
    client = create_app(settings).test_client()

    def via_proxy(client_address: str, headers: dict[str, str]) -> int:
        forwarded = {"X-Forwarded-For": client_address, "X-Forwarded-Proto": "https", **headers}
        with client.get("/admin/", headers=forwarded, environ_base={"REMOTE_ADDR": "127.0.0.1"}) as r:
            assert "Strict-Transport-Security" in r.headers
            return r.status_code

    for n in range(FAILED_LOGINS):
        assert via_proxy("203.0.113.7", basic("x", f"guess-{n}")) == 401
    assert via_proxy("203.0.113.7", bearer()) == 429
    assert via_proxy("198.51.100.2", bearer()) == 200  # another lead behind the same proxy


def test_hsts_over_tls_only(admin):
    with admin.get("/admin/", headers=bearer(), base_url="https://admin.example") as r:
        assert r.status_code == 200 and r.headers["Strict-Transport-Security"] == "max-age=31536000"
    with admin.get("/admin/", base_url="https://admin.example") as r:
        assert r.status_code == 401 and "Strict-Transport-Security" in r.headers
    with admin.get("/admin/", headers=bearer()) as r:
        assert r.status_code == 200 and "Strict-Transport-Security" not in r.headers


def test_the_console_on_its_own_address(tmp_path):
    """ADMIN_BIND: `chatsessions admin` serves the browser there (gunicorn, only the browser), the ingress has no
    /admin at all."""
    port = free_port()
    env = {"ADMIN_TOKEN": TOKEN, "ADMIN_BIND": f"127.0.0.1:{port}"}
    settings = settings_for(tmp_path, **env)
    seed(settings)
    ingress = app_for(settings)
    for path in PAGES:
        assert get(ingress, path, bearer())[0] == 404
    full = {**os.environ, **SECRETS, **env, "CHATSESSIONS_CONFIG": str(settings.config_path),
            "DATABASE_URL": settings.database_url, "BROKER_URL": "memory://localhost/"}
    console = subprocess.Popen([sys.executable, "-m", "cli", "admin"], env=full, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                first = requests.get(f"{base}/", headers=bearer(), timeout=15)
                break
            except requests.ConnectionError:
                assert console.poll() is None and time.monotonic() < deadline, "chatsessions admin did not start"
                time.sleep(0.1)
        assert first.status_code == 200 and "<h1>Channels</h1>" in first.text  # / leads to /admin/
        assert requests.get(f"{base}/admin/sessions/wa:dm:{ANA}", headers=bearer(), timeout=5).status_code == 200
        assert requests.get(f"{base}/admin/", timeout=5).status_code == 401
        assert requests.post(f"{base}/webhooks/wa", timeout=5).status_code == 404  # nothing but the browser
    finally:
        console.terminate()
        output = console.communicate(timeout=30)[0]
    assert f"Listening at: {base}" in output and "browser.viewed" in output
    assert ANA not in output  # its transcript was viewed: the log line has the session's pseudonym


# -- what the pages show ---------------------------------------------------------------------------------------------

def test_channels_and_recent_sessions(admin):
    _, html, _ = get(admin, "/admin/", bearer())
    for channel, platform in (("wa", "whatsapp"), ("tg", "telegram"), ("web", "webchat")):
        assert f'<a href="/admin/sessions?channel={channel}">{channel}</a>' in html
        assert f"<td>{platform}</td>" in html
    assert f"wa:dm:{ANA}" in html and f"wa:group:{GROUP_ID}" in html and "tg:dm:381920001" in html


def test_sessions_are_paged_and_filtered(admin, monkeypatch):
    _, html, _ = get(admin, "/admin/sessions", bearer())
    assert "3 sessions" in html and html.count('<span class="status active">active</span>') == 3
    _, html, _ = get(admin, "/admin/sessions?channel=tg", bearer())
    assert "1 session," in html and "tg:dm:381920001" in html and f"wa:dm:{ANA}" not in html
    monkeypatch.setattr("ingress.browser.PAGE_SIZE", 2)
    _, first, _ = get(admin, "/admin/sessions", bearer())
    _, second, _ = get(admin, "/admin/sessions?page=2", bearer())
    assert "page 1 of 2" in first and 'rel="next" href="/admin/sessions?page=2"' in first
    assert "page 2 of 2" in second and 'rel="prev"' in second
    keys = {k for k in (f"wa:dm:{ANA}", f"wa:group:{GROUP_ID}", "tg:dm:381920001") if k in first + second}
    assert len(keys) == 3
    assert get(admin, "/admin/sessions?page=9", bearer())[0] == 404
    assert get(admin, "/admin/sessions?status=bogus", bearer())[0] == 400
    assert get(admin, "/admin/sessions?channel=nope", bearer())[0] == 404


def test_transcript_shows_generations_events_and_escapes_text(admin, tmp_path):
    status, html, _ = get(admin, f"/admin/sessions/wa:dm:{ANA}", bearer())
    assert status == 200
    in_logs = pseudonym(settings_for(tmp_path).secret_key, f"wa:dm:{ANA}")  # what to grep the logs for
    assert f'<dt>In the logs</dt><dd><code class="pseudonym">{in_logs}</code></dd>' in html
    assert "Generation 1" in html and "Generation 2 (current)" in html
    g1, g2 = html.split('id="g1"')[1].split('id="g2"')
    assert "created" in g1 and "my name is Ana &lt;script&gt;alert(1)&lt;/script&gt;" in g1
    assert "<script>" not in html
    assert "new_session" in g2 and "what is my name?" in g2 and "You haven&#39;t told me your name yet." in g2
    assert g2.index("new_session") < g2.index("what is my name?")
    assert '<span class="delivery sent">sent</span>' in html
    _, group, _ = get(admin, f"/admin/sessions/wa:group:{GROUP_ID}", bearer())
    assert "Ana Souza" in group and "Bruno Lima" in group
    assert get(admin, "/admin/sessions/wa:dm:nobody", bearer())[0] == 404


def test_search_by_user_id(admin):
    _, html, _ = get(admin, f"/admin/users?user={ANA}", bearer())
    assert f'href="/admin/sessions/wa:dm:{ANA}"' in html
    assert f'href="/admin/sessions/wa:group:{GROUP_ID}"' in html  # a group Ana wrote in
    assert "tg:dm:381920001" not in html
    _, html, _ = get(admin, "/admin/users?user=0000", bearer())
    assert html.count("None.") == 2
    assert get(admin, "/admin/users?user=" + "9" * 201, bearer())[0] == 400


def test_no_secret_on_any_page(admin):
    for path in PAGES:
        status, body, headers = get(admin, path, bearer())
        assert status == 200, path
        shown = body + str(headers)
        leaked = [name for name, value in SECRETS.items() if value in shown]
        assert not leaked and TOKEN not in shown, (path, leaked)
        assert "106540352242922" not in shown  # no channel options either
