"""Bad input at the webhook ingress, through the real Flask app and a real Publisher.

Nothing is mocked: the Publisher sends on Celery's in-process kombu broker (BROKER_URL=memory://) with a
MemoryLedger, and "enqueued" is counted twice and cross-checked: the sum of what `publish` returned, and the depth
of the partition queues in the memory broker. Logging is the production setup (shared.logs.configure_logging, JSON)
writing to stderr, read back with capsys; every test also checks that no secret reached the log.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from channel_helpers import fixture, fixture_bytes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cli.standins import payloads as p
from ingress.app import MAX_BODY_BYTES, create_app
from ingress.ledger import MemoryLedger
from ingress.publisher import Publisher
from ingress.webchat import COOKIE
from shared.config import Settings, load_settings
from shared.logs import REDACTED, configure_logging
from shared.messages import REPLAY_WINDOW_S, InboundMessage

WA, TG, DC, WEB = "acme-wa", "acme-tg", "acme-dc", "acme-web"
PHONE_ID = "106540352242922"  # the fixtures' phone_number_id
DISCORD_KEY = Ed25519PrivateKey.generate()
DISCORD_PUBLIC_HEX = DISCORD_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

# Distinctive values, so a leak into the log cannot hide behind a common word.
SECRETS = {
    "T_WA_APP_SECRET": "wa-app-secret-Q7xk2m9P",
    "T_WA_VERIFY_TOKEN": "wa-verify-token-V3nb8c",
    "T_WA_ACCESS_TOKEN": "wa-access-token-Ak5r0z",
    "T_TG_BOT_TOKEN": "123456789:tg-bot-token-Hn8wJ2",
    "T_TG_SECRET_TOKEN": "tg-secret-token-Zp41Lq",
    "T_DC_BOT_TOKEN": "dc-bot-token-Lr3vX9",
    "SECRET_KEY": "server-secret-key-Wq5Nz8Lm3Rt6Yp9Kd2Vx",  # required with a Redis broker (the 503 tests)
}
APP_SECRET = SECRETS["T_WA_APP_SECRET"]
VERIFY_TOKEN = SECRETS["T_WA_VERIFY_TOKEN"]
TG_SECRET = SECRETS["T_TG_SECRET_TOKEN"]

CONFIG = f"""
partitions = 16

[[channels]]
id = "{WA}"
platform = "whatsapp"
agent = "echo"
secrets = {{ app_secret = "T_WA_APP_SECRET", verify_token = "T_WA_VERIFY_TOKEN", access_token = "T_WA_ACCESS_TOKEN" }}
options = {{ phone_number_id = "{PHONE_ID}" }}

[[channels]]
id = "{TG}"
platform = "telegram"
agent = "echo"
secrets = {{ bot_token = "T_TG_BOT_TOKEN", secret_token = "T_TG_SECRET_TOKEN" }}
options = {{ bot_username = "AcmeSupportBot" }}

[[channels]]
id = "{DC}"
platform = "discord"
agent = "echo"
secrets = {{ bot_token = "T_DC_BOT_TOKEN", public_key = "T_DC_PUBLIC_KEY" }}

[[channels]]
id = "{WEB}"
platform = "webchat"
agent = "echo"
"""


def settings_for(tmp_path: Path, **env: str) -> Settings:
    config = tmp_path / "channels.toml"
    config.write_text(CONFIG)
    return load_settings({
        "CHATSESSIONS_CONFIG": str(config),
        "T_DC_PUBLIC_KEY": DISCORD_PUBLIC_HEX,
        "BROKER_URL": "memory://localhost/",
        "LOG_FORMAT": "json",
        **SECRETS,
        **env,
    })


class CountingPublisher(Publisher):
    """The real Publisher; only adds up what `publish` reports as newly enqueued."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.enqueued = 0
        self.calls = 0

    def publish(self, messages: list[InboundMessage], dedupe: bool = True) -> int:
        self.calls += 1
        count = super().publish(messages, dedupe)
        self.enqueued += count
        return count


def queue_names(publisher: Publisher) -> list[str]:
    return [q.name for q in publisher.app.conf.task_queues]


def broker_depth(publisher: Publisher) -> int:
    """Messages waiting in the memory broker's queues (nothing consumes them in this process)."""
    with publisher.app.connection_for_write() as conn:
        channel = conn.default_channel
        return sum(channel._size(name) for name in queue_names(publisher))


def drain(publisher: Publisher) -> list[dict[str, Any]]:
    """Take every task off the memory broker's queues; returns the InboundMessage dicts they carry."""
    found = []
    with publisher.app.connection_for_write() as conn:
        channel = conn.default_channel
        for name in queue_names(publisher):
            while channel._size(name):
                message = channel.message_to_python(channel._get(name))
                args, _kwargs, _embed = message.decode()
                found.append(args[0])
    return found


@dataclass
class Logs:
    """The JSON log lines written to stderr by configure_logging's handler (read through capsys)."""

    capsys: pytest.CaptureFixture[str]
    text: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)

    def read(self) -> list[dict[str, Any]]:
        captured = self.capsys.readouterr()
        self.text += captured.out + captured.err
        for line in captured.err.splitlines():
            if line.startswith("{"):
                self.events.append(json.loads(line))
        return self.events

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.read() if e.get("event") == event]

    def clear(self) -> None:
        self.read()
        self.events.clear()


