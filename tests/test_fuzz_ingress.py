"""Property tests (hypothesis) for everything that reads untrusted webhook input.

(a) every parser (WhatsApp, Telegram, Discord gateway dispatch, Discord interaction), given arbitrary bytes,
    arbitrary JSON, or arbitrary JSON inside the platform's envelope, returns a list of well-formed InboundMessage
    or raises MalformedPayload -- never any other exception;
(b) the same for mutations of the real sample payloads (tests/fixtures and the stand-in builders): a key dropped,
    a value replaced by another type, None, a huge number, ... at random paths (hypothesis), plus an exhaustive,
    deterministic sweep of every single-point mutation (every path x every type change) of every sample;
(c) the Flask ingress (real Publisher, in-process kombu broker, nothing mocked): requests without valid signatures
    never get a 5xx (nor a 2xx for POST) and never enqueue; correctly signed random bodies never get a 5xx, and
    whatever reaches the broker is a well-formed InboundMessage whose session key starts with the channel id;
    every answer carries nosniff and refuses framing; forwarded headers from a trusted proxy never cause a 5xx;
(d) the web chat: cookies the server did not sign never get a message in; random bodies from a real visitor never
    get a 5xx and publish only well-formed messages that name the visitor by its pseudonym, never its id.

Deterministic for CI (derandomize=True, no example database). A failure here is a bug in the code under test:
hypothesis prints the minimal failing example; the sweeps print one line per distinct exception.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from channel_helpers import fixture, make_config
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.standins import payloads as p
from ingress.app import create_app
from ingress.ledger import MemoryLedger
from ingress.publisher import Publisher
from ingress.webchat import COOKIE
from shared.channels.discord import DiscordChannel, is_snowflake
from shared.channels.telegram import TelegramChannel
from shared.channels.webchat import VISITOR, visitor_pseudonym
from shared.channels.whatsapp import WhatsAppChannel
from shared.config import load_settings
from shared.errors import MalformedPayload
from shared.messages import DM, GROUP, ID_LIMITS, NAME_LIMIT, NEW_SESSION, REPLAY_WINDOW_S, InboundMessage
from shared.signing import unsign

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

PHONE_ID = "106540352242922"  # the fixtures' phone_number_id (channel_helpers.make_config's default)
KEY = Ed25519PrivateKey.generate()
PUBLIC_HEX = KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

WHATSAPP = WhatsAppChannel(make_config("whatsapp"))
TELEGRAM = TelegramChannel(make_config("telegram"))
DISCORD = DiscordChannel(make_config("discord", public_key=PUBLIC_HEX))


# -- JSON strategies --------------------------------------------------------------------------------------------------

# Keys the parsers look up, so random objects reach past the first check.
KEYS = [
    "object", "entry", "changes", "value", "field", "metadata", "phone_number_id", "contacts", "wa_id", "profile",
    "name", "messages", "statuses", "from", "id", "timestamp", "type", "text", "body", "group_id", "caption",
    "filename", "image", "interactive", "button_reply", "title", "button", "reaction", "emoji", "location",
    "latitude", "longitude", "update_id", "message", "edited_message", "chat", "message_id", "date", "sender_chat",
    "first_name", "last_name", "username", "entities", "offset", "length", "document", "file_name", "photo", "t",
    "d", "op", "s", "author", "bot", "content", "attachments", "channel_id", "guild_id", "global_name", "data",
    "options", "member", "user", "webhook_id",
]
ISO_TIME = "2026-11-25T01:11:00.000000+00:00"
# Values the parsers compare against.
WORDS = [
    "whatsapp_business_account", PHONE_ID, "text", "image", "interactive", "button", "reaction", "location",
    "unsupported", "button_reply", "private", "group", "supergroup", "channel", "bot_command", "/new",
    "/new@AcmeSupportBot", "/new@OtherBot", "MESSAGE_CREATE", "READY", "ask", "new", "question",
    ISO_TIME, "0001-01-01T00:00:00", "9999-12-31T23:59:59-23:59", "1311000000000000101",
    "-1", "0", "1e999", "NaN", "",
]
# JSON numbers have no size limit; Python parses them into ints that float() cannot hold.
HUGE_INTS = [2**63, -(2**63) - 1, 2**64, 10**308, 10**309, -(10**309), 10**400]
HUGE_DIGITS = ["9" * 400, "1" + "0" * 330, "-" + "9" * 400]

strings = (
    st.text(max_size=12)
    | st.sampled_from(WORDS)
    | st.sampled_from(HUGE_DIGITS)
    | st.text(st.characters(exclude_categories=()), max_size=4)  # lone surrogates: legal JSON escapes (\ud800)
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(HUGE_INTS)
    | st.floats()  # includes NaN and +-Infinity, which Python's json reads and writes
    | strings
)
keys = st.sampled_from(KEYS) | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=6),
    max_leaves=24,
)


def encode(value: Any) -> bytes:
    """What a platform would POST: JSON text (surrogates escaped, NaN/Infinity as Python writes them)."""
    return json.dumps(value).encode()


# Each platform's envelope with a hole, so arbitrary JSON lands at every level the parser walks.
def _wa_value(value: Any) -> Any:
    return {"object": "whatsapp_business_account", "entry": [{"changes": [{"value": value}]}]}


ENVELOPES: dict[str, list[Callable[[Any], Any]]] = {
    "whatsapp": [
        lambda v: {"object": "whatsapp_business_account", "entry": v},
        lambda v: {"object": "whatsapp_business_account", "entry": [v]},
        lambda v: {"object": "whatsapp_business_account", "entry": [{"changes": v}]},
        lambda v: _wa_value(v),
        lambda v: _wa_value({"metadata": {"phone_number_id": PHONE_ID}, "contacts": v, "messages": []}),
        lambda v: _wa_value({"metadata": {"phone_number_id": PHONE_ID}, "messages": v}),
        lambda v: _wa_value({"metadata": {"phone_number_id": PHONE_ID}, "messages": [v]}),
        lambda v: _wa_value({"metadata": {"phone_number_id": PHONE_ID}, "messages": [
            {"from": "5511987650001", "id": "wamid.1", "timestamp": "1764032400", "type": "text", **_dict(v)}]}),
    ],
    "telegram": [
        lambda v: {"update_id": 1, "message": v},
        lambda v: {"update_id": 1, **_dict(v)},
        lambda v: {"update_id": 1, "message": {"message_id": 1, "chat": v}},
        lambda v: {"update_id": 1, "message": {"message_id": 1, "chat": {"id": 1, "type": "private"}, **_dict(v)}},
    ],
    "discord": [
        lambda v: {"t": "MESSAGE_CREATE", "d": v},
        lambda v: {"t": "MESSAGE_CREATE", "d": {"author": {"id": "1"}, "id": "1", "channel_id": "1",
                                                "content": "hi", "timestamp": ISO_TIME, **_dict(v)}},
        lambda v: {"t": "MESSAGE_CREATE", "d": {"author": v, "id": "1", "channel_id": "1", "content": "hi",
                                                "timestamp": ISO_TIME}},
    ],
    "interaction": [
        lambda v: {"type": 2, **_dict(v)},
        lambda v: {"type": 2, "id": "1311000000000000101", "channel_id": "1", "user": {"id": "1"}, "data": v},
        lambda v: {"type": 2, "id": "1311000000000000101", "channel_id": "1", "user": {"id": "1"},
                   "data": {"name": "ask", "options": v}},
        lambda v: {"type": 2, "id": "1311000000000000101", "channel_id": "1", "user": {"id": "1"},
                   "data": {"name": "ask", "options": [v]}},
        lambda v: {"type": 2, "id": "1311000000000000101", "channel_id": "1", "member": v, "data": {"name": "new"}},
    ],
}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {"value": value}


# -- mutations of the real payloads -----------------------------------------------------------------------------------

def _interaction_variants() -> list[Any]:
    ask = fixture("discord", "interaction_slash_command")
    new_dm = copy.deepcopy(ask)
    new_dm.pop("guild_id")
    new_dm["user"] = new_dm.pop("member")["user"]
    new_dm["data"] = {"id": "1", "name": "new", "type": 1}
    return [fixture("discord", "interaction_ping"), ask, new_dm]


def fresh(doc: Any) -> Any:
    """A fixture as if sent just now: parsers refuse messages older than the replay window."""
    text = json.dumps(doc)
    text = re.sub(r'"timestamp": "17640\d+"', f'"timestamp": "{int(time.time())}"', text)
    return json.loads(re.sub(r'"date": 17640\d+', f'"date": {int(time.time())}', text))


SAMPLES: dict[str, list[Any]] = {
    "whatsapp": [fresh(fixture("whatsapp", name)) for name in (
        "dm_text", "dm_reply_context", "group_text", "group_unsupported", "image_with_caption", "status_delivered")]
    + [p.whatsapp_text(PHONE_ID, "5511987650001", "Ana", "/new", "wamid.X", group_id="HBgLMTY1")],
    "telegram": [fresh(fixture("telegram", name)) for name in (
        "private_text", "private_command_new", "group_text", "group_command_new", "supergroup_text",
        "edited_message")],
    "discord": [fixture("discord", name) for name in (
        "gateway_message_create_dm", "gateway_message_create_guild", "gateway_hello", "gateway_ready_excerpt")]
    + [{"t": "MESSAGE_CREATE", "s": 2, "op": 0, "d": p.discord_message(
        "1290000000000000099", "402922222222222222", "Farid", "!new", "1311000000000000009")}]
    # posted by a webhook: ignored; every single mutation that drops webhook_id must still parse well-formed
    + [{"t": "MESSAGE_CREATE", "s": 3, "op": 0, "d": p.discord_message(
        "1290000000000000001", "1290000000000000555", "Deploy Notifier", "build 812 deployed",
        "1311000000000000010", guild_id="1280000000000000001") | {"webhook_id": "1290000000000000555"}}],
    "interaction": _interaction_variants(),
}
SAMPLES["gateway"] = SAMPLES["discord"]  # the same dispatches, read the way the gateway client reads them
ENVELOPES["gateway"] = ENVELOPES["discord"]

# One representative per JSON type, plus the values that break naive conversions (float(), int(), hashing,
# UTF-8 encoding): label -> value.
TYPE_REPS: dict[str, Any] = {
    "null": None, "true": True, "0": 0, "-1": -1, "1.5": 1.5, "NaN": float("nan"), "10**400": 10**400, '""': "",
    '"x"': "x", '"9"*400': HUGE_DIGITS[0], '"\\ud800"': "\ud800", "[]": [], "[null]": [None], "{}": {},
    '{"x": 1}': {"x": 1},
}


def _paths(doc: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _paths(value, (*prefix, index))


def _at(doc: Any, path: tuple) -> Any:
    for step in path:
        doc = doc[step]
    return doc


@st.composite
def mutated(draw: st.DrawFn, platform: str) -> Any:
    """A real sample with 1-4 mutations at random paths."""
    doc = copy.deepcopy(draw(st.sampled_from(SAMPLES[platform])))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(list(_paths(doc))))
        current = _at(doc, path)
        op = draw(st.sampled_from(["drop", "retype", "wrap", "replace"]))
        if op == "drop" and path:
            parent = _at(doc, path[:-1])
            del parent[path[-1]]
            continue
        if op == "retype":
            new = draw(st.sampled_from([*TYPE_REPS.values(), str(current)]))
        elif op == "wrap":
            new = draw(st.sampled_from([[current], {"value": current}, str(current)]))
        else:
            new = draw(json_values)
        new = copy.deepcopy(new)  # never alias TYPE_REPS's lists and dicts: a later mutation would change them
        if path:
            _at(doc, path[:-1])[path[-1]] = new
        else:
            doc = new
    return doc


# -- the property ----------------------------------------------------------------------------------------------------

def assert_well_formed(message: Any, channel_id: str, platform: str) -> None:
    assert isinstance(message, InboundMessage), message
    assert message.channel_id == channel_id and message.platform == platform
    for name in ("session_key", "chat_id", "chat_kind", "sender_id", "sender_name", "text", "platform_message_id"):
        value = getattr(message, name)
        assert isinstance(value, str), (name, message)
        value.encode("utf-8")  # it crosses processes as JSON and lands in the database and the partition hash
    assert message.chat_kind in (DM, GROUP)
    assert message.session_key == f"{channel_id}:{message.chat_kind}:{message.chat_id}"
    assert message.session_key.startswith(f"{channel_id}:")
    for name, limit in ID_LIMITS.items():  # every id fits its column, and holds nothing PostgreSQL refuses
        value = getattr(message, name)
        assert value is None or (len(value) <= limit and "\x00" not in value), (name, value)
    assert len(message.sender_name) <= NAME_LIMIT and "\x00" not in message.text + message.sender_name
    if platform == "discord":  # the reply's URL path is built from the chat id
        assert is_snowflake(message.chat_id) and is_snowflake(message.sender_id), message
    elif platform in ("whatsapp", "telegram"):
        assert re.fullmatch(r"-?[0-9]{1,20}", message.sender_id), message  # a phone number, a Telegram user
    # A send time the store and the policies can use: finite, not in the future, not older than a replay.
    assert isinstance(message.sent_at, float) and math.isfinite(message.sent_at), message
    assert message.sent_at <= time.time() + 300 and (platform == "discord" or
                                                      message.sent_at >= time.time() - REPLAY_WINDOW_S), message
    assert message.command in (None, NEW_SESSION)


def parse_interaction(body: bytes) -> list[InboundMessage]:
    response, messages = DISCORD.interaction(body)
    assert isinstance(response, dict) and response.get("type") in (1, 4), response
    json.dumps(response)
    return messages


def parse_gateway_event(body: bytes) -> list[InboundMessage]:
    """What ingress/discord_gateway.py does with a frame: its own json.loads, then parse_event(d) -- no load_json."""
    try:
        frame = json.loads(body)
    except ValueError:
        return []  # the gateway client's own decoding, not the parser's
    return DISCORD.parse_event(frame.get("d") if isinstance(frame, dict) else frame)


PARSERS: dict[str, tuple[Callable[[bytes], Any], str, str]] = {
    # name: (entry point, channel id, platform)
    "whatsapp": (WHATSAPP.parse, WHATSAPP.config.id, "whatsapp"),
    "telegram": (TELEGRAM.parse, TELEGRAM.config.id, "telegram"),
    "discord": (DISCORD.parse, DISCORD.config.id, "discord"),
    "interaction": (parse_interaction, DISCORD.config.id, "discord"),
    "gateway": (parse_gateway_event, DISCORD.config.id, "discord"),
}


def parses_or_rejects(name: str, body: bytes) -> list[InboundMessage]:
    """The property: a list of well-formed messages, or MalformedPayload; any other exception fails the test."""
    parse, channel_id, platform = PARSERS[name]
    try:
        messages = parse(body)
    except MalformedPayload:
        return []
    assert isinstance(messages, list), messages
    for message in messages:
        assert_well_formed(message, channel_id, platform)
    return messages


parser_names = pytest.mark.parametrize("name", list(PARSERS))


# -- (a) arbitrary input -----------------------------------------------------------------------------------------------

@parser_names
@FUZZ
@given(body=st.binary(max_size=300))
def test_parsers_on_arbitrary_bytes(name, body):
    parses_or_rejects(name, body)


@parser_names
@FUZZ
@given(value=json_values)
def test_parsers_on_arbitrary_json(name, value):
    parses_or_rejects(name, encode(value))


@parser_names
@FUZZ
@given(data=st.data())
def test_parsers_on_arbitrary_json_inside_the_platform_envelope(name, data):
    envelope = data.draw(st.sampled_from(ENVELOPES[name]), label="envelope")
    parses_or_rejects(name, encode(envelope(data.draw(json_values, label="value"))))


@pytest.mark.parametrize("name", ["discord", "gateway"])
@pytest.mark.parametrize("posted_by", ["webhook", "bot"])
@FUZZ
@given(data=st.data())
def test_messages_posted_by_webhooks_or_bots_never_become_turns(name, posted_by, data):
    """Whatever else a MESSAGE_CREATE holds: a non-null webhook_id, or an author that is a bot, gives no message."""
    d = {"author": {"id": "1"}, "id": "1", "channel_id": "1", "content": "hi", "timestamp": ISO_TIME,
         **data.draw(st.dictionaries(keys, json_values, max_size=6), label="other fields")}
    if posted_by == "webhook":
        d["webhook_id"] = data.draw(json_values.filter(lambda v: v is not None), label="webhook_id")
    else:
        d["author"] = {"id": "1", **_dict(d.get("author")), "bot": True}
    assert parses_or_rejects(name, encode({"t": "MESSAGE_CREATE", "d": d})) == []


# -- (b) mutated real payloads -------------------------------------------------------------------------------------------

@parser_names
def test_the_unmutated_samples_parse(name):
    """The mutation base is valid: every sample parses without error (most into at least one message)."""
    found = [parses_or_rejects(name, encode(doc)) for doc in SAMPLES[name]]
    assert sum(1 for messages in found if messages) >= len(SAMPLES[name]) // 2


@parser_names
@FUZZ
@given(data=st.data())
def test_parsers_on_mutated_samples(name, data):
    parses_or_rejects(name, encode(data.draw(mutated(name), label="mutated sample")))


def single_mutations(doc: Any) -> Iterator[tuple[str, Any]]:
    """Every document that differs from `doc` at exactly one path: key dropped, or value of another type."""
    for path in _paths(doc):
        current = _at(doc, path)
        replacements = [("drop", None)] if path else []
        replacements += [(f"= {label}", value) for label, value in TYPE_REPS.items()]
        replacements += [("= str(value)", str(current)), ("= [value]", [current]), ("= {value}", {"value": current})]
        for label, value in replacements:
            mutant = copy.deepcopy(doc)
            if not path:
                mutant = copy.deepcopy(value)
            elif label == "drop":
                del _at(mutant, path[:-1])[path[-1]]
            else:
                _at(mutant, path[:-1])[path[-1]] = copy.deepcopy(value)
            yield f"{'.'.join(map(str, path)) or '<root>'} {label}", mutant


SAMPLE_IDS = [(name, index) for name, docs in SAMPLES.items() for index in range(len(docs))]


@pytest.mark.parametrize("name, index", SAMPLE_IDS, ids=[f"{name}-{index}" for name, index in SAMPLE_IDS])
def test_every_single_mutation_of_every_sample(name, index):
    """Exhaustive and deterministic (no hypothesis): each path x each type change, so no single-point bug hides."""
    failures: dict[str, str] = {}  # one line per distinct exception
    for label, mutant in single_mutations(SAMPLES[name][index]):
        try:
            parses_or_rejects(name, encode(mutant))
        except Exception as exc:  # noqa: BLE001 - collected, then reported together
            failures.setdefault(f"{type(exc).__name__}: {exc}", label)
    assert not failures, "\n".join(f"{where}  ->  {error}" for error, where in failures.items())


# -- (c) the webhook endpoints ---------------------------------------------------------------------------------------------

WA, TG, DC, WEB = "fz-wa", "fz-tg", "fz-dc", "fz-web"
SECRETS = {
    "FZ_WA_APP_SECRET": "fz-wa-app-secret", "FZ_WA_VERIFY_TOKEN": "fz-wa-verify-token",
    "FZ_WA_ACCESS_TOKEN": "fz-wa-access-token", "FZ_TG_BOT_TOKEN": "1:fz-tg-bot-token",
    "FZ_TG_SECRET_TOKEN": "fz-tg-secret-token", "FZ_DC_BOT_TOKEN": "fz-dc-bot-token",
}
CONFIG = f"""
[[channels]]
id = "{WA}"
platform = "whatsapp"
agent = "echo"
secrets = {{ app_secret = "FZ_WA_APP_SECRET", verify_token = "FZ_WA_VERIFY_TOKEN", access_token = "FZ_WA_ACCESS_TOKEN" }}
options = {{ phone_number_id = "{PHONE_ID}" }}

