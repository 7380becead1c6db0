import json

import pytest
from structlog.testing import capture_logs
from channel_helpers import FIXTURE_NOW, Reply, StandIn, fixture, fixture_bytes, make_config, no_sleep

from shared.channels import build_channel
from shared.channels.base import WebhookRequest
from shared.channels.telegram import TelegramChannel
from shared.channels.base import Replayed
from shared.messages import REPLAY_WINDOW_S
from shared.errors import InvalidSignature, MalformedPayload
from shared.messages import DM, GROUP, NEW_SESSION

CHEN = "381920001"
GROUP_CHAT = "-4012345678"
SUPERGROUP_CHAT = "-1001987654321"


def channel(now: float = FIXTURE_NOW, **kw) -> TelegramChannel:
    return TelegramChannel(make_config("telegram", **kw), now=lambda: now)


def with_message(**fields) -> bytes:
    doc = fixture("telegram", "private_text")
    doc["message"].pop("text")
    doc["message"].update(fields)
    return json.dumps(doc).encode()


def test_build_channel_picks_telegram():
    assert isinstance(build_channel(make_config("telegram")), TelegramChannel)


def test_private_text():
    [msg] = channel().parse(fixture_bytes("telegram", "private_text"))
    assert msg.session_key == f"telegram-main:{DM}:{CHEN}"
    assert (msg.chat_id, msg.chat_kind, msg.sender_id, msg.sender_name) == (CHEN, DM, CHEN, "Chen")
    assert msg.text == "Hello, I need to change my delivery address"
    assert msg.platform_message_id == f"{CHEN}:311" and msg.sent_at == 1764032600.0
    assert msg.command is None and msg.platform == "telegram"


def test_private_command_new():
    [msg] = channel().parse(fixture_bytes("telegram", "private_command_new"))
    assert msg.command == NEW_SESSION and msg.session_key == f"telegram-main:{DM}:{CHEN}"


def test_group_text_keeps_member_as_sender():
    [msg] = channel().parse(fixture_bytes("telegram", "group_text"))
    assert msg.session_key == f"telegram-main:{GROUP}:{GROUP_CHAT}"
    assert (msg.chat_id, msg.chat_kind, msg.sender_id, msg.sender_name) == (GROUP_CHAT, GROUP, "381920002", "Dana")
    assert msg.text == "@AcmeSupportBot is the new firmware out?" and msg.command is None
    assert msg.platform_message_id == f"{GROUP_CHAT}:77"


def test_group_command_addressed_to_us():
    [msg] = channel().parse(fixture_bytes("telegram", "group_command_new"))
    assert msg.command == NEW_SESSION and msg.chat_kind == GROUP


def test_bot_username_match_is_case_insensitive():
    [msg] = channel(bot_username="@acmesupportbot").parse(fixture_bytes("telegram", "group_command_new"))
    assert msg.command == NEW_SESSION


def test_command_for_another_bot_is_plain_text():
    doc = fixture("telegram", "group_command_new")
    doc["message"]["text"] = "/new@OtherBot"
    doc["message"]["entities"][0]["length"] = 13
    [msg] = channel().parse(json.dumps(doc).encode())
    assert msg.command is None and msg.text == "/new@OtherBot"


@pytest.mark.parametrize(
    "text, entities, command",
    [
        ("/new", [], None),  # no bot_command entity: not a command
        ("/newer", [{"offset": 0, "length": 6, "type": "bot_command"}], None),
        ("/new please", [{"offset": 0, "length": 4, "type": "bot_command"}], NEW_SESSION),
        ("hi /new", [{"offset": 3, "length": 4, "type": "bot_command"}], None),
    ],
)
def test_command_detection(text, entities, command):
    [msg] = channel().parse(with_message(text=text, entities=entities))
    assert msg.command == command


def test_supergroup_text():
    [msg] = channel().parse(fixture_bytes("telegram", "supergroup_text"))
    assert msg.session_key == f"telegram-main:{GROUP}:{SUPERGROUP_CHAT}"
    assert (msg.sender_id, msg.sender_name) == (CHEN, "Chen")


