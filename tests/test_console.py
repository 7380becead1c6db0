"""The operator console (/admin/console and a session's actions) through the real Flask app over sessions made by
the real turn: named accounts with roles, CSRF, one owner, replies through the publisher, the audit log and its
commands. The same console in real Chromium against the whole stack: tests/browser/test_console_browser.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingress.app import create_app
from ingress.console import csrf_token
from ingress.ledger import MemoryLedger
from ingress.publisher import Publisher
from shared import accounts, audit, handoff
from shared.config import Settings, load_settings
from shared.db import engine_for
from shared.errors import ConfigError
from shared.messages import OPERATOR_REPLY
from shared.models import AGENT, HUMAN
from shared.transcripts import transcript
from test_session_browser import ANA, CONFIG, REPO, SECRETS, TOKEN, basic, bearer, seed

KEY = f"wa:dm:{ANA}"
PASSWORDS = {"alice": "alice-password-9Hd2", "bob": "bob-password-4Kw8", "vera": "vera-password-7Qp1"}
ROLES = {"alice": "operator", "bob": "operator", "vera": "viewer"}
HASHES = {name: accounts.hash_password(pw) for name, pw in PASSWORDS.items()}  # scrypt: made once for the module


def operators_toml() -> str:
    return "".join(f'\n[[operators]]\nname = "{n}"\nrole = "{ROLES[n]}"\npassword_hash = "{HASHES[n]}"\n'
                   for n in PASSWORDS)


def console_settings(tmp_path: Path, **env: str) -> Settings:
    path = tmp_path / "channels.toml"
    path.write_text(CONFIG + operators_toml())
    return load_settings({"CHATSESSIONS_CONFIG": str(path), "BROKER_URL": "memory://localhost/",
                          "DATABASE_URL": f"sqlite:///{tmp_path}/console.db", **SECRETS, **env})


class Console:
    """The app's test client, logged in as anyone, with what the publisher was given."""

    def __init__(self, settings: Settings):
        self.settings = settings
        publisher = Publisher(settings, ledger=MemoryLedger())
        self.published: list[Any] = []
        publish = publisher.publish

        def recording(messages, **kw):
            count = publish(messages, **kw)  # the real publisher (in-memory broker): its checks and its errors
            self.published.extend(messages)
            return count

        publisher.publish = recording
        self.client = create_app(settings, publisher).test_client()

    def get(self, path: str, who: str) -> Any:
        return self.client.get(path, headers=self.auth(who))

    def auth(self, who: str) -> dict[str, str]:
        return bearer() if who == "admin" else basic(who, PASSWORDS[who])

    def csrf(self, who: str) -> str:
        page = self.get(f"/admin/sessions/{KEY}", who).get_data(as_text=True)
        return re.search(r'name="csrf" value="([^"]+)"', page).group(1)

    def post(self, action: str, who: str, csrf: str | None = "page", **form: str) -> Any:
        if csrf == "page":
            csrf = accounts_csrf(self.settings, who)
        data = {"key": KEY, **form, **({"csrf": csrf} if csrf is not None else {})}
        return self.client.post(f"/admin/console/{action}", data=data, headers=self.auth(who))


def accounts_csrf(settings: Settings, who: str) -> str:
    """An operator's CSRF token, as their pages carry it."""
    return csrf_token(settings.secret_key, settings.operators[who])


@pytest.fixture
def console(tmp_path) -> Iterator[Console]:
    settings = console_settings(tmp_path, ADMIN_TOKEN=TOKEN)
    seed(settings)
    yield Console(settings)
    engine_for(settings.database_url).dispose()


def mode(settings: Settings) -> tuple[str, str | None]:
    summary, _ = transcript(settings.database_url, KEY)
    return summary.mode, summary.operator


# -- accounts ----------------------------------------------------------------------------------------------------------

def test_passwords_are_stored_as_scrypt_hashes_and_checked():
    stored = HASHES["alice"]
    assert stored.startswith("scrypt$16384$8$1$") and PASSWORDS["alice"] not in stored
    assert accounts.check_password(PASSWORDS["alice"], stored)
    assert not accounts.check_password(PASSWORDS["bob"], stored)
    assert not accounts.check_password(PASSWORDS["alice"], "scrypt$1$1$1$AA==$AA==")  # too weak to trust
    assert not accounts.check_password(PASSWORDS["alice"], "plain-text")
    assert accounts.hash_password("same password 1") != accounts.hash_password("same password 1")  # salted