[[channels]]
id = "{TG}"
platform = "telegram"
agent = "echo"
secrets = {{ bot_token = "FZ_TG_BOT_TOKEN", secret_token = "FZ_TG_SECRET_TOKEN" }}
options = {{ bot_username = "AcmeSupportBot" }}

[[channels]]
id = "{DC}"
platform = "discord"
agent = "echo"
secrets = {{ bot_token = "FZ_DC_BOT_TOKEN", public_key = "FZ_DC_PUBLIC_KEY" }}

[[channels]]
id = "{WEB}"
platform = "webchat"
agent = "echo"
# Limits out of the way: every example posts as the same visitor, from the same address.
options = {{ messages_per_minute = 1e9, address_messages_per_minute = 1e9, channel_messages_per_minute = 1e9 }}
"""


class CountingPublisher(Publisher):
    """The real Publisher; only adds up what `publish` reports as newly enqueued."""

    enqueued = 0

    def publish(self, messages: list[InboundMessage], dedupe: bool = True) -> int:
        count = super().publish(messages, dedupe)
        self.enqueued += count
        return count


class Ingress:
    def __init__(self, tmp: Path):
        (tmp / "channels.toml").write_text(CONFIG)
        settings = load_settings({"CHATSESSIONS_CONFIG": str(tmp / "channels.toml"), "FZ_DC_PUBLIC_KEY": PUBLIC_HEX,
                                  "BROKER_URL": "memory://localhost/", **SECRETS,
                                  "TRUSTED_PROXIES": "127.0.0.0/8"})  # the test client's peer: forwarded headers read
        self.secret_key = settings.secret_key
        self.publisher = CountingPublisher(settings, ledger=MemoryLedger())
        self.queues = [q.name for q in self.publisher.app.conf.task_queues]
        self.app = create_app(settings, self.publisher)
        # An exception escaping a view would be a 500: let it reach the test with its traceback.
        self.app.config["PROPAGATE_EXCEPTIONS"] = True
        self.client = self.app.test_client()

    def reset(self) -> None:
        """Empty queues, zero counts, and a fresh ledger (so redelivery dedupe cannot hide a message)."""
        self.drain()
        self.publisher.enqueued = 0
        self.publisher.ledger = MemoryLedger()

    def drain(self) -> list[dict[str, Any]]:
        """Every task waiting on the memory broker's queues, removed; returns the InboundMessage dicts."""
        found = []
        with self.publisher.app.connection_for_write() as conn:
            channel = conn.default_channel
            for name in self.queues:
                while channel._size(name):
                    message = channel.message_to_python(channel._get(name))
                    assert message.headers["task"] == "chat.handle_inbound"
                    args, kwargs, _embed = message.decode()
                    assert kwargs == {} and len(args) == 1
                    found.append(args[0])
        return found