def test_session_keys_per_user_per_group_per_channel():
    main = channel()
    dm = main.parse(fixture_bytes("telegram", "private_text"))[0]
    same_user_in_supergroup = main.parse(fixture_bytes("telegram", "supergroup_text"))[0]
    group = main.parse(fixture_bytes("telegram", "group_text"))[0]
    elsewhere = channel(channel_id="telegram-eu").parse(fixture_bytes("telegram", "private_text"))[0]
    assert len({dm.session_key, same_user_in_supergroup.session_key, group.session_key, elsewhere.session_key}) == 4
    other_dm = json.loads(fixture_bytes("telegram", "private_text"))
    other_dm["message"]["chat"]["id"] = other_dm["message"]["from"]["id"] = 55
    assert main.parse(json.dumps(other_dm).encode())[0].session_key == f"telegram-main:{DM}:55"


def test_full_name_and_username_fallback():
    doc = fixture("telegram", "private_text")
    doc["message"]["from"]["last_name"] = "Wei"
    assert channel().parse(json.dumps(doc).encode())[0].sender_name == "Chen Wei"
    doc["message"]["from"] = {"id": 1, "is_bot": False, "username": "chen_w", "first_name": ""}
    assert channel().parse(json.dumps(doc).encode())[0].sender_name == "chen_w"


@pytest.mark.parametrize(
    "fields, text",
    [
        ({"photo": [{"file_id": "a"}], "caption": "broken box"}, "broken box"),
        ({"photo": [{"file_id": "a"}]}, "[photo]"),
        ({"sticker": {"file_id": "s", "emoji": "😀"}}, "[sticker]"),
        ({"voice": {"file_id": "v"}}, "[voice]"),
        ({"document": {"file_id": "d", "file_name": "invoice.pdf"}}, "[document: invoice.pdf]"),
        ({"location": {"latitude": 52.5, "longitude": 13.4}}, "[location: 52.5, 13.4]"),
    ],
)
def test_non_text_messages_become_placeholders(fields, text):
    [msg] = channel().parse(with_message(**fields))
    assert msg.text == text


@pytest.mark.parametrize("name", ["edited_message"])
def test_non_message_updates_are_ignored(name):
    assert channel().parse(fixture_bytes("telegram", name)) == []


@pytest.mark.parametrize(
    "update",
    [
        {"update_id": 1, "callback_query": {"id": "1", "data": "x"}},
        {"update_id": 1, "channel_post": {"message_id": 1, "chat": {"id": -100, "type": "channel"}, "text": "x"}},
        {"update_id": 1, "message": {"message_id": 1, "chat": {"id": -100, "type": "channel"}, "text": "x"}},
        {"update_id": 1, "message": {"message_id": 1, "chat": {"id": -5, "type": "group"}, "left_chat_member": {}}},
    ],
    ids=["callback_query", "channel_post", "channel-chat", "service-message"],
)
def test_other_updates_give_no_turns(update):
    assert channel().parse(json.dumps(update).encode()) == []


@pytest.mark.parametrize(
    "body",
    [
        b"nope",
        b"[1]",
        b'{"message": {"message_id": 1, "chat": {"id": 1, "type": "private"}}}',
        b'{"update_id": 1, "message": {"message_id": 1, "text": "hi"}}',
        b'{"update_id": 1, "message": {"chat": {"id": 1, "type": "private"}, "text": "hi"}}',
        b'{"update_id": 1, "message": "hi"}',
    ],
)
def test_malformed_bodies(body):
    with pytest.raises(MalformedPayload):
        channel().parse(body)


def test_secret_token():
    ch = channel()
    ch.verify(WebhookRequest("POST", {"x-telegram-bot-api-secret-token": "secret_token-value"}))
    for token in (None, "secret_token-valuf", ""):
        headers = {} if token is None else {"x-telegram-bot-api-secret-token": token}
        with pytest.raises(InvalidSignature):
            ch.verify(WebhookRequest("POST", headers))


def test_send_chunks_and_ids():
    with StandIn(default=Reply(body=fixture("telegram", "send_message_response"))) as server:
        ch = channel(api_base=server.base, bot_token="123:ABC")
        [msg] = ch.parse(fixture_bytes("telegram", "private_text"))
        delivery = ch.send(msg.chat_id, msg.chat_kind, "x" * 5000)
    assert delivery.ok and delivery.platform_message_ids == (f"{CHEN}:313", f"{CHEN}:313")
    assert [r.path for r in server.requests] == ["/bot123:ABC/sendMessage"] * 2
    assert server.requests[0].body == {"chat_id": 381920001, "text": "x" * 4096}
    assert server.requests[1].body == {"chat_id": 381920001, "text": "x" * 904}