class _CurrentStderr:
    """Writes to whatever sys.stderr is now (capsys's stream in the running test phase)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@pytest.fixture
def logs(capsys, tmp_path) -> Iterator[Logs]:
    """Production logging (JSON, INFO) into capsys; afterwards: no secret may appear anywhere in the output."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("urllib3", "werkzeug", "websockets")}
    saved_structlog = structlog.get_config()
    configure_logging(settings_for(tmp_path))  # JSON, INFO
    # Same processors and output; only keeps module-level loggers from pinning this test's configuration.
    structlog.configure(cache_logger_on_first_use=False)
    ours = root.handlers[0]
    # The handler bound sys.stderr as it was during fixture setup; pytest swaps capsys's stream between phases.
    ours.setStream(_CurrentStderr())
    captured = Logs(capsys)
    yield captured
    captured.read()
    structlog.configure(**saved_structlog)
    root.removeHandler(ours)
    for handler in saved_handlers:  # pytest's per-phase capture handlers come and go on their own
        if not type(handler).__module__.startswith("_pytest") and handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(saved_level)
    for name, level in noisy.items():
        logging.getLogger(name).setLevel(level)
    leaked = [name for name, value in SECRETS.items() if value in captured.text]
    assert not leaked, f"secrets {leaked} appeared in the log output"


@dataclass
class Stack:
    publisher: CountingPublisher
    client: Any
    logs: Logs

    def enqueued(self) -> int:
        """What really reached the broker; the Publisher's own count must agree."""
        depth = broker_depth(self.publisher)
        assert self.publisher.enqueued == depth, (self.publisher.enqueued, depth)
        return depth

    def rejected(self, status: int) -> dict[str, Any]:
        """The one `ingress.rejected` log line of the last request; it must carry the status."""
        [line] = self.logs.named("ingress.rejected")
        assert line["status"] == status and line["level"] == "warning"
        return line


@pytest.fixture
def stack(tmp_path, logs) -> Iterator[Stack]:
    settings = settings_for(tmp_path)
    publisher = CountingPublisher(settings, ledger=MemoryLedger())
    with publisher.app.connection_for_write() as conn:  # the memory broker is process-wide: start empty
        for name in queue_names(publisher):
            conn.default_channel._purge(name)
    app = create_app(settings, publisher)
    logs.clear()
    yield Stack(publisher, app.test_client(), logs)
    drain(publisher)
    publisher.app.close()


# -- payloads ---------------------------------------------------------------------------------------------------------

def wa_body(text: str = "Hi, my order 48213 has not arrived", msg_id: str = "wamid.BAD-INPUT-1") -> bytes:
    return p.encode(p.whatsapp_text(PHONE_ID, "5511987650001", "Ana Souza", text, msg_id))


def tg_body(text: str = "Hello, I need to change my delivery address", update_id: int = 902114001) -> bytes:
    return p.encode(p.telegram_text(381920001, "private", 381920001, "Chen", text, 311, update_id))


def dc_ask_body(question: str = "where is my refund?") -> bytes:
    doc = fixture("discord", "interaction_slash_command")
    doc["id"] = p.discord_snowflake()
    doc["data"]["options"][0]["value"] = question
    return p.encode(doc)


def post_wa(stack: Stack, body: bytes, secret: str = APP_SECRET):
    return stack.client.post(f"/webhooks/{WA}", data=body, headers=p.sign_whatsapp(body, secret))


def post_tg(stack: Stack, body: bytes, token: str | None = TG_SECRET):
    headers = p.telegram_headers(token) if token is not None else {"Content-Type": "application/json"}
    return stack.client.post(f"/webhooks/{TG}", data=body, headers=headers)


def post_wa_to(client: Any, body: bytes):
    return client.post(f"/webhooks/{WA}", data=body, headers=p.sign_whatsapp(body, APP_SECRET))


def post_dc(stack: Stack, body: bytes, key: Ed25519PrivateKey = DISCORD_KEY, timestamp: int | None = None,
            channel: str = DC):
    return stack.client.post(f"/webhooks/{channel}/interactions", data=body,
                             headers=p.sign_discord(body, key, timestamp))


# -- 400: malformed bodies (correctly signed) ---------------------------------------------------------------------------

@pytest.mark.parametrize("body", [b"not json", b"{\"object\": ", b"\xff\xfe\x00", b""], ids=["text", "truncated",
                                                                                                "binary", "empty"])
def test_whatsapp_body_not_json_is_400(stack, body):
    response = post_wa(stack, body)
    assert response.status_code == 400
    assert stack.rejected(400)["reason"] == "malformed payload: body is not JSON"
    assert stack.enqueued() == 0


