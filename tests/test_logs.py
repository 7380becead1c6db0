"""Personal data in the logs, through the production set-up (shared.logs.configure_logging) writing into a buffer:
personal ids as their keyed pseudonyms below DEBUG, HTTP answer bodies reduced to their size and error codes,
console lines that no value can forge, and Celery's view of a task (Flower, the workers' lines) without the message."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from collections.abc import Callable, Iterator

import pytest
import structlog

from ingress.ledger import MemoryLedger
from ingress.publisher import Publisher
from shared.logs import PERSONAL_IDS, REDACTED, configure_logging, pseudonym
from shared.messages import DM, InboundMessage
from shared.queueing import DRAIN_SESSION, HANDLE_INBOUND, shown_as
from workers.testing import settings_for

KEY = "log-test-secret-key-0123456789abcdefghij"
PHONE = "5511987650001"
SESSION = f"wa:dm:{PHONE}"
SETTINGS = dataclasses.replace(settings_for("sqlite://", []), secret_key=KEY)


@pytest.fixture
def logged() -> Iterator[Callable[..., io.StringIO]]:
    """configure_logging as every process calls it, into a buffer; the previous set-up restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, structlog.get_config()
    noisy = {name: logging.getLogger(name).level for name in ("urllib3", "werkzeug", "websockets")}

    def configure(log_format: str = "json", level: str = "INFO", secret_key: str = KEY) -> io.StringIO:
        configure_logging(dataclasses.replace(SETTINGS, log_format=log_format, log_level=level, secret_key=secret_key))
        structlog.configure(cache_logger_on_first_use=False)  # module loggers must not pin this test's set-up
        stream = io.StringIO()
        root.handlers[0].setStream(stream)
        return stream

    yield configure
    root.handlers[:], level, config = saved
    root.setLevel(level)
    structlog.configure(**config)
    for name, value in noisy.items():
        logging.getLogger(name).setLevel(value)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


log = structlog.get_logger("tests.logs")
IDS = {"session_key": SESSION, "key": SESSION, "chat_id": PHONE, "sender_id": PHONE, "user": PHONE,
       "user_id": PHONE, "person": "ana", "platform_message_id": f"{PHONE}:311"}


def test_personal_ids_are_their_pseudonyms_below_debug(logged):
    out = logged()
    assert set(IDS) == PERSONAL_IDS
    log.info("turn.test", **IDS, channel="wa", seq=3, sender_name_kept=False)
    log.warning("turn.test", session_key=SESSION, chat_id=None)
    with structlog.contextvars.bound_contextvars(session_key=SESSION, platform_message_id=f"{PHONE}:312"):
        log.info("turn.bound")
    first, second, bound = lines(out)
    assert {k: first[k] for k in IDS} == {k: pseudonym(KEY, v) for k, v in IDS.items()}
    assert first["channel"] == "wa" and first["seq"] == 3  # the rest as it was
    assert second["session_key"] == first["session_key"]  # one session, one pseudonym: it can be followed
    assert second["chat_id"] is None
    assert bound["session_key"] == first["session_key"] and bound["platform_message_id"] == pseudonym(KEY, f"{PHONE}:312")
    assert PHONE not in out.getvalue() and "ana" not in out.getvalue()
    other = logged(secret_key="another-deployment-key-0123456789abcdef")
    log.info("turn.test", session_key=SESSION)
    assert lines(other)[0]["session_key"] not in (first["session_key"], SESSION)  # keyed: no key, no link


def test_at_debug_personal_ids_and_text_are_shown(logged):
    out = logged(level="DEBUG")
    log.debug("turn.test", **IDS, text="my order 48213")
    [line] = lines(out)
    assert {k: line[k] for k in IDS} == IDS and line["text"] == "my order 48213"
    quiet = logged()
    log.info("turn.test", session_key=SESSION, text="my order 48213")
    [line] = lines(quiet)
    assert line["text"] == REDACTED and line["session_key"] == pseudonym(KEY, SESSION)


WHATSAPP_BODY = ('{"error":{"message":"(#131030) Recipient phone number ' + PHONE + ' not in allowed list",'
                 '"type":"OAuthException","code":131030,"error_data":{"messaging_product":"whatsapp","details":"'
                 'Recipient phone number not in allowed list: ' + PHONE + '"},"fbtrace_id":"AbCdEf"}}')
WHATSAPP_400 = "http 400: " + WHATSAPP_BODY[:200]  # HttpSender keeps the first 200 characters: not JSON any more
LLM_401 = 'http 401: {"error": {"message": "Incorrect API key provided: sk-abc. You said: my order 48213", ' \
          '"type": "invalid_request_error", "code": "invalid_api_key"}}'


TELEGRAM_403 = 'http 403: {"ok":false,"error_code":403,"description":"Forbidden: bot was blocked by ' + PHONE + '"}'
HTML_502 = "http 502: <html>bad gateway for " + PHONE + "</html>"
LLM_MALFORMED = "http 200: {'choices': [{'message': {'content': None, 'refusal': 'my order 48213'}}]}"


