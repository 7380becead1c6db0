import dataclasses
import json
from datetime import datetime

import pytest
from channel_helpers import Reply, StandIn, fixture, fixture_bytes, make_config, no_sleep
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from shared.channels import build_channel
from shared.channels.base import WebhookRequest
from shared.channels.discord import DiscordChannel
from shared.errors import ConfigError, InvalidSignature, MalformedPayload
from shared.messages import DM, GROUP, NEW_SESSION

GUILD_CHANNEL = "1290000000000000001"
DM_CHANNEL = "1290000000000000099"
NOW = 1795569700.0  # 2026-11-25 01:15 UTC, just after the gateway fixtures
KEY = Ed25519PrivateKey.generate()
PUBLIC_HEX = KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def channel(now: float = NOW, **kw) -> DiscordChannel:
    return DiscordChannel(make_config("discord", public_key=PUBLIC_HEX, **kw), now=lambda: now)


def event(**fields) -> dict:
    d = fixture("discord", "gateway_message_create_guild")["d"]
    d.update(fields)
    return d


def signed(body: bytes, timestamp: str = str(int(NOW)), key: Ed25519PrivateKey = KEY) -> WebhookRequest:
    headers = {"x-signature-ed25519": key.sign(timestamp.encode() + body).hex(), "x-signature-timestamp": timestamp}
    return WebhookRequest("POST", headers, body=body)


def test_build_channel_picks_discord():
    assert isinstance(build_channel(make_config("discord", public_key=PUBLIC_HEX)), DiscordChannel)


def test_bad_public_key_is_a_config_error():
    with pytest.raises(ConfigError):
        DiscordChannel(make_config("discord", public_key="not-hex"))


def test_guild_message():
    [msg] = channel().parse(fixture_bytes("discord", "gateway_message_create_guild"))
    assert msg.session_key == f"discord-main:{GROUP}:{GUILD_CHANNEL}"
    assert (msg.chat_id, msg.chat_kind) == (GUILD_CHANNEL, GROUP)
    assert (msg.sender_id, msg.sender_name) == ("402911111111111111", "Eve")
    assert msg.text == "my invoice shows the wrong VAT number"
    assert msg.platform_message_id == "1311000000000000001" and msg.platform == "discord"
    assert msg.sent_at == datetime.fromisoformat("2026-11-25T01:10:00+00:00").timestamp()
    assert msg.command is None


def test_dm_message():
    [msg] = channel().parse(fixture_bytes("discord", "gateway_message_create_dm"))
    assert msg.session_key == f"discord-main:{DM}:{DM_CHANNEL}"
    assert (msg.chat_id, msg.chat_kind, msg.sender_name) == (DM_CHANNEL, DM, "Farid")


@pytest.mark.parametrize("field, value", [
    ("channel_id", "../../users/@me"), ("channel_id", "1" * 21), ("id", "12:34"), ("id", 1311000000000000001),
    ("author", {"id": "x" * 300, "username": "long"}),
])
def test_ids_that_are_not_snowflakes_are_malformed(field, value):
    with pytest.raises(MalformedPayload, match="valid id"):
        channel().parse_event(event(**{field: value}))


@pytest.mark.parametrize("timestamp", ["9999-12-31T23:59:59+00:00", "2027-01-01T00:00:00+00:00"])
def test_a_send_time_in_the_future_is_the_receive_time(timestamp):
    assert channel().parse_event(event(timestamp=timestamp))[0].sent_at == NOW


def test_session_is_per_channel_not_per_author():
    ch = channel()
    eve = ch.parse_event(event())[0]
    other_author = ch.parse_event(event(author={"id": "9", "username": "zed"}, id="2"))[0]
    other_channel = ch.parse_event(event(channel_id="777"))[0]
    elsewhere = channel(channel_id="discord-eu").parse_event(event())[0]
    assert eve.session_key == other_author.session_key
    assert len({eve.session_key, other_channel.session_key, elsewhere.session_key}) == 3
    assert other_author.sender_name == "zed"


def test_bot_and_empty_messages_are_ignored():
    ch = channel()
    assert ch.parse_event(event(author={"id": "1", "username": "acme-support", "bot": True})) == []
    assert ch.parse_event(event(content="")) == []
    assert ch.parse_event(event(content="   ")) == []


def test_attachments_are_listed():
    files = [{"id": "1", "filename": "receipt.png"}, {"id": "2", "filename": "log.txt"}]
    assert channel().parse_event(event(content="see these", attachments=files))[0].text == (
        "see these\n[attachment: receipt.png]\n[attachment: log.txt]"
    )
    assert channel().parse_event(event(content="", attachments=files[:1]))[0].text == "[attachment: receipt.png]"


@pytest.mark.parametrize(
    "content, command", [("/new", NEW_SESSION), ("!NEW ", NEW_SESSION), ("!new stuff", None), ("new", None)]
)
def test_new_commands(content, command):
    assert channel().parse_event(event(content=content))[0].command == command


