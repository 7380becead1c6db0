"""`chatsessions demo` end to end (a subprocess), and the payload builders it shares with tests and load generators."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from channel_helpers import FIXTURE_NOW, fixture, fixture_bytes, make_config
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cli import demo
from cli.standins import payloads as p
from shared.channels import WebhookRequest, build_channel
from shared.errors import InvalidSignature
from shared.messages import DM, GROUP, NEW_SESSION

REPO = Path(__file__).resolve().parents[1]
PHONE_ID = "106540352242922"


def request(body: bytes, headers: dict[str, str]) -> WebhookRequest:
    return WebhookRequest("POST", {k.lower(): v for k, v in headers.items()}, body=body)


def at_fixture_time(channel):
    """The adapter with the clock the fixtures were written for (it refuses messages older than the replay window)."""
    channel.now = lambda: FIXTURE_NOW
    return channel


def same_message(built, real) -> None:
    """Two normalized messages agree on everything but the send time."""
    assert dataclasses.replace(built, sent_at=0.0) == dataclasses.replace(real, sent_at=0.0)


# -- the demo, as a user runs it --------------------------------------------------------------------------------------

def test_demo_plays_every_platform_and_passes_the_isolation_check(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("CHATSESSIONS_CONFIG", "DATABASE_URL", "BROKER_URL", "REDIS_URL", "LOG_LEVEL", "PARTITIONS")}
    done = subprocess.run([sys.executable, "-m", "cli", "demo"], check=False, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=90)
    out = done.stdout
    assert done.returncode == 0, f"stdout:\n{out}\nstderr:\n{done.stderr}"
    for key in ("acme-whatsapp:dm:5511987650001", "acme-whatsapp:dm:5511987650002",
                f"acme-whatsapp:group:{demo.WA_GROUP}", "acme-telegram:group:-4012345678",
                "acme-discord:group:1290000000000000001"):
        assert f"session {key}  [active, generation 1]" in out
    assert "session acme-telegram:dm:381920001  [active, generation 2]" in out
    assert "-- new_session (generation 2)" in out
    assert "g2   Agent: You haven't told me your name yet." in out
    assert "Eve: Hi, my order 90412 was charged twice" in out  # Discord, through the gateway
    for line in ("PASS  Bruno's replies never mention Ana or her order 48213",
                 "PASS  Ana's replies never mention Bruno's order 77120",
                 "PASS  after /new, the Agent no longer knows Chen's name",
                 "PASS  every reply mentions only order numbers said in its own session"):
        assert line in out
    assert "FAIL" not in out
    assert not (REPO / "chatsessions-demo.db").exists()  # only --keep leaves a database behind


def test_isolation_check_fails_on_a_leak():
    replies = {key: [] for key in demo.CHATS}
    said = {key: [] for key in demo.CHATS}
    for key, member, text in demo.SCRIPT:
        said[key].append(text)
        replies[key].append("Started a new conversation." if text == "/new" else f"{member} ok")
    replies["bruno"][-1] = "Bruno, your order 48213 is on its way"  # Ana's order in Bruno's session
    results = {what: ok for ok, what in demo._checks(replies, said)}
    assert results["Bruno's replies never mention Ana or her order 48213"] is False
    assert not any(ok for what, ok in results.items() if what.startswith("every reply mentions only"))


# -- payload builders: they parse through the real adapters like the real fixtures ------------------------------------

def test_whatsapp_dm_matches_the_fixture_and_verifies():
    channel = at_fixture_time(build_channel(make_config("whatsapp", "acme-whatsapp", app_secret="s3cret")))
    payload = p.whatsapp_text(PHONE_ID, "5511987650001", "Ana Souza", "Hi, my order 48213 has not arrived",
                              "wamid.HBgNNTUxMTk4NzY1MDAwMRUCABIYFjNFQjBDMEEzNTM5QjE4OUIyQTk0NkQA")
    body = p.encode(payload)
    channel.verify(request(body, p.sign_whatsapp(body, "s3cret")))
    with pytest.raises(InvalidSignature):
        channel.verify(request(body, p.sign_whatsapp(body, "other")))
    with pytest.raises(InvalidSignature):
        channel.verify(request(body + b" ", p.sign_whatsapp(body, "s3cret")))
    [built], [real] = channel.parse(body), channel.parse(fixture_bytes("whatsapp", "dm_text"))
    same_message(built, real)
    assert built.session_key == "acme-whatsapp:dm:5511987650001" and built.chat_kind == DM


def test_whatsapp_group_matches_the_fixture():
    channel = at_fixture_time(build_channel(make_config("whatsapp", "acme-whatsapp")))
    real_msg = fixture("whatsapp", "group_text")["entry"][0]["changes"][0]["value"]["messages"][0]
    body = p.encode(p.whatsapp_text(PHONE_ID, "5511987650002", "Bruno Lima", real_msg["text"]["body"], real_msg["id"],
                                    group_id=real_msg["group_id"]))
    [built], [real] = channel.parse(body), channel.parse(fixture_bytes("whatsapp", "group_text"))
    same_message(built, real)
    assert built.session_key == f"acme-whatsapp:group:{real_msg['group_id']}" and built.chat_kind == GROUP


@pytest.mark.parametrize("name, chat_type, kind, title", [
    ("private_text", "private", DM, None),
    ("private_command_new", "private", DM, None),
    ("group_text", "group", GROUP, "Acme beta testers"),
])
def test_telegram_matches_the_fixtures_and_verifies(name, chat_type, kind, title):
    channel = at_fixture_time(build_channel(make_config("telegram", "acme-telegram", secret_token="tok")))
    real = fixture("telegram", name)
    m = real["message"]
    body = p.encode(p.telegram_text(m["chat"]["id"], chat_type, m["from"]["id"], m["from"]["first_name"], m["text"],
                                    m["message_id"], real["update_id"], title=title))
    channel.verify(request(body, p.telegram_headers("tok")))
    with pytest.raises(InvalidSignature):
        channel.verify(request(body, p.telegram_headers("wrong")))
    [built], [parsed] = channel.parse(body), channel.parse(json.dumps(real).encode())
    same_message(built, parsed)
    assert built.session_key == f"acme-telegram:{kind}:{m['chat']['id']}"
    assert (built.command == NEW_SESSION) == (m["text"] == "/new")


@pytest.mark.parametrize("name, kind", [("gateway_message_create_guild", GROUP), ("gateway_message_create_dm", DM)])
def test_discord_message_matches_the_fixtures(name, kind):
    channel = build_channel(make_config("discord", "acme-discord",
                                        public_key=Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()))
    d = fixture("discord", name)["d"]
    built_d = p.discord_message(d["channel_id"], d["author"]["id"], d["author"]["global_name"], d["content"], d["id"],
                                guild_id=d.get("guild_id"))
    [built], [real] = channel.parse_event(built_d), channel.parse_event(d)
    same_message(built, real)
    assert built.session_key == f"acme-discord:{kind}:{d['channel_id']}"
    # the same `d` inside a gateway dispatch, as `Channel.parse` takes it
    [dispatched] = channel.parse(p.encode({"op": 0, "t": "MESSAGE_CREATE", "s": 1, "d": built_d}))
    assert dispatched == built


def test_discord_snowflakes_are_unique_and_interactions_verify():
    key = Ed25519PrivateKey.generate()
    channel = build_channel(make_config("discord", "acme-discord",
                                        public_key=key.public_key().public_bytes_raw().hex()))
    assert len({p.discord_snowflake(1764032400.0, i) for i in range(100)}) == 100
    body = p.encode({"type": 1})
    channel.verify(request(body, p.sign_discord(body, key)))
    with pytest.raises(InvalidSignature):
        channel.verify(request(body, p.sign_discord(body, Ed25519PrivateKey.generate())))
