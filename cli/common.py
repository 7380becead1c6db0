"""What the operators' commands (`sessions`, `partitions`, `check`) share: exit codes, output (tables, JSON, errors and
progress on stderr), the duration argument type, and the connections they open (Redis, Celery, the broker view).

Output is a table by default and JSON with --json. Exit codes: 0 ok, 1 failure or nothing found (or, for
`sessions stuck` and `partitions`, something needs attention), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, Iterable, TextIO
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:  # light at import: cli/main.py takes `duration` from here to build the parser
    from shared.config import Settings

OK, FAILED, USAGE = 0, 1, 2


def print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, ensure_ascii=False, default=str))


def table(headers: list[str], rows: Iterable[list[Any]], right: Iterable[int] = ()) -> str:
    """A plain-text table: columns as wide as their widest cell; `right` aligns numeric columns."""
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    right = set(right)

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in rows])


def err(message: str) -> None:
    print(f"chatsessions: {message}", file=sys.stderr)


def redact(url: str | None) -> str:
    """A URL without its password (for output)."""
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        netloc = f"{parts.username}:***@{host}" if parts.username else f"***@{host}"
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def duration(text: str) -> float:
    """Seconds from "90", "90s", "5m", "2h" or "1d" (argparse type)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    raw = text.strip().lower()
    scale = units.get(raw[-1:], None)
    try:
        value = float(raw[:-1] if scale else raw) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90, 90s, 5m, 2h)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a duration cannot be negative")
    return value


class Progress:
    """Progress of a long operation on stderr: one updating line on a terminal, a line per 10% otherwise."""

    def __init__(self, label: str, stream: TextIO | None = None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.shown = -10

    def __call__(self, done: int, total: int, what: str) -> None:
        pct = done * 100 // max(total, 1)
        if self.tty:
            self.stream.write(f"\r{self.label}: {done}/{total} ({pct}%) {what[:50]:50}")
            if done >= total:
                self.stream.write("\n")
        elif pct >= self.shown + 10 or done >= total:
            self.stream.write(f"{self.label}: {done}/{total} ({pct}%) {what[:80]}\n")
            self.shown = pct
        self.stream.flush()


def redis_at(url: str, master_name: str | None = None):
    """A Redis client with short timeouts (through the Sentinel `master_name` for a sentinel:// URL)."""
    from shared.redis_client import redis_client

    return redis_client(url, master_name, socket_connect_timeout=3, socket_timeout=10)


def is_redis(url: str | None) -> bool:
    return bool(url) and url.split("://", 1)[0] in ("redis", "rediss", "sentinel")


def celery_app(settings: Settings):
    from shared.queueing import make_celery

    return make_celery(settings)


def broker_view_of(settings: Settings):
    """The Redis broker view and the workers' queues, or (None, None) with the in-process broker."""
    from cli import broker_view

    if not is_redis(settings.broker_url):
        return None, None
    ledger = redis_at(settings.redis_url) if settings.redis_url and settings.redis_url != settings.broker_url else None
    view = broker_view.BrokerView(redis_at(settings.broker_url, settings.redis_sentinel_master), settings.partitions, ledger)
    return view, lambda: consumers_of(settings, 1.0)


def consumers_of(settings: Settings, timeout: float) -> dict[str, list[str]] | None:
    from cli import broker_view

    try:
        return broker_view.queue_consumers(celery_app(settings), timeout)
    except Exception as exc:  # noqa: BLE001 - whatever the broker raises, the table still prints
        err(f"could not ask the workers which queues they consume: {exc.__class__.__name__}: {exc}")
        return None