@pytest.mark.parametrize("doc, reason", [
    ([1, 2, 3], "body is not a whatsapp_business_account event"),
    ({"object": "page", "entry": []}, "body is not a whatsapp_business_account event"),
    ({"object": "whatsapp_business_account", "entry": {"id": "1"}}, "body.entry missing or not list"),
    ({"object": "whatsapp_business_account", "entry": [{"changes": [{"value": []}]}]}, "change.value missing or not dict"),
    ({"object": "whatsapp_business_account", "entry": [{"changes": [{"value": {
        "metadata": {"phone_number_id": PHONE_ID}, "messages": [{"id": "wamid.1", "type": "text"}]}}]}]},
     "message.from missing or not str"),
], ids=["array", "other-object", "entry-not-list", "value-not-dict", "message-without-sender"])
def test_whatsapp_json_of_the_wrong_shape_is_400(stack, doc, reason):
    response = post_wa(stack, json.dumps(doc).encode())
    assert response.status_code == 400
    assert stack.rejected(400)["reason"] == f"malformed payload: {reason}"
    assert stack.enqueued() == 0


NESTED = b"[" * 50_000 + b"]" * 50_000  # valid JSON that Python's parser cannot descend into (RecursionError)


@pytest.mark.parametrize("post", [post_wa, post_dc], ids=["whatsapp", "discord"])
def test_json_nested_too_deeply_is_400_not_500(stack, post):
    """A 500 is retried by the platform for days; nothing will ever parse this body."""
    response = post(stack, NESTED)
    assert response.status_code == 400
    assert stack.rejected(400)["reason"] == "malformed payload: body is nested too deeply"


def test_whatsapp_message_older_than_the_replay_window_is_400_and_not_enqueued(stack):
    """A captured webhook, correctly signed, sent again after its id left the dedupe ledger."""
    old = time.time() - REPLAY_WINDOW_S - 3600
    response = post_wa(stack, p.encode(p.whatsapp_text(PHONE_ID, "5511987650001", "Ana", "again", "wamid.OLD",
                                                       timestamp=old)))
    assert response.status_code == 400
    assert "older than the replay window" in stack.rejected(400)["reason"]
    assert stack.enqueued() == 0


def test_telegram_update_older_than_the_replay_window_is_dropped_with_200(stack):
    body = p.encode(p.telegram_text(381920001, "private", 381920001, "Chen", "again", 312, 902114002,
                                    date=time.time() - REPLAY_WINDOW_S - 3600))
    response = post_tg(stack, body)
    assert response.status_code == 200 and response.data == b"dropped\n"
    assert "older than the replay window" in stack.logs.named("ingress.dropped")[0]["reason"]
    assert stack.enqueued() == 0


def test_telegram_json_nested_too_deeply_is_dropped_with_200(stack):
    assert post_tg(stack, NESTED).data == b"dropped\n"
    assert stack.logs.named("ingress.dropped")[0]["reason"] == "body is nested too deeply"


@pytest.mark.parametrize("doc, reason", [
    ({"type": 2, "id": "1311000000000000101", "data": {"name": "ask"}, "user": {"id": "1"}},
     "/ask needs a 'question' option"),
    ({"type": 3}, "unsupported interaction type 3"),
    ("just a string", "unsupported interaction type None"),
    (fixture("discord", "interaction_slash_command") | {"channel_id": "../../users/@me"},
     "d.channel_id is not a valid id"),  # it would become the reply's URL path
], ids=["ask-without-question", "component-interaction", "not-an-object", "channel-id-not-a-snowflake"])
def test_discord_interaction_of_the_wrong_shape_is_400(stack, doc, reason):
    response = post_dc(stack, json.dumps(doc).encode())
    assert response.status_code == 400
    assert stack.rejected(400)["reason"] == f"malformed payload: {reason}"
    assert stack.enqueued() == 0


# -- 413: too large -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_body_over_one_mib_is_413(stack, signed):
    body = b'{"object":"whatsapp_business_account","pad":"' + b"x" * MAX_BODY_BYTES + b'"}'
    assert len(body) > 1024 * 1024
    headers = p.sign_whatsapp(body, APP_SECRET) if signed else {"Content-Type": "application/json"}
    response = stack.client.post(f"/webhooks/{WA}", data=body, headers=headers)
    assert response.status_code == 413
    assert stack.rejected(413)["reason"] == f"body larger than {MAX_BODY_BYTES} bytes"
    assert stack.enqueued() == 0 and stack.publisher.calls == 0


def test_body_of_exactly_one_mib_is_not_413(stack):
    prefix = p.encode(fixture("whatsapp", "status_delivered"))[:-1] + b',"pad":"'
    body = prefix + b"x" * (MAX_BODY_BYTES - len(prefix) - 2) + b'"}'
    assert len(body) == MAX_BODY_BYTES and json.loads(body)["object"] == "whatsapp_business_account"
    response = post_wa(stack, body)
    assert response.status_code == 200
    assert stack.enqueued() == 0


def test_telegram_body_over_one_mib_is_413_not_dropped(stack):
    body = b'{"update_id":1,"pad":"' + b"x" * MAX_BODY_BYTES + b'"}'
    response = post_tg(stack, body)
    assert response.status_code == 413
    assert stack.rejected(413)["reason"] == f"body larger than {MAX_BODY_BYTES} bytes"
    assert stack.enqueued() == 0


