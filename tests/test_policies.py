"""Session keys under every scope, platform and kind of chat (DM, group, topic/thread), from the platforms' sample
payloads; the key format's guarantees; InboundMessage's new fields across the JSON boundary."""

from __future__ import annotations

import dataclasses
import json

import pytest
from channel_helpers import FIXTURE_NOW, fixture, fixture_bytes, make_config
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared import policies
from shared.channels.discord import DiscordChannel
from shared.channels.telegram import TelegramChannel
from shared.channels.whatsapp import WhatsAppChannel
from shared.config import SessionOptions, load_settings
from shared.messages import DM, GROUP, InboundMessage

PUBLIC_HEX = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()

# Who and where, in the sample payloads (tests/fixtures, copied from the platforms' reference shapes)
WA_DM_USER, WA_GROUP_USER = "5511987650001", "5511987650002"
WA_GROUP = "HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA"
TG_DM_USER, TG_GROUP_USER, TG_SUPERGROUP = "381920001", "381920002", "-1001987654321"
TG_GROUP, TG_TOPIC = "-4012345678", "5"
DC_DM_USER, DC_DM_CHANNEL = "402922222222222222", "1290000000000000099"
DC_GROUP_USER, DC_CHANNEL, DC_THREAD = "402911111111111111", "1290000000000000001", "1290000000000000777"

PEOPLE = {"whatsapp": {WA_DM_USER: "ana", WA_GROUP_USER: "bruno"}, "telegram": {TG_DM_USER: "chen"},
          "discord": {DC_DM_USER: "farid", DC_GROUP_USER: "eve"}}


def config(platform: str, **session):
    base = make_config(platform, public_key=PUBLIC_HEX) if platform == "discord" else make_config(platform)
    return dataclasses.replace(base, session=SessionOptions(**session), people=PEOPLE[platform])


def adapter(platform: str, **session):
    cls = {"whatsapp": WhatsAppChannel, "telegram": TelegramChannel, "discord": DiscordChannel}[platform]
    return cls(config(platform, **session), now=lambda: FIXTURE_NOW)


def telegram_topic() -> bytes:
    doc = fixture("telegram", "supergroup_text")
    doc["message"].update(message_thread_id=int(TG_TOPIC), is_topic_message=True)
    return json.dumps(doc).encode()


def discord_thread(channel: DiscordChannel) -> InboundMessage:
    channel.observe("THREAD_CREATE", {"id": DC_THREAD, "type": 11, "guild_id": "1280000000000000001",
                                      "parent_id": DC_CHANNEL, "name": "refund"})
    d = fixture("discord", "gateway_message_create_guild")["d"] | {"channel_id": DC_THREAD}
    [msg] = channel.parse_event(d)
    return msg


def parse(platform: str, where: str, **session) -> InboundMessage:
    """One sample message: where = dm | group | thread."""
    ch = adapter(platform, **session)
    if platform == "discord" and where == "thread":
        return discord_thread(ch)
    name = {
        ("whatsapp", "dm"): "dm_text", ("whatsapp", "group"): "group_text",
        ("telegram", "dm"): "private_text", ("telegram", "group"): "group_text",
        ("discord", "dm"): "gateway_message_create_dm", ("discord", "group"): "gateway_message_create_guild",
    }.get((platform, where))
    body = telegram_topic() if (platform, where) == ("telegram", "thread") else fixture_bytes(platform, name)
    [msg] = ch.parse(body)
    return msg