@pytest.fixture(scope="module")
def ingress(tmp_path_factory) -> Iterator[Ingress]:
    stack = Ingress(tmp_path_factory.mktemp("fuzz-ingress"))
    stack.reset()
    yield stack
    stack.drain()
    stack.publisher.app.close()


ENDPOINTS = {  # name: path
    "whatsapp": f"/webhooks/{WA}",
    "telegram": f"/webhooks/{TG}",
    "discord-interactions": f"/webhooks/{DC}/interactions",
    "discord-plain": f"/webhooks/{DC}",
    "whatsapp-interactions": f"/webhooks/{WA}/interactions",
    "unknown": "/webhooks/nope",
}
OTHER_METHODS = ["GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"]
NOW = str(int(time.time()))

header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)
headers = st.fixed_dictionaries(
    {},
    optional={
        "X-Hub-Signature-256": header_text | st.sampled_from(["", "sha256=", "sha256=" + "0" * 64])
        | st.binary(min_size=32, max_size=32).map(lambda b: "sha256=" + b.hex()),
        "X-Telegram-Bot-Api-Secret-Token": header_text | st.sampled_from(["", "fz-tg-secret", "secret_token-value"]),
        "X-Signature-Ed25519": header_text | st.sampled_from(["", "zz", "00" * 64])
        | st.binary(min_size=1, max_size=64).map(bytes.hex),
        "X-Signature-Timestamp": header_text | st.integers().map(str)
        | st.sampled_from(["", NOW, str(int(NOW) - 600), "-1", "1e3", " 1 ", "1_0", *HUGE_DIGITS]),
        "Content-Type": st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                         "multipart/form-data; boundary=x"]) | header_text,
        "X-Forwarded-For": header_text | st.lists(st.ip_addresses().map(str) | st.sampled_from(
            ["", "unknown", "[::1]:80", "1.2.3.4:5", "[", "]:1", "::ffff:1.2.3.4", "999.1.1.1"]), max_size=4)
        .map(", ".join),
        "X-Forwarded-Proto": header_text | st.sampled_from(["https", "http", "HTTPS, http", ",", ""]),
    },
)
bodies = (
    st.binary(max_size=400)
    | json_values.map(encode)
    | st.sampled_from(list(SAMPLES)).flatmap(mutated).map(encode)
    | st.sampled_from([encode(doc) for docs in SAMPLES.values() for doc in docs])
)
queries = st.dictionaries(st.sampled_from(["hub.mode", "hub.verify_token", "hub.challenge"]) | header_text,
                          header_text, max_size=3)


