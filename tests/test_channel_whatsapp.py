import copy
import hashlib
import hmac
import json

import pytest
from channel_helpers import FIXTURE_NOW, Reply, StandIn, fixture, fixture_bytes, make_config, no_sleep

from shared.channels import build_channel
from shared.channels.base import WebhookRequest
from shared.channels.whatsapp import WhatsAppChannel
from shared.channels.base import Replayed
from shared.messages import REPLAY_WINDOW_S
from shared.errors import InvalidSignature, MalformedPayload
from shared.messages import DM, GROUP, NEW_SESSION

ANA = "5511987650001"
GROUP_ID = "HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA"


def channel(now: float = FIXTURE_NOW, **kw) -> WhatsAppChannel:
    return WhatsAppChannel(make_config("whatsapp", **kw), now=lambda: now)


def with_message(msg: dict, base: str = "dm_text") -> bytes:
    doc = fixture("whatsapp", base)
    doc["entry"][0]["changes"][0]["value"]["messages"] = [msg]
    return json.dumps(doc).encode()


def text_message(body: str, sender: str = ANA) -> bytes:
    return with_message({"from": sender, "id": "wamid.1", "timestamp": "1764032400", "type": "text", "text": {"body": body}})


def signed(body: bytes, secret: str = "app_secret-value") -> WebhookRequest:
    sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return WebhookRequest("POST", {"x-hub-signature-256": sig}, body=body)


def test_build_channel_picks_whatsapp():
    assert isinstance(build_channel(make_config("whatsapp")), WhatsAppChannel)


def test_dm_text():
    [msg] = channel().parse(fixture_bytes("whatsapp", "dm_text"))
    assert msg.session_key == f"whatsapp-main:{DM}:{ANA}"
    assert (msg.chat_id, msg.chat_kind, msg.sender_id, msg.sender_name) == (ANA, DM, ANA, "Ana Souza")
    assert msg.text == "Hi, my order 48213 has not arrived"
    assert msg.platform == "whatsapp" and msg.channel_id == "whatsapp-main"
    assert msg.platform_message_id.startswith("wamid.") and msg.sent_at == 1764032400.0
    assert msg.command is None


def test_dm_reply_context_is_same_session_as_dm():
    [reply] = channel().parse(fixture_bytes("whatsapp", "dm_reply_context"))
    [first] = channel().parse(fixture_bytes("whatsapp", "dm_text"))
    assert reply.session_key == first.session_key and reply.text == "yes, that one"


def test_group_text_keeps_member_as_sender():
    [msg] = channel().parse(fixture_bytes("whatsapp", "group_text"))
    assert msg.session_key == f"whatsapp-main:{GROUP}:{GROUP_ID}"
    assert (msg.chat_id, msg.chat_kind) == (GROUP_ID, GROUP)
    assert (msg.sender_id, msg.sender_name) == ("5511987650002", "Bruno Lima")
    assert msg.text == "Does the store open on Sunday?"


def test_group_unsupported_is_placeholder():
    [msg] = channel().parse(fixture_bytes("whatsapp", "group_unsupported"))
    assert msg.text == "[unsupported message]" and msg.chat_kind == GROUP


def test_image_with_caption():
    [msg] = channel().parse(fixture_bytes("whatsapp", "image_with_caption"))
    assert msg.text == "[image: the box arrived broken]" and msg.chat_id == ANA