# -- 401: missing or forged signatures --------------------------------------------------------------------------------

def test_whatsapp_missing_signature_is_401(stack):
    response = stack.client.post(f"/webhooks/{WA}", data=wa_body(), headers={"Content-Type": "application/json"})
    assert response.status_code == 401
    line = stack.rejected(401)
    assert line["reason"] == "invalid signature: X-Hub-Signature-256 missing or wrong" and line["channel"] == WA
    assert stack.enqueued() == 0


@pytest.mark.parametrize("forge", ["other-secret", "body-changed", "bare-hex", "garbage"])
def test_whatsapp_forged_signature_is_401(stack, forge):
    body = wa_body()
    headers = p.sign_whatsapp(body, APP_SECRET)
    if forge == "other-secret":
        headers = p.sign_whatsapp(body, "not-the-app-secret")
    elif forge == "body-changed":
        body = wa_body(text="Hi, my order 48214 has not arrived")
    elif forge == "bare-hex":
        headers["X-Hub-Signature-256"] = headers["X-Hub-Signature-256"].removeprefix("sha256=")
    else:
        headers["X-Hub-Signature-256"] = "sha256=" + "0" * 64
    response = stack.client.post(f"/webhooks/{WA}", data=body, headers=headers)
    assert response.status_code == 401
    assert stack.rejected(401)["reason"] == "invalid signature: X-Hub-Signature-256 missing or wrong"
    assert stack.enqueued() == 0