def assert_nothing_enqueued(ingress: Ingress) -> None:
    assert ingress.publisher.enqueued == 0
    assert ingress.drain() == []


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@FUZZ
@given(body=bodies, headers=headers)
def test_unsigned_posts_never_5xx_never_accepted_never_enqueued(ingress, endpoint, body, headers):
    ingress.reset()
    response = ingress.client.post(ENDPOINTS[endpoint], data=body, headers=headers)
    assert response.status_code < 500, (response.status_code, response.data)
    assert response.status_code in (401, 404), (response.status_code, response.data)
    assert_nothing_enqueued(ingress)


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@FUZZ
@given(method=st.sampled_from(OTHER_METHODS), body=bodies, headers=headers, query=queries)
def test_other_methods_never_5xx_never_enqueue(ingress, endpoint, method, body, headers, query):
    ingress.reset()
    response = ingress.client.open(ENDPOINTS[endpoint], method=method, data=body, headers=headers,
                                   query_string=query)
    assert response.status_code < 500, (response.status_code, response.data)
    if method in ("PUT", "DELETE", "PATCH"):
        assert response.status_code == 405
    elif method in ("GET", "HEAD") and endpoint == "whatsapp":
        assert response.status_code == 403  # no random query knows the verify token
    elif method in ("GET", "HEAD"):
        assert response.status_code in (404, 405)
    assert_nothing_enqueued(ingress)