# (platform, where, session options) -> expected key; channel ids are make_config's "<platform>-main"
KEYS = [
    # scope = default: the seed's table
    ("whatsapp", "dm", {}, f"whatsapp-main:dm:{WA_DM_USER}"),
    ("whatsapp", "group", {}, f"whatsapp-main:group:{WA_GROUP}"),
    ("telegram", "dm", {}, f"telegram-main:dm:{TG_DM_USER}"),
    ("telegram", "group", {}, f"telegram-main:group:{TG_GROUP}"),
    ("telegram", "thread", {}, f"telegram-main:group:{TG_SUPERGROUP}"),  # threads default off: the group's
    ("telegram", "thread", {"threads": True}, f"telegram-main:group:{TG_SUPERGROUP}:thread:{TG_TOPIC}"),
    ("discord", "dm", {}, f"discord-main:dm:{DC_DM_CHANNEL}"),
    ("discord", "group", {}, f"discord-main:group:{DC_CHANNEL}"),
    ("discord", "thread", {}, f"discord-main:group:{DC_THREAD}"),  # a thread is a channel: its own, as ever
    ("discord", "thread", {"threads": False}, f"discord-main:group:{DC_CHANNEL}"),  # its parent's
    # scope = per-member: DMs unchanged, each group member a private context (inside the topic, if any)
    ("whatsapp", "dm", {"scope": "per-member"}, f"whatsapp-main:dm:{WA_DM_USER}"),
    ("whatsapp", "group", {"scope": "per-member"}, f"whatsapp-main:group:{WA_GROUP}:member:{WA_GROUP_USER}"),
    ("telegram", "dm", {"scope": "per-member"}, f"telegram-main:dm:{TG_DM_USER}"),
    ("telegram", "group", {"scope": "per-member"}, f"telegram-main:group:{TG_GROUP}:member:{TG_GROUP_USER}"),
    ("telegram", "thread", {"scope": "per-member"}, f"telegram-main:group:{TG_SUPERGROUP}:member:{TG_DM_USER}"),
    ("telegram", "thread", {"scope": "per-member", "threads": True},
     f"telegram-main:group:{TG_SUPERGROUP}:thread:{TG_TOPIC}:member:{TG_DM_USER}"),
    ("discord", "dm", {"scope": "per-member"}, f"discord-main:dm:{DC_DM_CHANNEL}"),
    ("discord", "group", {"scope": "per-member"}, f"discord-main:group:{DC_CHANNEL}:member:{DC_GROUP_USER}"),
    ("discord", "thread", {"scope": "per-member"}, f"discord-main:group:{DC_THREAD}:member:{DC_GROUP_USER}"),
    ("discord", "thread", {"scope": "per-member", "threads": False},
     f"discord-main:group:{DC_CHANNEL}:member:{DC_GROUP_USER}"),
    # scope = per-person: linked DMs share the person's session; groups and topics unchanged
    ("whatsapp", "dm", {"scope": "per-person"}, "person:ana:dm"),
    ("whatsapp", "group", {"scope": "per-person"}, f"whatsapp-main:group:{WA_GROUP}"),
    ("telegram", "dm", {"scope": "per-person"}, "person:chen:dm"),
    ("telegram", "group", {"scope": "per-person"}, f"telegram-main:group:{TG_GROUP}"),
    ("telegram", "thread", {"scope": "per-person", "threads": True},
     f"telegram-main:group:{TG_SUPERGROUP}:thread:{TG_TOPIC}"),
    ("discord", "dm", {"scope": "per-person"}, "person:farid:dm"),
    ("discord", "group", {"scope": "per-person"}, f"discord-main:group:{DC_CHANNEL}"),
    ("discord", "thread", {"scope": "per-person"}, f"discord-main:group:{DC_THREAD}"),
]


@pytest.mark.parametrize("platform, where, session, key", KEYS,
                         ids=[f"{p}-{w}-{'-'.join(f'{k}={v}' for k, v in s.items()) or 'default'}"
                              for p, w, s, _ in KEYS])
def test_session_key(platform, where, session, key):
    msg = parse(platform, where, **session)
    assert msg.session_key == key
    assert msg.chat_kind == (DM if where == "dm" else GROUP)


def test_every_platform_and_scope_is_covered():
    covered = {(p, w, s.get("scope", "default")) for p, w, s, _ in KEYS}
    assert covered == {(p, w, scope) for p in PEOPLE for w in ("dm", "group", "thread")
                       for scope in ("default", "per-member", "per-person")} - {("whatsapp", "thread", s) for s in
                                                                              ("default", "per-member", "per-person")}


def test_keys_of_different_kinds_never_collide():
    """Groups never see DM context, DMs never see group context, whatever the scope."""
    by_kind: dict[str, set[str]] = {DM: set(), GROUP: set()}
    for platform, where, session, _ in KEYS:
        msg = parse(platform, where, **session)
        by_kind[msg.chat_kind].add(msg.session_key)
    assert not by_kind[DM] & by_kind[GROUP]
    assert all(policies.split_key(k)[1] == GROUP for k in by_kind[GROUP])
    assert all(policies.split_key(k)[1] == DM or policies.split_key(k)[-1] == DM for k in by_kind[DM])