@pytest.mark.parametrize(
    "extra, text",
    [
        ({"type": "image", "image": {"id": "1"}}, "[image]"),
        ({"type": "sticker", "sticker": {"id": "1"}}, "[sticker]"),
        ({"type": "document", "document": {"id": "1", "caption": "invoice"}}, "[document: invoice]"),
        ({"type": "location", "location": {"latitude": -23.5, "longitude": -46.6}}, "[location: -23.5, -46.6]"),
        ({"type": "interactive", "interactive": {"type": "button_reply", "button_reply": {"title": "Yes"}}}, "Yes"),
        ({"type": "interactive", "interactive": {"type": "list_reply", "list_reply": {"title": "Sizes"}}}, "Sizes"),
        ({"type": "interactive", "interactive": {"type": "nfm_reply", "nfm_reply": {"body": "Sent"}}}, "[interactive]"),
        ({"type": "button", "button": {"payload": "p", "text": "Track order"}}, "Track order"),
        ({"type": "reaction", "reaction": {"message_id": "wamid.x", "emoji": "👍"}}, "[reaction: 👍]"),
        ({"type": "unsupported"}, "[unsupported message]"),
        ({"type": "order", "order": {"catalog_id": "c"}}, "[order]"),
        ({"type": "brand_new_kind", "brand_new_kind": 5}, "[brand_new_kind]"),
    ],
)
def test_non_text_placeholders(extra, text):
    [msg] = channel().parse(with_message({"from": ANA, "id": "wamid.1", "timestamp": "1764032400", **extra}))
    assert msg.text == text and msg.command is None


@pytest.mark.parametrize("text", ["/new", "  /NEW ", "/New"])
def test_new_command(text):
    [msg] = channel().parse(text_message(text))
    assert msg.command == NEW_SESSION


def test_new_inside_sentence_is_not_a_command():
    assert channel().parse(text_message("/new phone?"))[0].command is None


def test_sender_name_falls_back_to_number():
    doc = fixture("whatsapp", "dm_text")
    doc["entry"][0]["changes"][0]["value"]["contacts"] = []
    assert channel().parse(json.dumps(doc).encode())[0].sender_name == ANA


def test_status_callbacks_give_no_messages():
    assert channel().parse(fixture_bytes("whatsapp", "status_delivered")) == []


def test_other_phone_number_is_ignored():
    assert channel(phone_number_id="999").parse(fixture_bytes("whatsapp", "dm_text")) == []


def test_every_entry_change_and_message_is_handled():
    doc = fixture("whatsapp", "dm_text")
    value = doc["entry"][0]["changes"][0]["value"]
    second = copy.deepcopy(value["messages"][0]) | {"id": "wamid.2", "text": {"body": "hello?"}}
    value["messages"].append(second)
    doc["entry"].append(fixture("whatsapp", "group_text")["entry"][0])
    doc["entry"][0]["changes"].append(fixture("whatsapp", "status_delivered")["entry"][0]["changes"][0])
    texts = [m.text for m in channel().parse(json.dumps(doc).encode())]
    assert texts == ["Hi, my order 48213 has not arrived", "hello?", "Does the store open on Sunday?"]


def test_session_keys_are_per_number_per_group_per_channel():
    main, other = channel(), channel(channel_id="whatsapp-eu")
    dm = main.parse(fixture_bytes("whatsapp", "dm_text"))[0]
    other_number = main.parse(text_message("x", sender="5511900000000"))[0]
    group = main.parse(fixture_bytes("whatsapp", "group_text"))[0]
    same_phone_elsewhere = other.parse(fixture_bytes("whatsapp", "dm_text"))[0]
    keys = {dm.session_key, other_number.session_key, group.session_key, same_phone_elsewhere.session_key}
    assert len(keys) == 4
    assert same_phone_elsewhere.session_key == f"whatsapp-eu:{DM}:{ANA}"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"object": "page", "entry": []}',
        b'{"object": "whatsapp_business_account"}',
        b'{"object": "whatsapp_business_account", "entry": {}}',
        with_message({}).replace(b'"messages": [{}]', b'"messages": {}'),
        b"[" * 100_000 + b"]" * 100_000,  # nested too deeply for the JSON parser: 400, not a 500 the platform retries
    ],
)
def test_malformed_bodies(body):
    with pytest.raises(MalformedPayload):
        channel().parse(body)


@pytest.mark.parametrize("drop", ["id", "from"])
def test_message_missing_id_or_from_is_malformed(drop):
    msg = {"from": ANA, "id": "wamid.1", "timestamp": "1764032400", "type": "text", "text": {"body": "x"}}
    del msg[drop]
    with pytest.raises(MalformedPayload, match=drop):
        channel().parse(with_message(msg))


def test_signature_accepts_exact_body():
    body = fixture_bytes("whatsapp", "dm_text")
    channel().verify(signed(body))