@FUZZ
@given(channel_id=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#%"),
                          min_size=1, max_size=20),
       suffix=st.sampled_from(["", "/interactions", "/", "/x"]),
       method=st.sampled_from(["POST", *OTHER_METHODS]), body=bodies,
       headers=headers)
def test_requests_to_any_path_never_5xx_never_enqueue(ingress, channel_id, suffix, method, body, headers):
    ingress.reset()
    response = ingress.client.open(f"/webhooks/{channel_id}{suffix}", method=method, data=body, headers=headers)
    assert response.status_code < 500, (response.status_code, response.data)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert_nothing_enqueued(ingress)


# -- (d) the web chat ----------------------------------------------------------------------------------------------

cookies = header_text | st.sampled_from(["", ".", "..", "a.b", "x" * 32 + ".", "." + "y" * 27]) | st.builds(
    lambda raw, sig: f"{raw}.{sig}", st.text("abcXYZ019_-", min_size=22, max_size=40),
    st.text("abcXYZ019_-", min_size=0, max_size=30))


@FUZZ
@given(cookie=cookies, body=bodies, headers=headers, path=st.sampled_from(["/messages", "/replies", ""]),
       method=st.sampled_from(["GET", "POST"]))
def test_web_chat_cookies_the_server_did_not_sign_never_get_a_message_in(ingress, cookie, body, headers, path,
                                                                        method):
    ingress.reset()
    client = ingress.app.test_client()
    client.set_cookie(COOKIE, cookie)
    response = client.open(f"/chat/{WEB}{path}", method=method, data=body, headers=headers)
    assert response.status_code < 500, (response.status_code, response.data)
    assert_nothing_enqueued(ingress)