def test_unlinked_dm_on_a_per_person_channel_keeps_the_channel_key():
    ch = adapter("whatsapp", scope="per-person")
    doc = fixture("whatsapp", "dm_text")
    doc["entry"][0]["changes"][0]["value"]["messages"][0]["from"] = "5511900000000"
    [msg] = ch.parse(json.dumps(doc).encode())
    assert msg.session_key == "whatsapp-main:dm:5511900000000" and msg.person is None


def test_person_is_set_whatever_the_scope():
    assert parse("telegram", "dm").person == "chen"
    assert parse("discord", "group").person == "eve"  # a group message: the key stays the channel's
    assert parse("discord", "group").session_key == f"discord-main:group:{DC_CHANNEL}"


def test_thread_id_is_where_the_reply_goes():
    topic = parse("telegram", "thread")
    assert (topic.chat_id, topic.thread_id) == (TG_SUPERGROUP, TG_TOPIC)  # threads off: key is the group's
    thread = parse("discord", "thread", threads=False)
    assert (thread.chat_id, thread.thread_id) == (DC_THREAD, DC_THREAD)  # the reply goes into the thread
    assert parse("telegram", "group").thread_id is None and parse("discord", "group").thread_id is None
    assert parse("whatsapp", "group").thread_id is None


def test_telegram_reply_thread_outside_a_forum_is_not_a_topic():
    doc = fixture("telegram", "supergroup_text")
    doc["message"]["message_thread_id"] = 1040  # a reply thread in an ordinary supergroup: no is_topic_message
    [msg] = adapter("telegram", threads=True).parse(json.dumps(doc).encode())
    assert msg.thread_id is None and msg.session_key == f"telegram-main:group:{TG_SUPERGROUP}"


def test_discord_thread_parent_from_an_interaction():
    doc = fixture("discord", "interaction_slash_command")
    doc["channel_id"] = DC_THREAD
    doc["channel"] = {"id": DC_THREAD, "type": 11, "parent_id": DC_CHANNEL, "name": "refund"}
    _, [merged] = adapter("discord", threads=False).interaction(json.dumps(doc).encode())
    _, [own] = adapter("discord").interaction(json.dumps(doc).encode())
    assert merged.session_key == f"discord-main:group:{DC_CHANNEL}" and merged.chat_id == DC_THREAD
    assert own.session_key == f"discord-main:group:{DC_THREAD}" and own.thread_id == DC_THREAD


def test_discord_unknown_thread_stays_its_own_session():
    d = fixture("discord", "gateway_message_create_guild")["d"] | {"channel_id": DC_THREAD}
    [msg] = adapter("discord", threads=False).parse_event(d)
    assert msg.session_key == f"discord-main:group:{DC_THREAD}" and msg.thread_id is None


def test_discord_thread_events_are_remembered_and_forgotten():
    ch = adapter("discord", threads=False)
    t1, t2, t3, c1, c2, c3 = "9001", "9002", "9003", "8001", "8002", "8003"
    ch.observe("GUILD_CREATE", {"id": "g", "threads": [{"id": t1, "type": 11, "parent_id": c1},
                                                        {"id": c2, "type": 0}]})
    ch.observe("THREAD_LIST_SYNC", {"guild_id": "g", "threads": [{"id": t2, "type": 12, "parent_id": c1}]})
    ch.observe("THREAD_UPDATE", {"id": t3, "type": 10, "parent_id": c3})
    assert ch.thread_parents == {t1: c1, t2: c1, t3: c3}
    ch.observe("THREAD_DELETE", {"id": t1, "type": 11, "parent_id": c1})
    ch.observe("THREAD_CREATE", "garbage")
    ch.observe("THREAD_CREATE", {"id": 5, "type": 11, "parent_id": c1})
    ch.observe("THREAD_CREATE", {"id": "7:member:1", "type": 11, "parent_id": c1})  # not a snowflake: not kept
    assert ch.thread_parents == {t2: c1, t3: c3}