@pytest.mark.parametrize(
    "request_",
    [
        signed(b"{}", secret="wrong"),
        WebhookRequest("POST", {}, body=b"{}"),
        WebhookRequest("POST", {"x-hub-signature-256": "sha256=00"}, body=b"{}"),
        WebhookRequest("POST", signed(b"{}").headers, body=b"{ }"),
    ],
    ids=["forged", "missing", "garbage", "body-changed"],
)
def test_signature_rejects(request_):
    with pytest.raises(InvalidSignature):
        channel().verify(request_)


def test_handshake():
    ch = channel()
    query = {"hub.mode": "subscribe", "hub.verify_token": "verify_token-value", "hub.challenge": "1158201444"}
    assert ch.handshake(query) == "1158201444"
    for bad in ({**query, "hub.verify_token": "nope"}, {**query, "hub.mode": "unsubscribe"}, {"hub.challenge": "1"}):
        with pytest.raises(InvalidSignature):
            ch.handshake(bad)


def test_send_splits_and_posts_each_chunk():
    response = fixture("whatsapp", "send_text_response")
    with StandIn(default=Reply(body=response)) as server:
        ch = channel(api_base=server.base)
        [msg] = ch.parse(fixture_bytes("whatsapp", "dm_text"))
        delivery = ch.send(msg.chat_id, msg.chat_kind, "a" * 5000)
    assert delivery.ok and delivery.attempts == 2
    assert delivery.platform_message_ids == (response["messages"][0]["id"],) * 2
    assert [r.path for r in server.requests] == ["/v21.0/106540352242922/messages"] * 2
    assert server.requests[0].headers["authorization"] == "Bearer access_token-value"
    first = server.requests[0].body
    assert first == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": ANA,
        "type": "text",
        "text": {"body": "a" * 4096},
    }
    assert server.requests[1].body["text"]["body"] == "a" * 904


def test_send_to_group_uses_group_recipient_and_api_version():
    with StandIn(default=Reply(body=fixture("whatsapp", "send_text_response"))) as server:
        ch = channel(api_base=server.base, api_version="v22.0")
        [msg] = ch.parse(fixture_bytes("whatsapp", "group_text"))
        assert ch.send(msg.chat_id, msg.chat_kind, "Yes, 10:00 to 16:00 on Sundays.").ok
    expected = fixture("whatsapp", "send_group_text_request")
    assert server.requests[0].path == "/v22.0/106540352242922/messages"
    assert server.requests[0].body == expected


def test_send_stops_at_first_failed_chunk():
    with StandIn(Reply(400, fixture("whatsapp", "error_outside_window"))) as server:
        ch = channel(api_base=server.base)
        [msg] = ch.parse(fixture_bytes("whatsapp", "dm_text"))
        delivery = ch.send(msg.chat_id, msg.chat_kind, "b" * 9000)
    assert not delivery.ok and "131047" in delivery.error
    assert len(server.requests) == 1


@pytest.mark.parametrize("code", [130429, 131056])
def test_rate_limit_codes_are_retried_even_with_http_400(code):
    error = fixture("whatsapp", "error_rate_limit")
    error["error"]["code"] = code
    with StandIn(Reply(400, error), default=Reply(body=fixture("whatsapp", "send_text_response"))) as server:
        ch = channel(api_base=server.base)
        waits = no_sleep(ch.sender)
        [msg] = ch.parse(fixture_bytes("whatsapp", "dm_text"))
        delivery = ch.send(msg.chat_id, msg.chat_kind, "hello")
    assert delivery.ok and delivery.attempts == 2 and len(waits) == 1
    assert len(server.requests) == 2


# --------------------------------------------------------------------------------------------------------------------
# Addressed: a group message asks for an answer only when it replies to us, mentions our number or is a command.
# The Cloud API groups webhook has no mention list; `context` is the reply reference every message may carry.

OUR_NUMBER = "15550783881"  # metadata.display_phone_number in the samples


def group_message(**fields) -> bytes:
    doc = fixture("whatsapp", "group_text")
    doc["entry"][0]["changes"][0]["value"]["messages"][0].update(fields)
    return json.dumps(doc).encode()