@FUZZ
@given(body=bodies | json_values.map(lambda text: encode({"id": "fuzz-message-01", "text": text}))
       | json_values.map(lambda doc: encode({"id": "fuzz-message-02", **_dict(doc)})), headers=headers)
def test_web_chat_random_bodies_never_5xx_and_publish_only_the_visitors_pseudonym(ingress, visitor, body, headers):
    ingress.reset()
    client, visitor_id, pseudonym = visitor
    response = client.post(f"/chat/{WEB}/messages", data=body,
                           headers={**headers, "Content-Type": headers.get("Content-Type", "application/json")})
    assert response.status_code < 500, (response.status_code, response.data)
    assert response.status_code in (200, 400, 413, 415), (response.status_code, response.data)
    enqueued = ingress.drain()
    assert len(enqueued) == ingress.publisher.enqueued == (1 if response.status_code == 200
                                                           and not response.json["duplicate"] else 0)
    for task in enqueued:
        message = InboundMessage.from_dict(task)
        assert_well_formed(message, WEB, "webchat")
        assert message.chat_id == message.sender_id == pseudonym
        assert message.platform_message_id.startswith(pseudonym + ":") and visitor_id not in json.dumps(task)


@pytest.fixture(scope="module")
def visitor(ingress) -> tuple[Any, str, str]:
    """One real visitor: the page's cookie, its id and its pseudonym."""
    client = ingress.app.test_client()
    assert client.get(f"/chat/{WEB}").status_code == 200
    token = client.get_cookie(COOKIE).value
    return client, unsign(ingress.secret_key, VISITOR, token), visitor_pseudonym(ingress.secret_key, token)