def test_send_matches_documented_request_shape():
    with StandIn(default=Reply(body=fixture("telegram", "send_message_response"))) as server:
        ch = channel(api_base=server.base)
        [msg] = ch.parse(fixture_bytes("telegram", "private_text"))
        assert ch.send(msg.chat_id, msg.chat_kind, "Sure Chen, what is the new address?").ok
    assert server.requests[0].body == fixture("telegram", "send_message_request")


def test_send_to_group_uses_negative_int_chat_id():
    with StandIn(default=Reply(body=fixture("telegram", "send_message_response"))) as server:
        ch = channel(api_base=server.base)
        [msg] = ch.parse(fixture_bytes("telegram", "supergroup_text"))
        ch.send(msg.chat_id, msg.chat_kind, "looking into it")
    assert server.requests[0].body["chat_id"] == -1001987654321


def test_send_honours_retry_after_and_blocked_is_final():
    script = Reply(429, fixture("telegram", "error_429")), Reply(403, fixture("telegram", "error_403_blocked"))
    with StandIn(*script) as server:
        ch = channel(api_base=server.base, bot_token="123:SECRET")
        waits = no_sleep(ch.sender)
        [msg] = ch.parse(fixture_bytes("telegram", "private_text"))
        with capture_logs() as logs:
            delivery = ch.send(msg.chat_id, msg.chat_kind, "hi")
    assert waits == [7.0]
    assert [e["event"] for e in logs] == ["outbound.retry"] and "SECRET" not in repr(logs)
    assert not delivery.ok and delivery.attempts == 2 and "blocked" in delivery.error
    assert "SECRET" not in delivery.error


# --------------------------------------------------------------------------------------------------------------------
# Addressed: mentions (entities, offsets in UTF-16 units), replies to the bot, commands for it

BOT_USER = {"id": 7012345678, "is_bot": True, "first_name": "Acme Support", "username": "AcmeSupportBot"}


def group_update(**fields) -> bytes:
    doc = fixture("telegram", "group_text")
    doc["message"].pop("entities")
    doc["message"].pop("text")
    doc["message"].update(fields)
    return json.dumps(doc).encode()


def test_private_messages_are_addressed():
    assert channel().parse(fixture_bytes("telegram", "private_text"))[0].addressed is True


def test_group_mention_entity_is_addressed():
    assert channel().parse(fixture_bytes("telegram", "group_text"))[0].addressed is True  # "@AcmeSupportBot ..."
    assert channel().parse(fixture_bytes("telegram", "supergroup_text"))[0].addressed is False
    assert channel().parse(fixture_bytes("telegram", "group_command_new"))[0].addressed is True


@pytest.mark.parametrize("text, entities, addressed", [
    ("@OtherBot hi", [{"offset": 0, "length": 9, "type": "mention"}], False),
    ("hi @acmesupportbot", [{"offset": 3, "length": 15, "type": "mention"}], True),
    # 👋 is two UTF-16 units: the entity starts at 3, which is Python index 2
    ("👋 @AcmeSupportBot where is it?", [{"offset": 3, "length": 15, "type": "mention"}], True),
    ("👋 @AcmeSupportBot where is it?", [{"offset": 2, "length": 15, "type": "mention"}], False),
    ("@AcmeSupportBot hi", [], False),  # no entity: Telegram did not see a mention
    ("@AcmeSupportBotX hi", [{"offset": 0, "length": 16, "type": "mention"}], False),
    ("/help", [{"offset": 0, "length": 5, "type": "bot_command"}], True),
    ("/help@AcmeSupportBot", [{"offset": 0, "length": 20, "type": "bot_command"}], True),
    ("/help@OtherBot", [{"offset": 0, "length": 14, "type": "bot_command"}], False),
    ("see /help", [{"offset": 4, "length": 5, "type": "bot_command"}], False),
    ("Support, hi", [{"offset": 0, "length": 7, "type": "text_mention", "user": BOT_USER}], True),
    ("Dana, hi", [{"offset": 0, "length": 4, "type": "text_mention",
                   "user": {"id": 1, "is_bot": False, "first_name": "Dana"}}], False),
])
def test_group_entities(text, entities, addressed):
    [msg] = channel().parse(group_update(text=text, entities=entities))
    assert msg.addressed is addressed


