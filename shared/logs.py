"""structlog set up once per process: JSON in production, readable in a terminal; stdlib logs join the stream.

Logs keep personal data out unless LOG_LEVEL=DEBUG, in one place for every call site: message text is redacted;
the fields that name a person (a session key holds a phone number) carry their pseudonym, a keyed hash that is the
same for the same value, so one session can still be followed through the logs (`chatsessions sessions show KEY`
and the session browser print a session's); and an HTTP answer's body quoted in an `error` (a platform's or the
LLM's, which may echo the text or the recipient) is reduced to its size and error codes. The console format
escapes control characters, so no value can forge a log line (or drive the terminal).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from typing import TYPE_CHECKING, Any, Callable

import structlog

from shared.signing import keyed_hash

if TYPE_CHECKING:
    from shared.config import Settings

REDACTED = "[redacted]"
# Every log field that holds a person's id, or a value that starts with one: session keys (<channel>:dm:<phone>),
# chats and senders, Telegram's "<chat>:<message>" and the web chat's "<visitor>:<id>" message ids, searched users.
PERSONAL_IDS = frozenset({"session_key", "key", "chat_id", "sender_id", "user", "user_id", "person",
                          "platform_message_id"})
# HttpSender's error for a refused request (shared/outbound.py): "http <status>: <the first 200 chars of the body>".
_HTTP_ERROR = re.compile(r"(http \d{3}): (.*)", re.DOTALL)
# Machine-readable codes in a (maybe truncated) JSON body: OpenAI's error.code/type, Telegram's error_code, Meta's
# and Discord's code. An operator needs them to fix a key or a model name; free text ("message") is never kept.
_ERROR_CODE = re.compile(r'"(code|type|error_code)"\s*:\s*("[A-Za-z0-9_.-]{1,64}"|-?\d{1,12})')
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")  # the renderer repr()s \t \n \r


def pseudonym(secret_key: str, value: Any) -> str:
    """What the logs say instead of a personal id (below DEBUG): grep them for it."""
    return _pseudonym(secret_key, str(value))


@functools.lru_cache(maxsize=65536)  # a session's key and ids come back in every line of its turns
def _pseudonym(secret_key: str, value: str) -> str:
    return keyed_hash(secret_key, "log", value)


def _debug() -> bool:
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def _redact_text(_logger, _name, event: dict) -> dict:
    """Message text is private: shown only when debug logging is on."""
    if "text" in event and not _debug():
        event["text"] = REDACTED
    return event


def _pseudonymize(secret_key: str) -> Callable[[Any, str, dict], dict]:
    def pseudonymize(_logger, _name, event: dict) -> dict:
        """Personal ids as their pseudonyms, unless debug logging is on (then as they are)."""
        if not _debug():
            for name in PERSONAL_IDS.intersection(event):
                if event[name] is not None:
                    event[name] = pseudonym(secret_key, event[name])
        return event

    return pseudonymize


def _redact_bodies(_logger, _name, event: dict) -> dict:
    """`error: "http 400: {...}"` -> `"http 400: [body redacted, 181 chars; code=131030]"` unless debug logging is on.
    The whole error stays where operators look for a failed reply (`sessions show`, dead letters)."""
    error = event.get("error")
    if isinstance(error, str) and not _debug() and (m := _HTTP_ERROR.fullmatch(error)):
        body = m.group(2)
        codes = "".join(f"; {k}={v.strip(chr(34))}" for k, v in _ERROR_CODE.findall(body))
        event["error"] = f"{m.group(1)}: [body redacted, {len(body)} chars{codes}]"
    return event


def _escape(pattern: re.Pattern, value: str) -> str:
    return pattern.sub(lambda m: m.group().encode("unicode_escape").decode(), value)


def _escape_controls(_logger, _name, event: dict) -> dict:
    """Console lines: a newline (or a terminal escape sequence) inside the message or a value is shown as \\n
    (\\x1b), never obeyed. ConsoleRenderer prints the message raw and repr()s only the values holding a tab, a
    newline or a carriage return (among others); a traceback stays on its own lines."""
    for name, value in event.items():
        if isinstance(value, str) and name not in ("exception", "stack"):
            event[name] = _escape(_CONTROL if name == "event" else _CONTROL_BUT_LINES, value)
    return event


def configure_logging(settings: Settings) -> None:
    """Every process entry point calls this once with its Settings: the format, the level and the key of the
    pseudonyms (the same SECRET_KEY everywhere, so a session has the same pseudonym in every process's lines)."""
    shared_processors = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Personal data is taken out where every line is written (structlog's and the libraries' alike), by the handler
    # this call installs: loggers cached under an earlier configuration write through it too.
    private = [_redact_text, _pseudonymize(settings.secret_key), _redact_bodies]
    if settings.log_format == "json":
        rendering = [structlog.processors.JSONRenderer()]  # JSON escapes control characters itself
    else:
        rendering = [_escape_controls, structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        # A line below the level is dropped before anything is done for it (the ingress's DEBUG line per webhook).
        processors=[structlog.stdlib.filter_by_level, *shared_processors,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared_processors,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *private,
                    structlog.processors.format_exc_info, *rendering],
    ))
    # No line shows the caller's file and line (the event names say where): the logging module then skips walking
    # the stack for every record (the optimization the logging HOWTO names).
    logging._srcfile = None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    noisy = ["urllib3", "werkzeug", "websockets"]
    if not settings.log_task_lines:  # two lines per message; the turn logs its own
        noisy += ["celery.worker.strategy", "celery.app.trace"]
    for name in noisy:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