def _sign(endpoint: str, body: bytes) -> dict[str, str]:
    if endpoint == "whatsapp":
        digest = hmac.new(SECRETS["FZ_WA_APP_SECRET"].encode(), body, hashlib.sha256).hexdigest()
        return {"Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={digest}"}
    if endpoint == "telegram":
        return p.telegram_headers(SECRETS["FZ_TG_SECRET_TOKEN"])
    return p.sign_discord(body, KEY)


SIGNED = {  # endpoint: (path, parser samples, channel id, platform, statuses the endpoint may answer)
    "whatsapp": (f"/webhooks/{WA}", "whatsapp", WA, "whatsapp", (200, 400)),
    "telegram": (f"/webhooks/{TG}", "telegram", TG, "telegram", (200,)),  # malformed updates are dropped with 200
    "discord-interactions": (f"/webhooks/{DC}/interactions", "interaction", DC, "discord", (200, 400)),
}


def signed_bodies(samples: str) -> dict[str, st.SearchStrategy[bytes]]:
    return {
        "bytes": st.binary(max_size=300),
        "json": json_values.map(encode),
        "envelope": st.sampled_from(ENVELOPES[samples]).flatmap(lambda envelope: json_values.map(envelope)).map(encode),
        "mutated": mutated(samples).map(encode),
    }


