"""structlog set up once per process: JSON in production, readable in a terminal; stdlib logs join the stream."""

from __future__ import annotations

import logging
import sys

import structlog

REDACTED = "[redacted]"


def _redact_text(_logger, _name, event: dict) -> dict:
    """Message text is private: shown only when debug logging is on."""
    if "text" in event and not logging.getLogger().isEnabledFor(logging.DEBUG):
        event["text"] = REDACTED
    return event


def configure_logging(log_format: str = "console", level: str = "INFO") -> None:
    shared_processors = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_text,
    ]
    renderer = (structlog.processors.JSONRenderer() if log_format == "json"
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[*shared_processors, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared_processors,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "werkzeug", "websockets"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