def size(error: str) -> int:
    return len(error.split(": ", 1)[1])


@pytest.mark.parametrize("error, shown", [
    (WHATSAPP_400, f"http 400: [body redacted, {size(WHATSAPP_400)} chars; type=OAuthException; code=131030]"),
    (LLM_401, f"http 401: [body redacted, {size(LLM_401)} chars; type=invalid_request_error; code=invalid_api_key]"),
    (TELEGRAM_403, f"http 403: [body redacted, {size(TELEGRAM_403)} chars; error_code=403]"),
    (HTML_502, f"http 502: [body redacted, {size(HTML_502)} chars]"),
    (LLM_MALFORMED, f"http 200: [body redacted, {size(LLM_MALFORMED)} chars]"),
    ("network: ConnectionError", "network: ConnectionError"),  # no body: as it is
])
def test_http_answer_bodies_keep_only_their_status_size_and_error_codes(logged, error, shown):
    out = logged()
    log.warning("outbound.retry", error=error)
    assert lines(out)[0]["error"] == shown
    assert PHONE not in out.getvalue() and "48213" not in out.getvalue()
    debug = logged(level="DEBUG")
    log.warning("outbound.retry", error=error)
    assert lines(debug)[0]["error"] == error  # DEBUG: the whole answer


def test_console_lines_cannot_be_forged(logged):
    out = logged(log_format="console")
    forged = "x\n2026-01-01T00:00:00Z [info     ] browser.viewed  remote=10.0.0.1\r\x1b[2J\u2028"
    log.warning("ingress.rejected", reason=forged)
    logging.getLogger("celery.worker").warning("Task %s received", forged)  # a stdlib (foreign) line too
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("turn.failed")
    text = out.getvalue()
    own, foreign, failed, *traceback = text.splitlines()  # no line more
    assert "ingress.rejected" in own and "reason=" in own and "browser.viewed  remote=10.0.0.1" in own
    assert "Task x\\n2026-01-01T00:00:00Z" in foreign and "\\x1b[2J\\u2028 received" in foreign
    assert "turn.failed" in failed and "Traceback (most recent call last):" in traceback  # a traceback keeps its lines
    assert "\x1b" not in text and "\r" not in text and "\u2028" not in text


def test_flower_and_the_workers_see_the_session_pseudonym_not_the_message():
    """What Celery shows of a task (its name in Flower and in the workers' "Task ... received" lines, its args'
    repr in the events Flower reads) names the session by its pseudonym; the message travels, unseen."""
    publisher = Publisher(SETTINGS, ledger=MemoryLedger())  # Celery on the in-process broker
    queues = [q.name for q in publisher.app.conf.task_queues]
    message = InboundMessage(channel_id="wa", platform="whatsapp", session_key=SESSION, chat_id=PHONE, chat_kind=DM,
                             sender_id=PHONE, sender_name="Ana Souza", text="my order 48213",
                             platform_message_id="wamid.LOGS-1", sent_at=time.time())
    with publisher.app.connection_for_write() as conn:
        for name in queues:  # the in-process broker is shared by the whole test run
            conn.default_channel._purge(name)
        assert publisher.publish([message]) == 1
        [sent] = [conn.default_channel.message_to_python(conn.default_channel._get(name))
                  for name in queues if conn.default_channel._size(name)]
    publisher.app.close()
    session = pseudonym(KEY, SESSION)
    assert sent.headers["shadow"] == shown_as(SETTINGS, HANDLE_INBOUND, SESSION, 1)["shadow"]
    assert sent.headers["shadow"].startswith(f"{HANDLE_INBOUND}[p") and sent.headers["shadow"].endswith(f" {session} #1]")
    assert sent.headers["argsrepr"] == f"(<session {session} #1>)"
    assert sent.decode()[0][0]["text"] == "my order 48213"  # the worker still gets the message
    drain = shown_as(SETTINGS, DRAIN_SESSION, SESSION)  # the sweeper's hand-back of a stalled session
    assert drain == {"shadow": sent.headers["shadow"].replace(HANDLE_INBOUND, DRAIN_SESSION).replace(" #1", ""),
                     "argsrepr": f"(<session {session}>)"}
    shown = json.dumps([sent.headers, drain])
    assert PHONE not in shown and "48213" not in shown and "Ana" not in shown


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_database_error_does_not_quote_its_parameters(backend, tmp_path, request):
    """Celery logs a failed task's exception and traceback: a statement's values (text, session keys) stay out."""
    import traceback

    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from shared.db import engine_for

    url = f"sqlite:///{tmp_path}/db.sqlite" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    with pytest.raises(DBAPIError) as failed, engine_for(url).connect() as conn:
        conn.execute(text("SELECT * FROM no_such_table WHERE key = :key"), {"key": SESSION})
    shown = "".join(traceback.format_exception(failed.value))  # what a log line with exc_info prints
    assert "no_such_table" in shown and PHONE not in shown