@pytest.mark.parametrize("source", ["bytes", "json", "envelope", "mutated"])
@pytest.mark.parametrize("endpoint", list(SIGNED))
@FUZZ
@given(data=st.data())
def test_signed_random_bodies_never_5xx_and_enqueue_only_well_formed_messages(ingress, endpoint, source, data):
    path, samples, channel_id, platform, statuses = SIGNED[endpoint]
    body = data.draw(signed_bodies(samples)[source], label="body")
    ingress.reset()
    response = ingress.client.post(path, data=body, headers=_sign(endpoint, body))
    assert response.status_code < 500, (response.status_code, response.data)
    assert response.status_code in statuses, (response.status_code, response.data)
    enqueued = ingress.drain()
    assert len(enqueued) == ingress.publisher.enqueued
    if response.status_code != 200:
        assert enqueued == []
    for task in enqueued:
        message = InboundMessage.from_dict(task)
        assert_well_formed(message, channel_id, platform)
        assert message.seq >= 1 and message.received_at > 0


def _accepted_mutants(samples: str) -> Iterator[tuple[str, bytes, list[InboundMessage]]]:
    """Single-point mutations of the samples that the parser accepts with at least one message."""
    parse = PARSERS[samples][0]
    for index, doc in enumerate(SAMPLES[samples]):
        for label, mutant in single_mutations(doc):
            body = encode(mutant)
            try:
                messages = parse(body)
            except Exception:  # noqa: BLE001 - parser outcomes are test_every_single_mutation_of_every_sample's job
                continue
            if messages:
                yield f"sample {index}: {label}", body, messages


@pytest.mark.parametrize("endpoint", list(SIGNED))
def test_every_accepted_single_mutation_is_answered_200_and_enqueued_intact(ingress, endpoint):
    """Deterministic companion of the signed fuzz: whatever the parser accepts must also get through the Publisher."""
    path, samples, channel_id, platform, _ = SIGNED[endpoint]
    failures: dict[str, str] = {}
    tried = 0
    for where, body, messages in _accepted_mutants(samples):
        tried += 1
        ingress.reset()
        try:
            response = ingress.client.post(path, data=body, headers=_sign(endpoint, body))
            enqueued = ingress.drain()
            assert response.status_code == 200, f"HTTP {response.status_code} {response.data!r}"
            assert len(enqueued) == len(messages) == ingress.publisher.enqueued, "not every message was enqueued"
            for task in enqueued:
                assert_well_formed(InboundMessage.from_dict(task), channel_id, platform)
        except Exception as exc:  # noqa: BLE001 - collected, then reported together
            failures.setdefault(f"{type(exc).__name__}: {exc}".splitlines()[0], where)
    assert tried >= 50
    assert not failures, "\n".join(f"{where}  ->  {error}" for error, where in failures.items())


def test_every_accepted_gateway_mutation_publishes(ingress):
    """Gateway MESSAGE_CREATE events go through the same Publisher (the gateway retries an EnqueueFailed forever)."""
    failures: dict[str, str] = {}
    tried = 0
    for where, _body, messages in _accepted_mutants("gateway"):
        tried += 1
        ingress.reset()
        try:
            assert ingress.publisher.publish(messages) == len(messages)
            assert len(ingress.drain()) == len(messages)
        except Exception as exc:  # noqa: BLE001 - collected, then reported together
            failures.setdefault(f"{type(exc).__name__}: {exc}".splitlines()[0], where)
    assert tried >= 50
    assert not failures, "\n".join(f"{where}  ->  {error}" for error, where in failures.items())