def test_one_person_one_dm_session_across_platforms(tmp_path):
    """Linked accounts on three per-person channels share one DM session, each message keeping the channel
    and chat its reply must go to; their group messages stay in the groups' sessions."""
    path = tmp_path / "channels.toml"
    path.write_text("""
[[channels]]
id = "wa"
platform = "whatsapp"
agent = "echo"
secrets = { app_secret = "S", verify_token = "S", access_token = "S" }
options = { phone_number_id = "106540352242922" }
session = { scope = "per-person" }

[[channels]]
id = "tg"
platform = "telegram"
agent = "echo"
secrets = { bot_token = "S", secret_token = "S" }
options = { bot_username = "AcmeSupportBot" }
session = { scope = "per-person" }

[[channels]]
id = "dc"
platform = "discord"
agent = "echo"
secrets = { bot_token = "S", public_key = "DC_KEY" }
session = { scope = "per-person" }

[[channels]]
id = "tg-default"
platform = "telegram"
agent = "echo"
secrets = { bot_token = "S", secret_token = "S" }
options = { bot_username = "AcmeSupportBot" }

[[identities]]
person = "ana"
whatsapp = "+55 11 98765-0001"
telegram = 381920001
discord = "402922222222222222"
""")
    settings = load_settings({"CHATSESSIONS_CONFIG": str(path), "S": "1:s", "DC_KEY": PUBLIC_HEX})
    wa = WhatsAppChannel(settings.channel("wa"), now=lambda: FIXTURE_NOW).parse(fixture_bytes("whatsapp", "dm_text"))[0]
    tg = TelegramChannel(settings.channel("tg"), now=lambda: FIXTURE_NOW).parse(fixture_bytes("telegram", "private_text"))[0]
    dc = DiscordChannel(settings.channel("dc"), now=lambda: FIXTURE_NOW).parse(fixture_bytes("discord", "gateway_message_create_dm"))[0]
    assert wa.session_key == tg.session_key == dc.session_key == policies.person_key("ana") == "person:ana:dm"
    assert {m.person for m in (wa, tg, dc)} == {"ana"}
    assert [(m.channel_id, m.chat_id) for m in (wa, tg, dc)] == [
        ("wa", WA_DM_USER), ("tg", TG_DM_USER), ("dc", DC_DM_CHANNEL)]  # each reply goes back where it came from
    # A channel without the scope keeps its own DM session; a group message from Ana stays in the group's.
    other = TelegramChannel(settings.channel("tg-default"), now=lambda: FIXTURE_NOW).parse(fixture_bytes("telegram", "private_text"))[0]
    assert other.session_key == f"tg-default:dm:{TG_DM_USER}" and other.person == "ana"
    group = TelegramChannel(settings.channel("tg"), now=lambda: FIXTURE_NOW).parse(fixture_bytes("telegram", "supergroup_text"))[0]
    assert group.session_key == f"tg:group:{TG_SUPERGROUP}" and group.person == "ana"


# --------------------------------------------------------------------------------------------------------------------
# The key format


def test_key_parts():
    assert policies.person_key("ana") == "person:ana:dm"
    assert policies.dm_key("tg", "381920001") == "tg:dm:381920001"
    assert policies.group_key("tg", "-100", topic="7", member="42") == "tg:group:-100:thread:7:member:42"
    assert policies.split_key("tg:group:-100:thread:7") == ["tg", "group", "-100", "thread", "7"]


def test_an_id_with_the_separator_is_malformed_not_a_forged_key():
    """A group id shaped like a per-member suffix must not land in member S's private session."""
    from shared.errors import MalformedPayload

    with pytest.raises(MalformedPayload, match="contains ':'"):
        policies.group_key("wa", "G:member:S")
    doc = fixture("whatsapp", "group_text")
    doc["entry"][0]["changes"][0]["value"]["messages"][0]["group_id"] = "G:member:5511987650002"
    with pytest.raises(MalformedPayload, match="group_id is not a valid id"):
        adapter("whatsapp").parse(json.dumps(doc).encode())
    d = fixture("discord", "gateway_message_create_guild")["d"] | {"author": {"id": "1:2", "username": "x"}}
    with pytest.raises(MalformedPayload):
        adapter("discord", scope="per-member").parse_event(d)


def test_seed_keys_are_unchanged():
    for platform, where, session, key in KEYS:
        if not session and where != "thread":
            msg = parse(platform, where)
            assert msg.session_key == f"{msg.channel_id}:{msg.chat_kind}:{msg.chat_id}"