def test_other_dispatches_give_nothing():
    for name in ("gateway_hello", "gateway_ready_excerpt"):
        assert channel().parse(fixture_bytes("discord", name)) == []


@pytest.mark.parametrize(
    "body",
    [
        b"x",
        b"[]",
        b'{"op": 0, "t": "MESSAGE_CREATE"}',
        json.dumps({"op": 0, "t": "MESSAGE_CREATE", "d": event(timestamp="yesterday")}).encode(),
    ],
)
def test_malformed_dispatches(body):
    with pytest.raises(MalformedPayload):
        channel().parse(body)


@pytest.mark.parametrize("drop", ["id", "channel_id", "author"])
def test_event_missing_fields(drop):
    d = event()
    del d[drop]
    with pytest.raises(MalformedPayload):
        channel().parse_event(d)


def test_signature_accepts_fresh_signed_request():
    channel().verify(signed(fixture_bytes("discord", "interaction_ping")))
    channel(now=NOW + 299).verify(signed(b"{}"))


@pytest.mark.parametrize(
    "request_",
    [
        signed(b"{}", key=Ed25519PrivateKey.generate()),
        WebhookRequest("POST", {"x-signature-timestamp": str(int(NOW))}, body=b"{}"),
        WebhookRequest("POST", {"x-signature-ed25519": "00" * 64}, body=b"{}"),
        WebhookRequest("POST", {"x-signature-ed25519": "zz", "x-signature-timestamp": str(int(NOW))}, body=b"{}"),
        WebhookRequest("POST", {"x-signature-ed25519": "abcd", "x-signature-timestamp": str(int(NOW))}, body=b"{}"),
        WebhookRequest("POST", {**signed(b"{}").headers}, body=b"{ }"),
        signed(b"{}", timestamp=str(int(NOW) - 301)),
        signed(b"{}", timestamp=str(int(NOW) + 301)),
        signed(b"{}", timestamp="soon"),
    ],
    ids=[
        "forged", "no-signature", "no-timestamp", "bad-hex", "short", "body-changed", "stale", "future", "bad-timestamp"
    ],
)
def test_signature_rejects(request_):
    with pytest.raises(InvalidSignature):
        channel().verify(request_)


def test_interaction_ping():
    assert channel().interaction(fixture_bytes("discord", "interaction_ping")) == ({"type": 1}, [])


def test_interaction_ask_joins_the_channel_session():
    ch = channel()
    answer, [msg] = ch.interaction(fixture_bytes("discord", "interaction_slash_command"))
    assert answer == {"type": 4, "data": {"content": "Got it, answering here shortly."}}
    gateway = ch.parse(fixture_bytes("discord", "gateway_message_create_guild"))[0]
    assert msg.session_key == gateway.session_key and msg.chat_id == GUILD_CHANNEL
    assert (msg.text, msg.command) == ("where is my refund?", None)
    assert (msg.sender_id, msg.sender_name) == ("402911111111111111", "Eve")
    assert msg.platform_message_id == "interaction:1311000000000000101"
    assert msg.sent_at == datetime.fromisoformat("2024-11-26T16:05:57.202+00:00").timestamp()  # from the snowflake


def test_interaction_new_in_dm_uses_user():
    doc = fixture("discord", "interaction_slash_command")
    doc.pop("guild_id")
    doc["user"] = doc.pop("member")["user"]
    doc["channel_id"] = DM_CHANNEL
    doc["data"] = {"id": "1", "name": "new", "type": 1}
    answer, [msg] = channel().interaction(json.dumps(doc).encode())
    assert answer == {"type": 4, "data": {"content": "Starting a new conversation."}}
    assert msg.command == NEW_SESSION and msg.session_key == f"discord-main:{DM}:{DM_CHANNEL}"


@pytest.mark.parametrize(
    "change",
    [
        {"type": 3},
        {"data": {"id": "1", "name": "refund", "type": 1}},
        {"data": {"id": "1", "name": "ask", "type": 1, "options": []}},
        {"member": None},
        {"id": "not-a-snowflake"},
    ],
    ids=["component", "unknown-command", "ask-without-question", "no-user", "bad-id"],
)
def test_interaction_malformed(change):
    doc = fixture("discord", "interaction_slash_command") | change
    with pytest.raises(MalformedPayload):
        channel().interaction(json.dumps(doc).encode())


def test_send_splits_at_2000():
    with StandIn(default=Reply(body={"id": "1311000000000000500"})) as server:
        ch = channel(api_base=server.base, bot_token="tok")
        [msg] = ch.parse(fixture_bytes("discord", "gateway_message_create_guild"))
        delivery = ch.send(msg.chat_id, msg.chat_kind, "y" * 2500)
    assert delivery.ok and delivery.platform_message_ids == ("1311000000000000500",) * 2
    assert [r.path for r in server.requests] == [f"/channels/{GUILD_CHANNEL}/messages"] * 2
    assert server.requests[0].headers["authorization"] == "Bot tok"
    assert [len(r.body["content"]) for r in server.requests] == [2000, 500]
    assert server.requests[0].body["allowed_mentions"] == {"parse": []}