@pytest.mark.parametrize("entry, message", [
    ('name = "ana"\nrole = "boss"', "role must be one of viewer, operator, admin"),
    ('name = "ana"', "password_hash is required"),
    ('name = "ana"\npassword_hash = "md5$abc"', "password_hash is not a scrypt hash"),
    ('name = "admin"\npassword_hash = "{h}"', "the name 'admin' is ADMIN_TOKEN's account"),
    ('name = "_x"\npassword_hash = "{h}"', "name must be 1-100 letters"),
    ('name = "ana"\npassword = "secret"\npassword_hash = "{h}"', "unknown key(s) password"),
])
def test_bad_operator_entries_are_refused_with_a_clear_message(tmp_path, entry, message):
    path = tmp_path / "channels.toml"
    path.write_text(CONFIG + "\n[[operators]]\n" + entry.replace("{h}", HASHES["alice"]) + "\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings({"CHATSESSIONS_CONFIG": str(path), **SECRETS})


def test_two_entries_of_one_name_are_refused(tmp_path):
    path = tmp_path / "channels.toml"
    path.write_text(CONFIG + operators_toml() + operators_toml())
    with pytest.raises(ConfigError, match="operator 'alice' appears twice"):
        load_settings({"CHATSESSIONS_CONFIG": str(path), **SECRETS})


def test_operators_log_in_with_their_own_password_only(tmp_path):
    settings = console_settings(tmp_path)  # no ADMIN_TOKEN: the accounts alone turn the console on
    seed(settings)
    c = Console(settings)
    page = c.get("/admin/console", "alice")
    assert page.status_code == 200 and "alice · operator" in page.get_data(as_text=True)
    assert c.client.get("/admin/console", headers=basic("alice", PASSWORDS["bob"])).status_code == 401
    assert c.client.get("/admin/console", headers=basic("nobody", PASSWORDS["alice"])).status_code == 401
    assert c.client.get("/admin/console", headers=bearer()).status_code == 401  # no ADMIN_TOKEN configured


# -- roles, CSRF, one owner ----------------------------------------------------------------------------------------------

def test_a_viewer_reads_but_cannot_take_over_reply_or_hand_back(console):
    page = console.get(f"/admin/sessions/{KEY}", "vera").get_data(as_text=True)
    assert "what is my name?" in page and 'id="takeover"' not in page and "reply-text" not in page
    for action in ("takeover", "reply", "handback"):
        r = console.post(action, "vera", text="hello")
        assert r.status_code == 403 and "the viewer role cannot" in r.get_data(as_text=True)
    assert mode(console.settings) == (AGENT, None) and console.published == []
    assert audit.entries(console.settings.database_url) == []


def test_a_post_without_the_right_csrf_token_or_from_another_site_is_refused(console):
    alices = console.csrf("alice")
    for kwargs in ({"csrf": None}, {"csrf": "forged"}, {"csrf": accounts_csrf(console.settings, "bob")}):
        r = console.post("takeover", "alice", **kwargs)
        assert r.status_code == 403 and "CSRF" in r.get_data(as_text=True)
    r = console.client.post("/admin/console/takeover", data={"key": KEY, "csrf": alices},
                            headers={**console.auth("alice"), "Origin": "https://evil.example"})
    assert r.status_code == 403
    r = console.client.post("/admin/console/takeover", data={"key": KEY, "csrf": alices},
                            headers={**console.auth("alice"), "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    assert mode(console.settings) == (AGENT, None)
    r = console.client.post("/admin/console/takeover", data={"key": KEY, "csrf": alices},
                            headers={**console.auth("alice"), "Origin": "http://localhost"})
    assert r.status_code == 303 and mode(console.settings) == (HUMAN, "alice")


def test_the_second_operator_is_told_who_has_the_session(console):
    r = console.post("takeover", "alice")
    assert r.status_code == 303 and r.headers["Location"].endswith(f"/admin/sessions/{KEY}?done=takeover")
    page = console.get(f"/admin/sessions/{KEY}?done=takeover", "alice").get_data(as_text=True)
    assert "You have this conversation" in page and 'id="reply-text"' in page and 'id="handback"' in page
    r = console.post("takeover", "bob")
    assert r.status_code == 409 and "alice has this conversation" in r.get_data(as_text=True)
    assert console.post("reply", "bob", text="me too").status_code == 409
    assert console.post("handback", "bob").status_code == 409  # an operator hands back only their own
    assert mode(console.settings) == (HUMAN, "alice") and console.published == []


def test_a_reply_goes_to_the_publisher_with_the_operator_and_the_audit_log(console):
    console.post("takeover", "alice")
    r = console.post("reply", "alice", text="  Hi Ana, Alice here.  ")
    assert r.status_code == 303 and r.headers["Location"].endswith("?done=reply")
    [message] = console.published
    assert (message.command, message.session_key, message.sender_name, message.text) == (
        OPERATOR_REPLY, KEY, "alice", "Hi Ana, Alice here.")
    assert console.post("reply", "alice", text="   ").status_code == 400  # nothing queued for an empty reply
    assert len(console.published) == 1
    entries = audit.entries(console.settings.database_url)
    assert [(e.actor, e.action, e.session_key, e.via) for e in entries] == [
        ("alice", "reply", KEY, "console"), ("alice", "taken_over", KEY, "console")]
    assert message.platform_message_id in entries[0].detail


def test_an_admin_hands_back_anyones_session(console):
    console.post("takeover", "alice")
    admin_csrf = console.csrf("admin")
    r = console.client.post("/admin/console/handback", data={"key": KEY, "csrf": admin_csrf},
                            headers=console.auth("admin"))
    assert r.status_code == 303 and mode(console.settings) == (AGENT, None)
    assert [(e.actor, e.action) for e in audit.entries(console.settings.database_url)][0] == ("admin", "returned")


def test_the_live_parts_show_the_mode_and_the_queue_without_the_page(console):
    handoff.take_over(console.settings.database_url, KEY, "bob")
    part = console.get(f"/admin/sessions/{KEY}?live=1", "alice").get_data(as_text=True)
    assert "<html" not in part and "With <strong class=\"operator\">bob</strong>" in part
    assert "what is my name?" in part
    queue = console.get("/admin/console?live=1", "alice").get_data(as_text=True)
    assert "<html" not in queue and "With other operators (1)" in queue and KEY in queue
    assert "My conversations (0)" in console.get("/admin/console", "alice").get_data(as_text=True)


def test_unknown_actions_and_sessions(console):
    assert console.post("delete", "alice").status_code == 404
    r = console.client.post("/admin/console/takeover", data={"key": "wa:dm:nobody",
                                                            "csrf": accounts_csrf(console.settings, "alice")},
                            headers=console.auth("alice"))
    assert r.status_code == 404


# -- the commands --------------------------------------------------------------------------------------------------------

def cli(settings: Settings, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "CHATSESSIONS_CONFIG": str(settings.config_path),
           "DATABASE_URL": settings.database_url, **SECRETS}
    return subprocess.run([sys.executable, "-m", "cli", *argv], env=env, cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


def test_audit_prints_what_operators_did(console):
    url = console.settings.database_url
    handoff.take_over(url, KEY, "alice")
    console.post("reply", "alice", text="on it")
    handoff.hand_back(url, KEY, "alice", operator="alice")
    done = cli(console.settings, "audit", "--json")
    assert done.returncode == 0, done.stderr
    rows = [(e["actor"], e["action"], e["via"]) for e in json.loads(done.stdout)["entries"]]
    assert rows == [("alice", "returned", "cli"), ("alice", "reply", "console"), ("alice", "taken_over", "cli")]
    table = cli(console.settings, "audit", "--operator", "alice", "--limit", "1")
    assert table.returncode == 0 and "returned" in table.stdout and "taken_over" not in table.stdout
    assert cli(console.settings, "audit", "--operator", "bob").returncode == 1  # nothing found


def test_erasing_a_user_blanks_their_session_in_the_audit_log(console):
    from shared.privacy import erase_user

    handoff.take_over(console.settings.database_url, KEY, "alice")
    erase_user(console.settings.database_url, ANA)
    [entry] = audit.entries(console.settings.database_url)
    assert (entry.actor, entry.action, entry.session_key) == ("alice", "taken_over", audit.ERASED_KEY)


def test_hash_password_and_list_operators(console, tmp_path):
    made = cli(console.settings, "operators", "hash-password", stdin="a long enough password\n")
    assert made.returncode == 0, made.stderr
    stored = re.fullmatch(r'password_hash = "(scrypt\$[^"]+)"\n', made.stdout).group(1)
    assert accounts.check_password("a long enough password", stored)
    short = cli(console.settings, "operators", "hash-password", stdin="short\n")
    assert short.returncode == 2 and "at least 12 characters" in short.stderr
    listed = cli(console.settings, "operators", "list", "--json")
    assert json.loads(listed.stdout)["operators"] == [{"name": n, "role": ROLES[n]} for n in PASSWORDS]
    assert HASHES["alice"] not in listed.stdout