def test_threads_default_per_platform():
    assert policies.threads_enabled(make_config("telegram")) is False
    assert policies.threads_enabled(make_config("discord", public_key=PUBLIC_HEX)) is True
    assert policies.threads_enabled(make_config("whatsapp")) is False
    assert policies.threads_enabled(config("telegram", threads=True)) is True


@pytest.mark.parametrize("kind, flags, expected", [
    (DM, {}, True),
    (GROUP, {}, False),
    (GROUP, {"mentioned": True}, True),
    (GROUP, {"replied_to_bot": True}, True),
    (GROUP, {"command": True}, True),
])
def test_addressed_rule(kind, flags, expected):
    assert policies.addressed(kind, **flags) is expected


# --------------------------------------------------------------------------------------------------------------------
# InboundMessage across the JSON boundary


def test_new_fields_round_trip_through_json():
    msg = parse("telegram", "thread", threads=True)
    msg = dataclasses.replace(msg, addressed=False).with_ingress(seq=4, received_at=1764032801.5)
    doc = json.loads(json.dumps(msg.to_dict()))
    assert doc["addressed"] is False and doc["thread_id"] == TG_TOPIC and doc["person"] == "chen"
    assert InboundMessage.from_dict(doc) == msg


def test_a_message_queued_before_the_policies_still_loads():
    old = {"channel_id": "wa", "platform": "whatsapp", "session_key": "wa:group:g1", "chat_id": "g1",
           "chat_kind": "group", "sender_id": "5511", "sender_name": "Ana", "text": "hi",
           "platform_message_id": "wamid.1", "sent_at": 1.0, "command": None, "seq": 3, "received_at": 2.0}
    msg = InboundMessage.from_dict(old)
    # every message was answered before group_reply existed: an old one stays answered
    assert (msg.addressed, msg.thread_id, msg.person) == (True, None, None)
    assert msg.session_key == "wa:group:g1" and msg.seq == 3


def test_a_message_from_a_newer_ingress_loses_unknown_fields():
    doc = parse("whatsapp", "dm").to_dict() | {"reply_markup": {"x": 1}}
    assert InboundMessage.from_dict(doc) == parse("whatsapp", "dm")


def test_new_text_fields_refuse_unpaired_surrogates():
    from shared.errors import MalformedPayload

    with pytest.raises(MalformedPayload, match="thread_id"):
        dataclasses.replace(parse("whatsapp", "dm"), thread_id="\ud800")


# --------------------------------------------------------------------------------------------------------------------
# export / erase act on every account of a linked person (shared/admin.py; the CLI passes Settings.identity_of)


def test_export_and_erase_cover_every_linked_account(tmp_path):
    from shared import privacy, session_queries
    from shared.config import Identity
    from shared.db import engine_for
    from shared.migrate import upgrade
    from workers.store import Store

    url = f"sqlite:///{tmp_path}/store.db"
    upgrade(url)
    store = Store(url)
    store.sync_channels([make_config("whatsapp", "wa"), make_config("telegram", "tg"),
                         make_config("discord", "dc", public_key=PUBLIC_HEX)])

    def say(channel: str, platform: str, key: str, chat: str, sender: str, n: int, kind: str = DM) -> None:
        store.accept(InboundMessage(channel, platform, key, chat, kind, sender, "x", f"hello {n}", f"m{n}", 1.0,
                                    seq=1))

    say("wa", "whatsapp", "wa:dm:5511", "5511", "5511", 1)
    say("tg", "telegram", "tg:dm:381920001", "381920001", "381920001", 2)
    say("dc", "discord", "person:ana:dm", "1290000000000000099", "402922222222222222", 3)
    say("wa", "whatsapp", "wa:dm:5522", "5522", "5522", 4)  # somebody else
    ana = Identity("ana", {"whatsapp": ("5511",), "telegram": ("381920001",), "discord": ("402922222222222222",)})

    alone = privacy.export_user(url, "5511")
    assert [s["session"]["key"] for s in alone["direct_sessions"]] == ["wa:dm:5511"] and alone["person"] is None
    doc = privacy.export_user(url, "5511", identity=ana)
    assert doc["person"] == "ana" and doc["user_ids"] == ["5511", "381920001", "402922222222222222"]
    assert [s["session"]["key"] for s in doc["direct_sessions"]] == ["wa:dm:5511", "tg:dm:381920001",
                                                                     "person:ana:dm"]
    assert [s["inbox"][0]["message"]["text"] for s in doc["direct_sessions"]] == ["hello 1", "hello 2", "hello 3"]

    by_name = privacy.erase_user(url, "ana", identity=ana, dry_run=True)
    assert by_name.user_ids == ["5511", "381920001", "402922222222222222"] and by_name.inbox == 3
    report = privacy.erase_user(url, "381920001", identity=ana)
    assert report.person == "ana" and sorted(report.sessions) == ["person:ana:dm", "tg:dm:381920001", "wa:dm:5511"]
    assert [s.key for s in session_queries.find_sessions(url).sessions] == ["wa:dm:5522"]
    engine_for(url).dispose()