def test_whatsapp_malformed_body_without_signature_is_401_not_400(stack):
    """Signatures are checked before parsing: an unsigned sender learns nothing about the parser."""
    response = stack.client.post(f"/webhooks/{WA}", data=b"not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 401
    stack.rejected(401)
    assert stack.enqueued() == 0


@pytest.mark.parametrize("token", [None, "", "tg-secret-token-wrong", TG_SECRET + " "], ids=["missing", "empty",
                                                                                              "wrong", "padded"])
def test_telegram_missing_or_wrong_secret_token_is_401(stack, token):
    response = post_tg(stack, tg_body(), token=token)
    assert response.status_code == 401
    line = stack.rejected(401)
    assert line["reason"] == "invalid signature: X-Telegram-Bot-Api-Secret-Token missing or wrong"
    assert line["channel"] == TG
    assert stack.enqueued() == 0


@pytest.mark.parametrize("drop", ["X-Signature-Ed25519", "X-Signature-Timestamp"])
def test_discord_missing_signature_is_401(stack, drop):
    body = dc_ask_body()
    headers = p.sign_discord(body, DISCORD_KEY)
    del headers[drop]
    response = stack.client.post(f"/webhooks/{DC}/interactions", data=body, headers=headers)
    assert response.status_code == 401
    line = stack.rejected(401)
    assert line["reason"] == "invalid signature: X-Signature-Ed25519 or X-Signature-Timestamp missing"
    assert line["channel"] == DC
    assert stack.enqueued() == 0


def test_discord_forged_signature_is_401(stack):
    response = post_dc(stack, dc_ask_body(), key=Ed25519PrivateKey.generate())
    assert response.status_code == 401
    assert stack.rejected(401)["reason"] == "invalid signature: interaction signature invalid"
    assert stack.enqueued() == 0


def test_discord_interaction_ten_minutes_old_is_401_even_when_correctly_signed(stack):
    response = post_dc(stack, dc_ask_body(), timestamp=int(time.time()) - 600)
    assert response.status_code == 401
    assert stack.rejected(401)["reason"] == "invalid signature: interaction timestamp outside the allowed window"
    assert stack.enqueued() == 0


# -- 404: unknown channel, or a channel on the wrong route --------------------------------------------------------------

@pytest.mark.parametrize("path", ["/webhooks/no-such-channel", "/webhooks/no-such-channel/interactions"])
def test_unknown_channel_is_404(stack, path):
    body = wa_body()
    response = stack.client.post(path, data=body, headers=p.sign_whatsapp(body, APP_SECRET))
    assert response.status_code == 404
    line = stack.rejected(404)
    assert line["reason"] == "unknown channel" and line["channel"] == "no-such-channel"
    assert stack.enqueued() == 0


def test_whatsapp_channel_on_the_interactions_route_is_404(stack):
    response = post_dc(stack, dc_ask_body(), channel=WA)
    assert response.status_code == 404
    line = stack.rejected(404)
    assert line["reason"] == "unknown channel" and line["channel"] == WA
    assert stack.enqueued() == 0


def test_discord_channel_on_the_plain_webhook_route_is_404(stack):
    """Discord messages come over the gateway; only /interactions is an HTTP endpoint."""
    body = dc_ask_body()
    response = stack.client.post(f"/webhooks/{DC}", data=body, headers=p.sign_discord(body, DISCORD_KEY))
    assert response.status_code == 404
    assert stack.rejected(404)["channel"] == DC
    assert stack.enqueued() == 0


def test_get_on_a_telegram_webhook_is_404(stack):
    """GET /webhooks/<id> is WhatsApp's subscription handshake; for any other platform the channel is unknown."""
    response = stack.client.get(f"/webhooks/{TG}", query_string={"hub.mode": "subscribe", "hub.challenge": "42"})
    assert 400 <= response.status_code < 500
    assert response.status_code == 404
    assert b"42" not in response.data
    assert stack.rejected(404)["channel"] == TG
    assert stack.enqueued() == 0


def test_whatsapp_handshake_with_a_wrong_verify_token_is_403(stack):
    response = stack.client.get(f"/webhooks/{WA}", query_string={
        "hub.mode": "subscribe", "hub.verify_token": "guess", "hub.challenge": "1158201444"})
    assert response.status_code == 403
    assert b"1158201444" not in response.data
    assert stack.rejected(403)["reason"] == "verification failed: webhook verification token does not match"
    assert stack.enqueued() == 0


def test_whatsapp_handshake_with_the_verify_token_echoes_the_challenge(stack):
    response = stack.client.get(f"/webhooks/{WA}", query_string={
        "hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"})
    assert response.status_code == 200 and response.data == b"1158201444"
    assert stack.enqueued() == 0


def test_a_head_on_the_handshake_answers_as_its_get_without_the_body(stack):
    response = stack.client.head(f"/webhooks/{WA}", query_string={
        "hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"})
    assert response.status_code == 200 and response.data == b"" and response.headers["Content-Length"] == "10"


def test_a_repeated_query_parameter_counts_once_its_first_value(stack):
    response = stack.client.get(f"/webhooks/{WA}?hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}"
                                "&hub.challenge=111&hub.challenge=222")
    assert response.status_code == 200 and response.data == b"111"


def post_raw(stack, path: str, body: bytes, headers: dict[str, str], content_length: str | None = None):
    """POST `body` with this Content-Length header (None: none at all, as a server hands over a chunked request,
    whose stream ends by itself); (status, body) of the answer."""
    import io

    from werkzeug.test import EnvironBuilder, run_wsgi_app

    environ = EnvironBuilder(path=path, method="POST", headers=headers).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ.update({"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": content_length is None})
    if content_length is not None:
        environ["CONTENT_LENGTH"] = content_length
    app_iter, status, _headers = run_wsgi_app(stack.client.application, environ, buffered=True)
    return int(status.split()[0]), b"".join(app_iter)


def test_a_chunked_webhook_is_read_to_its_end_and_refused_past_the_limit(stack):
    body = wa_body()
    assert post_raw(stack, f"/webhooks/{WA}", body, p.sign_whatsapp(body, APP_SECRET))[0] == 200
    assert stack.enqueued() == 1
    stack.logs.clear()
    big = b'{"object":"whatsapp_business_account","pad":"' + b"x" * MAX_BODY_BYTES + b'"}'
    assert post_raw(stack, f"/webhooks/{WA}", big, p.sign_whatsapp(big, APP_SECRET))[0] == 413
    assert stack.rejected(413)["reason"] == f"body larger than {MAX_BODY_BYTES} bytes"
    assert stack.enqueued() == 1


@pytest.mark.parametrize("path", [f"/webhooks/{DC}/interactions/more", f"/webhooks/{WA}/", "/webhooks/",
                                  "/webhooks//interactions"])
def test_a_path_that_names_no_webhook_is_404(stack, path):
    assert stack.client.post(path, data=b"{}").status_code == 404
    assert stack.enqueued() == 0


@pytest.mark.parametrize("length", ["-5", "many"])
def test_a_bad_content_length_is_400(stack, length):
    body = wa_body()
    assert post_raw(stack, f"/webhooks/{WA}", body, p.sign_whatsapp(body, APP_SECRET), length)[0] == 400
    assert stack.rejected(400)["reason"] == "bad Content-Length" and stack.enqueued() == 0


# -- 405: wrong method ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", [f"/webhooks/{WA}", f"/webhooks/{TG}", f"/webhooks/{DC}/interactions",
                                  "/webhooks/no-such-channel"])
def test_wrong_method_is_405(stack, method, path):
    body = wa_body()
    response = stack.client.open(path, method=method, data=body, headers=p.sign_whatsapp(body, APP_SECRET))
    assert response.status_code == 405
    allowed = set(response.headers["Allow"].split(", "))
    assert "POST" in allowed and method not in allowed
    # Routing answers 405 before any view runs, so the app writes no `ingress.rejected` line for it.
    assert stack.enqueued() == 0 and stack.publisher.calls == 0


def test_get_on_the_interactions_route_is_405(stack):
    response = stack.client.get(f"/webhooks/{DC}/interactions")
    assert response.status_code == 405
    assert stack.enqueued() == 0


# -- 200 without a turn: Telegram drops, WhatsApp receipts ---------------------------------------------------------------