def test_dms_are_always_addressed():
    assert channel().parse(fixture_bytes("whatsapp", "dm_text"))[0].addressed is True
    assert channel().parse(fixture_bytes("whatsapp", "dm_reply_context"))[0].addressed is True


def test_plain_group_message_is_not_addressed():
    assert channel().parse(fixture_bytes("whatsapp", "group_text"))[0].addressed is False
    assert channel().parse(fixture_bytes("whatsapp", "group_unsupported"))[0].addressed is False


def test_group_reply_to_our_message_is_addressed():
    # the same `context` as dm_reply_context.json: from = the author of the message replied to
    reply = group_message(context={"from": OUR_NUMBER, "id": "wamid.HBgNNTUxMTk4NzY1MDAwMRUCABEYEjQ2QkI1RDM3RDk2QzdGNUE3MQA="})
    assert channel().parse(reply)[0].addressed is True
    other = group_message(context={"from": ANA, "id": "wamid.x"})
    assert channel().parse(other)[0].addressed is False


@pytest.mark.parametrize("body, addressed", [
    (f"@{OUR_NUMBER} are you open on Sunday?", True),
    (f"are you open, @{OUR_NUMBER}?", True),
    (f"@+{OUR_NUMBER} hi", True),
    (f"@{OUR_NUMBER}2 hi", False),  # another number that starts like ours
    (f"call {OUR_NUMBER}", False),
    ("/new", True),
    ("/NEW ", True),
])
def test_group_mention_of_our_number_or_command(body, addressed):
    [msg] = channel().parse(group_message(text={"body": body}))
    assert msg.addressed is addressed


def test_no_display_number_means_only_commands_address():
    doc = fixture("whatsapp", "group_text")
    value = doc["entry"][0]["changes"][0]["value"]
    del value["metadata"]["display_phone_number"]
    value["messages"][0]["context"] = {"from": OUR_NUMBER, "id": "wamid.x"}
    assert channel().parse(json.dumps(doc).encode())[0].addressed is False


def test_whatsapp_has_no_threads():
    assert channel().parse(group_message(context={"from": OUR_NUMBER, "id": "w"}))[0].thread_id is None


def timed(timestamp) -> bytes:
    msg = {"from": ANA, "id": "wamid.1", "type": "text", "text": {"body": "when?"}}
    return with_message(msg if timestamp is None else {**msg, "timestamp": timestamp})


@pytest.mark.parametrize("timestamp", ["nan", "inf", "-inf", "1e400", "NaN", "soon", None, "", "999999999999", [1]])
def test_a_send_time_that_cannot_be_believed_is_the_receive_time(timestamp):
    """NaN, infinities, 1e400 and far-future times once reached the store, where the turn failed for ever."""
    [msg] = channel().parse(timed(timestamp))
    assert msg.sent_at == FIXTURE_NOW


def test_a_message_older_than_the_replay_window_is_refused():
    """A captured webhook sent again a week later could bring an erased conversation back."""
    channel().parse(timed(str(int(FIXTURE_NOW - REPLAY_WINDOW_S + 60))))
    with pytest.raises(Replayed, match="older than the replay window"):
        channel().parse(timed(str(int(FIXTURE_NOW - REPLAY_WINDOW_S - 60))))
    with pytest.raises(Replayed):
        channel().parse(timed("0"))


@pytest.mark.parametrize("field, value", [
    ("from", "5511:98765"), ("from", "+5511987650001"), ("from", "1" * 21), ("from", "ana"),
    ("id", "wamid." + "A" * 200), ("id", "wamid:1"), ("id", ""), ("id", "wamid 1"),
    ("group_id", "G" * 101), ("group_id", "group:1"), ("group_id", 12345),
])
def test_ids_of_the_wrong_format_or_length_are_malformed(field, value):
    msg = {"from": ANA, "id": "wamid.1", "timestamp": "1764032400", "type": "text", "text": {"body": "x"}}
    with pytest.raises(MalformedPayload, match=field):
        channel().parse(with_message({**msg, field: value}))