# -- the turn side: pure decisions workers/turn.py makes under the session's lease ----------------------------------


def test_trim_history_is_newest_first():
    from workers.policies import trim_history

    assert trim_history(["x" * 5, "y" * 5, "z" * 5], 50, 10, str) == ["y" * 5, "z" * 5]
    assert trim_history(["x" * 5, "y" * 5, "z" * 50], 50, 10, str) == []  # the newest alone is over budget
    assert trim_history(["x", "y", "z"], 2, None, str) == ["y", "z"]


def test_reset_boundaries():
    from datetime import datetime, timedelta, timezone
    from zoneinfo import ZoneInfo

    from shared.config import SessionOptions
    from workers.policies import latest_reset_boundary, reset_due

    daily = SessionOptions(reset="daily", reset_hour=4, timezone="America/Sao_Paulo")  # UTC-3
    at = datetime(2026, 3, 10, 8, 0, tzinfo=timezone.utc)  # 05:00 local
    assert latest_reset_boundary(daily, at) == datetime(2026, 3, 10, 4, 0, tzinfo=ZoneInfo("America/Sao_Paulo"))
    assert reset_due(daily, datetime(2026, 3, 10, 6, 59, tzinfo=timezone.utc), at)  # 03:59 local
    assert not reset_due(daily, datetime(2026, 3, 10, 7, 0, tzinfo=timezone.utc), at)  # 04:00 local
    early = datetime(2026, 3, 10, 6, 0, tzinfo=timezone.utc)  # 03:00 local: the boundary is yesterday's
    assert latest_reset_boundary(daily, early).day == 9
    idle = SessionOptions(reset="idle", reset_idle_hours=2)
    assert reset_due(idle, at - timedelta(hours=2), at) and not reset_due(idle, at - timedelta(hours=1.9), at)
    assert not reset_due(SessionOptions(), at - timedelta(days=400), at)  # never


def test_should_answer():
    from workers.policies import should_answer

    def m(kind, addressed):
        return dataclasses.replace(parse("whatsapp", "group"), chat_kind=kind, addressed=addressed)

    mentioned, always = SessionOptions(group_reply="mentioned"), SessionOptions(group_reply="always")
    assert not should_answer(mentioned, [m(GROUP, False)]) and should_answer(always, [m(GROUP, False)])
    assert should_answer(mentioned, [m(GROUP, True)]) and should_answer(mentioned, [m(DM, False)])
    assert should_answer(mentioned, [m(GROUP, False), m(GROUP, True)])  # a burst with one addressed message


def test_with_notice_and_the_whatsapp_window():
    from datetime import datetime, timedelta, timezone
    from workers.policies import outside_window, with_notice

    assert with_notice("(new)", "hi") == "(new)\n\nhi" and with_notice("(new)", None) == "(new)"
    assert with_notice("", "hi") == "hi" and with_notice("", None) is None
    at = datetime(2026, 3, 10, tzinfo=timezone.utc)
    options = SessionOptions(window_hours=24)
    assert outside_window(options, "whatsapp", at - timedelta(hours=25), at)
    assert not outside_window(options, "whatsapp", at - timedelta(hours=23), at)
    assert not outside_window(options, "telegram", at - timedelta(days=9), at)
    assert not outside_window(options, "whatsapp", None, at)  # a reply stored before the window was recorded