@pytest.mark.parametrize("body, reason", [
    (b"not json", "body is not JSON"),
    (b'{"update_id": "902114001", "message": {}}', "update.update_id missing or not int"),
    (b'{"update_id": 902114001, "message": "hi"}', "update.message missing or not dict"),
    (b'{"update_id": 902114001, "message": {"message_id": 311, "chat": {"id": "381920001"}}}',
     "message.chat.id is not a 64-bit integer id"),
], ids=["not-json", "update-id-string", "message-not-object", "chat-id-string"])
def test_telegram_malformed_update_with_the_right_secret_is_dropped_with_200(stack, body, reason):
    """Telegram queues updates per chat: a non-2xx would block every later update of that chat."""
    response = post_tg(stack, body)
    assert response.status_code == 200 and response.data == b"dropped\n"
    [line] = stack.logs.named("ingress.dropped")
    assert line["reason"] == reason and line["channel"] == TG and line["level"] == "warning"
    assert stack.logs.named("ingress.rejected") == []
    assert stack.enqueued() == 0


def test_telegram_update_that_is_not_a_message_is_200_and_not_enqueued(stack):
    response = post_tg(stack, fixture_bytes("telegram", "edited_message"))
    assert response.status_code == 200 and response.data == b"ok\n"
    [line] = stack.logs.named("channel.ignored")
    assert line["reason"] == "not a message" and line["update_kind"] == "edited_message"
    assert stack.enqueued() == 0


def test_whatsapp_status_callback_is_200_and_not_enqueued(stack):
    response = post_wa(stack, fixture_bytes("whatsapp", "status_delivered"))
    assert response.status_code == 200 and response.data == b"ok\n"
    assert stack.enqueued() == 0
    assert stack.logs.named("ingress.rejected") == [] and stack.logs.named("ingress.enqueued") == []


def test_whatsapp_event_for_another_phone_number_is_200_and_not_enqueued(stack):
    body = p.encode(p.whatsapp_text("999999999999999", "5511987650001", "Ana", "hello", "wamid.OTHER"))
    response = post_wa(stack, body)
    assert response.status_code == 200
    [line] = stack.logs.named("channel.ignored")
    assert line["reason"] == "other phone_number_id"
    assert stack.enqueued() == 0


def test_discord_ping_is_answered_and_not_enqueued(stack):
    response = post_dc(stack, fixture_bytes("discord", "interaction_ping"))
    assert response.status_code == 200 and response.get_json() == {"type": 1}
    assert stack.enqueued() == 0


# -- valid messages: exactly one enqueued, redeliveries deduplicated -----------------------------------------------------

def test_valid_whatsapp_message_enqueues_exactly_one(stack):
    response = post_wa(stack, wa_body())
    assert response.status_code == 200 and response.data == b"ok\n"
    assert stack.enqueued() == 1
    assert stack.logs.named("ingress.enqueued") == []  # an accepted webhook costs no INFO line (DEBUG has one)
    [task] = drain(stack.publisher)
    message = InboundMessage.from_dict(task)
    assert (message.channel_id, message.platform_message_id) == (WA, "wamid.BAD-INPUT-1")
    assert message.session_key == f"{WA}:dm:5511987650001" and message.seq == 1
    assert message.text == "Hi, my order 48213 has not arrived"


def test_valid_telegram_message_enqueues_exactly_one(stack):
    response = post_tg(stack, tg_body())
    assert response.status_code == 200 and response.data == b"ok\n"
    assert stack.enqueued() == 1
    [task] = drain(stack.publisher)
    assert InboundMessage.from_dict(task).session_key == f"{TG}:dm:381920001"


def test_valid_discord_interaction_enqueues_exactly_one(stack):
    response = post_dc(stack, dc_ask_body())
    assert response.status_code == 200
    assert response.get_json() == {"type": 4, "data": {"content": "Got it, answering here shortly."}}
    assert stack.enqueued() == 1
    [task] = drain(stack.publisher)
    assert InboundMessage.from_dict(task).session_key == f"{DC}:group:1290000000000000001"


def test_the_same_whatsapp_message_twice_enqueues_one(stack):
    from shared.logs import pseudonym  # the logs name sessions and messages by it

    body = wa_body()
    assert post_wa(stack, body).status_code == 200
    assert post_wa(stack, body).status_code == 200  # Meta's redelivery: still 200, or Meta keeps retrying
    assert stack.enqueued() == 1
    [duplicate] = stack.logs.named("ingress.duplicate")
    assert duplicate["platform_message_id"] == pseudonym(stack.publisher.settings.secret_key, "wamid.BAD-INPUT-1")


def test_the_same_telegram_update_twice_enqueues_one(stack):
    body = tg_body()
    assert post_tg(stack, body).status_code == 200
    assert post_tg(stack, body).status_code == 200
    assert stack.enqueued() == 1
    assert len(stack.logs.named("ingress.duplicate")) == 1


def test_the_same_discord_interaction_twice_enqueues_one(stack):
    body = dc_ask_body()
    assert post_dc(stack, body).status_code == 200
    assert post_dc(stack, body).status_code == 200
    assert stack.enqueued() == 1


# -- 503: the broker cannot take the message ------------------------------------------------------------------------

CLOSED_PORT_REDIS = "redis://127.0.0.1:1/0"  # port 1: nothing listens, connections are refused at once