def test_text_mention_of_the_bot_by_id_from_the_token():
    user = {"id": 7012345678, "is_bot": True, "first_name": "Acme Support"}  # no username in this one
    body = group_update(text="Support, hi", entities=[{"offset": 0, "length": 7, "type": "text_mention", "user": user}])
    assert channel(bot_token="7012345678:AAH-secret").parse(body)[0].addressed is True
    assert channel(bot_token="9:AAH-secret").parse(body)[0].addressed is False


def test_caption_mention_is_addressed():
    body = group_update(photo=[{"file_id": "a"}], caption="@AcmeSupportBot broken box",
                        caption_entities=[{"offset": 0, "length": 15, "type": "mention"}])
    [msg] = channel().parse(body)
    assert msg.addressed is True and msg.text == "@AcmeSupportBot broken box"


def test_reply_to_the_bots_message_is_addressed():
    ours = fixture("telegram", "send_message_response")["result"]  # what the bot sent: from = the bot
    assert channel().parse(group_update(text="yes, that one", reply_to_message=ours))[0].addressed is True
    dana = fixture("telegram", "group_text")["message"]
    assert channel().parse(group_update(text="+1", reply_to_message=dana))[0].addressed is False
    other_bot = ours | {"from": {"id": 5, "is_bot": True, "first_name": "Other", "username": "OtherBot"}}
    assert channel().parse(group_update(text="hm", reply_to_message=other_bot))[0].addressed is False


def test_forum_topic_creation_is_not_a_reply_to_the_bot():
    created = {"message_id": 5, "from": BOT_USER, "chat": {"id": -1001987654321, "type": "supergroup"},
               "date": 1764032000, "forum_topic_created": {"name": "Refunds", "icon_color": 7322096}}
    doc = fixture("telegram", "supergroup_text")
    doc["message"].update(message_thread_id=5, is_topic_message=True, reply_to_message=created)
    [msg] = channel().parse(json.dumps(doc).encode())
    assert msg.addressed is False and msg.thread_id == "5"


def test_commands_still_parse_as_before():
    body = group_update(text="/new@AcmeSupportBot please", entities=[{"offset": 0, "length": 19, "type": "bot_command"}])
    [msg] = channel().parse(body)
    assert msg.command == NEW_SESSION and msg.addressed is True


@pytest.mark.parametrize("date", [float("nan"), float("inf"), "soon", None, True, 4e12])
def test_a_send_time_that_cannot_be_believed_is_the_receive_time(date):
    [msg] = channel().parse(with_message(text="when?", date=date) if date is not None else with_message(text="x"))
    assert msg.sent_at == (1764032600.0 if date is None else FIXTURE_NOW)  # None: the fixture's own date


def test_json_nan_and_huge_numbers_reach_the_parser_as_floats():
    body = with_message(text="when?").replace(b'"date": 1764032600', b'"date": 1e400')
    assert b"1e400" in body
    assert channel().parse(body)[0].sent_at == FIXTURE_NOW


def test_an_update_older_than_the_replay_window_is_refused():
    with pytest.raises(Replayed):
        channel().parse(with_message(text="old", date=int(FIXTURE_NOW - REPLAY_WINDOW_S - 60)))


@pytest.mark.parametrize("path, value", [
    (("chat", "id"), 10 ** 30), (("chat", "id"), "381920001"), (("from", "id"), "x:y"), (("from", "id"), True),
    (("from", "id"), 2 ** 70), (("message_id",), 1.5), (("message_id",), -(2 ** 64)),
])
def test_ids_that_are_not_64_bit_integers_are_malformed(path, value):
    doc = fixture("telegram", "private_text")
    target = doc["message"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(MalformedPayload, match="integer id"):
        channel().parse(json.dumps(doc).encode())


def test_a_topic_id_must_be_an_integer():
    doc = fixture("telegram", "supergroup_text")
    doc["message"].update(is_topic_message=True, message_thread_id="7:8")
    with pytest.raises(MalformedPayload, match="message_thread_id"):
        channel().parse(json.dumps(doc).encode())