def test_send_matches_documented_request_shape():
    with StandIn(default=Reply(body={"id": "1"})) as server:
        ch = channel(api_base=server.base)
        [msg] = ch.parse(fixture_bytes("discord", "gateway_message_create_guild"))
        ch.send(msg.chat_id, msg.chat_kind, "Hi Eve, I have flagged the VAT number on your invoice.")
    assert server.requests[0].body == fixture("discord", "create_message_request")


def test_send_retries_on_429_with_retry_after():
    with StandIn(Reply(429, fixture("discord", "error_429")), default=Reply(body={"id": "5"})) as server:
        ch = channel(api_base=server.base)
        waits = no_sleep(ch.sender)
        [msg] = ch.parse(fixture_bytes("discord", "gateway_message_create_dm"))
        delivery = ch.send(msg.chat_id, msg.chat_kind, "done")
    assert delivery.ok and delivery.attempts == 2 and waits == [0.532]


# --------------------------------------------------------------------------------------------------------------------
# Addressed: mentions of the bot's user id (READY, or options.application_id), replies to it, commands

import asyncio  # noqa: E402

from ingress.discord_gateway import GUILDS, INTENTS, GatewayClient, intents  # noqa: E402
from shared.config import SessionOptions  # noqa: E402

BOT_ID = "1270000000000000001"  # gateway_ready_excerpt.json: user.id (= application.id)
BOT_AUTHOR = {"id": BOT_ID, "username": "acme-support", "bot": True, "discriminator": "0"}


def known_bot(**kw) -> DiscordChannel:
    return channel(application_id=BOT_ID, **kw)


def test_dms_and_interactions_are_addressed():
    assert channel().parse(fixture_bytes("discord", "gateway_message_create_dm"))[0].addressed is True
    assert channel().interaction(fixture_bytes("discord", "interaction_slash_command"))[1][0].addressed is True


def test_guild_message_without_mention_is_not_addressed():
    assert known_bot().parse(fixture_bytes("discord", "gateway_message_create_guild"))[0].addressed is False


@pytest.mark.parametrize("fields, addressed", [
    ({"mentions": [BOT_AUTHOR], "content": f"<@{BOT_ID}> my invoice is wrong"}, True),
    ({"mentions": [], "content": f"<@!{BOT_ID}> my invoice is wrong"}, True),
    ({"mentions": [{"id": "402922222222222222", "username": "farid"}], "content": "<@402922222222222222> hi"}, False),
    ({"referenced_message": {"id": "1", "content": "Hi Eve", "author": BOT_AUTHOR},
      "message_reference": {"message_id": "1", "channel_id": GUILD_CHANNEL}, "type": 19}, True),
    ({"referenced_message": {"id": "1", "content": "hm", "author": {"id": "402922222222222222"}},
      "message_reference": {"message_id": "1"}, "type": 19}, False),
    ({"referenced_message": None, "message_reference": {"message_id": "1"}, "type": 19}, False),  # deleted
    ({"content": "!new"}, True),
    ({"mentions": "garbage"}, False),
])
def test_guild_addressing(fields, addressed):
    assert known_bot().parse_event(event(**fields))[0].addressed is addressed


def test_bot_id_comes_from_ready_before_any_message():
    ch = channel()  # no application_id option
    mention = event(mentions=[BOT_AUTHOR], content=f"<@{BOT_ID}> hello")
    assert ch.parse_event(mention)[0].addressed is False  # we do not know who we are yet
    client = GatewayClient(ch.config, ch, publish=lambda messages: len(messages))
    asyncio.run(client._handle(None, fixture("discord", "gateway_ready_excerpt")))
    assert ch.bot_user_id == BOT_ID and client.session_id == "a1b2c3d4e5f60718293a4b5c6d7e8f90"
    assert ch.parse_event(mention)[0].addressed is True


def test_gateway_hands_thread_events_to_the_parser():
    ch = channel()
    client = GatewayClient(ch.config, ch, publish=lambda messages: len(messages))
    thread = {"id": "1290000000000000777", "type": 11, "parent_id": GUILD_CHANNEL, "guild_id": "1280000000000000001"}
    asyncio.run(client._handle(None, {"op": 0, "s": 5, "t": "THREAD_CREATE", "d": thread}))
    asyncio.run(client._handle(None, {"op": 0, "s": 6, "t": "THREAD_CREATE", "d": None}))  # malformed: ignored
    assert ch.thread_parents == {"1290000000000000777": GUILD_CHANNEL} and client.seq == 6


def test_gateway_asks_for_thread_events_only_when_threads_merge():
    on = channel().config
    off = dataclasses.replace(on, session=SessionOptions(threads=False))
    assert intents(on) == INTENTS and intents(off) == INTENTS | GUILDS == INTENTS | 1