@pytest.fixture
def unreachable(tmp_path, logs) -> Iterator[tuple[Settings, list[CountingPublisher]]]:
    settings = settings_for(tmp_path, BROKER_URL=CLOSED_PORT_REDIS, REDIS_URL="redis://127.0.0.1:1/1")
    publishers: list[CountingPublisher] = []
    yield settings, publishers
    for publisher in publishers:
        publisher.app.close()
        redis_client = getattr(publisher.ledger, "redis", None)
        if redis_client is not None:
            redis_client.close()


def assert_unavailable(response, logs: Logs, reason: str) -> None:
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    [line] = logs.named("ingress.enqueue_failed")
    assert line["reason"] == reason and line["level"] == "error"


def test_unreachable_redis_ledger_and_broker_is_503_with_retry_after(unreachable, logs):
    settings, publishers = unreachable
    assert settings.redis_url == "redis://127.0.0.1:1/1"
    publisher = CountingPublisher(settings)  # RedisLedger on REDIS_URL, Celery on the closed-port broker
    publishers.append(publisher)
    client = create_app(settings, publisher).test_client()
    logs.clear()
    for attempt in range(2):  # the platform's retry meets the same answer, never a 200
        started = time.monotonic()
        response = post_wa_to(client, wa_body())
        assert time.monotonic() - started < 10, "the ingress must answer fast when the broker is down"
        assert_unavailable(response, logs, "ledger unreachable: ConnectionError")
        logs.clear()
    assert publisher.enqueued == 0


def test_unreachable_broker_is_503_and_the_claim_is_released(unreachable, logs):
    """The ledger answers (in memory) but the broker does not: 503, and the platform's retry is not a duplicate."""
    settings, publishers = unreachable
    ledger = MemoryLedger()
    publisher = CountingPublisher(settings, ledger=ledger)
    publishers.append(publisher)
    client = create_app(settings, publisher).test_client()
    logs.clear()
    body = tg_body()
    for _attempt in range(2):
        started = time.monotonic()
        response = client.post(f"/webhooks/{TG}", data=body, headers=p.telegram_headers(TG_SECRET))
        assert time.monotonic() - started < 10
        assert_unavailable(response, logs, "broker unreachable: OperationalError")
        assert logs.named("ingress.duplicate") == []  # the failed attempt released its claim
        logs.clear()
    assert publisher.enqueued == 0
    assert ledger.claim(TG, "381920001:311") is True  # still unclaimed: the next retry will be accepted


def test_readyz_reports_the_unreachable_broker(unreachable, logs):
    settings, publishers = unreachable
    publisher = CountingPublisher(settings)
    publishers.append(publisher)
    response = create_app(settings, publisher).test_client().get("/readyz")
    assert response.status_code == 503
    [line] = logs.named("ingress.not_ready")
    assert line["reason"] == "ConnectionError"


# -- the web chat: cookies the server did not sign, its limits unreachable ------------------------------------------

def web_visitor(client: Any) -> Any:
    assert client.get(f"/chat/{WEB}").status_code == 200  # the page sets the visitor cookie
    return client


def post_web(client: Any, message_id: str = "bad-input-01"):
    return client.post(f"/chat/{WEB}/messages", json={"id": message_id, "text": "hello"})


UNSIGNED_ID = "U3dK2m8Qp0vXr7Lz4Nc1Bh6Yt9Fs5Wd2"  # the shape of a visitor cookie from before ids were signed


@pytest.mark.parametrize("cookie", [UNSIGNED_ID, UNSIGNED_ID + ".forged-signature", "", ".", "\u00e9t\u00e9.x"],
                         ids=["unsigned", "forged", "empty", "dot", "latin1"])
def test_a_web_chat_cookie_the_server_did_not_sign_is_400(stack, cookie):
    stack.client.set_cookie(COOKIE, cookie)
    assert post_web(stack.client).status_code == 400
    assert "not issued by this server" in stack.rejected(400)["reason"]
    assert stack.enqueued() == 0


def test_web_chat_with_its_limits_unreachable_is_503_not_a_free_pass(tmp_path, logs):
    """The broker takes messages (in memory) but the limits' Redis is down: refuse (503, Retry-After) rather than
    let every message through."""
    settings = settings_for(tmp_path, REDIS_URL="redis://127.0.0.1:1/1")  # port 1: refused at once
    publisher = CountingPublisher(settings, ledger=MemoryLedger())
    client = web_visitor(create_app(settings, publisher).test_client())
    logs.clear()
    try:
        for _attempt in range(2):  # the page's retry meets the same answer until Redis is back
            started = time.monotonic()
            response = post_web(client)
            assert time.monotonic() - started < 10, "the ingress must answer fast when Redis is down"
            assert response.status_code == 503 and response.headers["Retry-After"] == "5"
            [line] = logs.named("webchat.limiter_unreachable")
            assert line["level"] == "error" and line["error"] == "ConnectionError" and line["channel"] == WEB
            logs.clear()
        assert publisher.calls == 0 and broker_depth(publisher) == 0
    finally:
        drain(publisher)
        publisher.app.close()


# -- every answer's headers: never sniffed, never framed --------------------------------------------------------------

def test_every_answer_good_or_bad_is_never_sniffed_nor_framed(stack):
    client = stack.client
    answers = {
        "200 webhook": post_wa(stack, wa_body()),
        "401 forged": post_wa(stack, wa_body(), secret="forged"),
        "400 malformed": post_wa(stack, b"not json"),
        "404 unknown channel": client.post("/webhooks/nope", data=b"{}"),
        "404 no route": client.get("/nothing-here"),
        "405 method": client.put(f"/webhooks/{WA}"),
        "413 too large": client.post(f"/webhooks/{TG}", data=b"x" * (MAX_BODY_BYTES + 1)),
        "healthz": client.get("/healthz"),
        "readyz": client.get("/readyz"),
        "web chat script": client.get("/chat-static/webchat.js"),
        "web chat 400": client.get(f"/chat/{WEB}/replies"),
    }
    for name, response in answers.items():
        response.close()  # the script's file
        assert response.headers["X-Content-Type-Options"] == "nosniff", name
        assert response.headers["X-Frame-Options"] == "DENY", name
        assert response.headers["Content-Security-Policy"].endswith("frame-ancestors 'none'"), name
    # The chat page decides for itself (its channel's frame_ancestors), and keeps its own policy.
    page = client.get(f"/chat/{WEB}")
    assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert page.headers["Content-Security-Policy"].endswith("frame-ancestors 'self'")
    assert page.headers["X-Frame-Options"] == "SAMEORIGIN" and page.headers["X-Content-Type-Options"] == "nosniff"


def test_the_session_browser_keeps_its_own_stricter_headers(tmp_path, logs):
    from ingress.browser import HEADERS

    settings = settings_for(tmp_path, ADMIN_TOKEN="admin-token-Zq81Lx-0123456789abcdefghij")
    client = create_app(settings, CountingPublisher(settings, ledger=MemoryLedger())).test_client()
    for response in (client.get("/admin/"), client.get("/admin/", headers={"Authorization": "Bearer wrong"})):
        assert response.status_code == 401
        for name, value in HEADERS.items():
            assert response.headers[name] == value, name


# -- the log: no secrets, no message text at INFO -----------------------------------------------------------------------

PRIVATE_TEXT = "my card number is 4111-1111-1111-1111 (private-marker-Ux83)"


def test_message_text_never_reaches_the_info_log(stack):
    assert logging.getLogger().getEffectiveLevel() == logging.INFO
    assert post_wa(stack, wa_body(text=PRIVATE_TEXT)).status_code == 200
    assert post_tg(stack, tg_body(text=PRIVATE_TEXT)).status_code == 200
    assert post_dc(stack, dc_ask_body(question=PRIVATE_TEXT)).status_code == 200
    # and through every rejection path, with the text in the body
    assert post_wa(stack, wa_body(text=PRIVATE_TEXT), secret="forged").status_code == 401
    assert post_tg(stack, tg_body(text=PRIVATE_TEXT), token="forged").status_code == 401
    assert post_dc(stack, dc_ask_body(question=PRIVATE_TEXT), timestamp=int(time.time()) - 600).status_code == 401
    assert stack.enqueued() == 3
    stack.logs.read()
    assert "private-marker-Ux83" not in stack.logs.text
    assert "4111" not in stack.logs.text


def test_a_text_field_is_redacted_at_info_and_shown_at_debug(logs, tmp_path):
    from shared.logs import pseudonym  # the logs name sessions and messages by it

    log = structlog.get_logger("tests.bad_input")
    log.info("turn.received", text=PRIVATE_TEXT, session_key=f"{WA}:dm:1")
    [line] = logs.named("turn.received")
    assert line["text"] == REDACTED
    assert line["session_key"] == pseudonym(settings_for(tmp_path).secret_key, f"{WA}:dm:1")
    assert "private-marker-Ux83" not in logs.text
    logging.getLogger().setLevel(logging.DEBUG)
    log.debug("turn.received.debug", text=PRIVATE_TEXT)
    [line] = logs.named("turn.received.debug")
    assert line["text"] == PRIVATE_TEXT


def test_no_secret_in_the_log_across_every_path(stack):
    """The `logs` fixture checks every test's output; this one walks every path in one go, at DEBUG too."""
    logging.getLogger().setLevel(logging.DEBUG)
    body = wa_body()
    post_wa(stack, body)
    post_wa(stack, body)
    post_wa(stack, body, secret="forged")
    post_wa(stack, b"not json")
    post_tg(stack, tg_body())
    post_tg(stack, tg_body(), token="tg-secret-token-wrong")
    post_tg(stack, b"{}")
    post_dc(stack, dc_ask_body())
    post_dc(stack, dc_ask_body(), key=Ed25519PrivateKey.generate())
    stack.client.get(f"/webhooks/{WA}", query_string={"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN,
                                                      "hub.challenge": "1"})
    stack.client.get(f"/webhooks/{WA}", query_string={"hub.mode": "subscribe", "hub.verify_token": "x"})
    stack.client.get("/readyz")
    stack.logs.read()
    assert len(stack.logs.events) >= 8
    for value in SECRETS.values():
        assert value not in stack.logs.text
