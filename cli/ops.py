"""Operators' commands: `sessions list|show|new|erase|export|stuck`, `partitions` and `check`.

Output is a table by default and JSON with --json. Exit codes: 0 ok, 1 failure or nothing found (or, for
`stuck` and `partitions`, something needs attention), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TextIO
from urllib.parse import urlsplit, urlunsplit

from cli import broker_view, session_reset, stuck
from shared import privacy, redis_keys, session_queries
from shared.config import Settings, get_settings
from shared.errors import ConfigError
from shared.partitioning import partition_of

OK, FAILED, USAGE = 0, 1, 2


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, ensure_ascii=False, default=str))


def _table(headers: list[str], rows: Iterable[list[Any]], right: Iterable[int] = ()) -> str:
    """A plain-text table: columns as wide as their widest cell; `right` aligns numeric columns."""
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    right = set(right)

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in rows])


def _err(message: str) -> None:
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


def _redis(url: str, master_name: str | None = None):
    from shared.redis_client import redis_client

    return redis_client(url, master_name, socket_connect_timeout=3, socket_timeout=10)


def _is_redis(url: str | None) -> bool:
    return bool(url) and url.split("://", 1)[0] in ("redis", "rediss", "sentinel")


def _celery(settings: Settings):
    from shared.queueing import make_celery

    return make_celery(settings)


def sweep_task_name() -> str:
    """The periodic sweeper's task name (it resends unsent replies and hands stalled sessions back)."""
    from shared.queueing import SWEEP

    return SWEEP


# ----------------------------------------------------------------------------------------------------------------
# sessions ...


def sessions_main(args: argparse.Namespace) -> int:
    handlers: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
        "list": _sessions_list, "show": _sessions_show, "new": _sessions_new, "erase": _sessions_erase,
        "export": _sessions_export, "stuck": _sessions_stuck,
    }
    return handlers[args.sessions_command](args, get_settings())


def _sessions_list(args: argparse.Namespace, settings: Settings) -> int:
    try:
        page = session_queries.find_sessions(settings.database_url, channel=args.channel, status=args.status,
                                   idle_minutes=args.idle_minutes, page=args.page, limit=args.limit)
    except ValueError as exc:
        _err(str(exc))
        return USAGE
    if args.json:
        _print_json({"page": page.page, "pages": page.pages, "limit": page.limit, "total": page.total,
                     "sessions": [s.to_dict(settings.partitions) for s in page.sessions]})
        return OK
    t = datetime.now(timezone.utc)
    rows = [[s.key, partition_of(s.key, settings.partitions), s.status, s.generation, s.message_count,
             f"{s.last_activity_at:%Y-%m-%d %H:%M:%S}",
             stuck.format_duration((t - s.last_activity_at).total_seconds())] for s in page.sessions]
    print(_table(["KEY", "PART", "STATUS", "GEN", "MSGS", "LAST ACTIVITY (UTC)", "IDLE"], rows, right=(1, 3, 4, 6)))
    print(f"page {page.page} of {page.pages}, {page.total} session(s)"
          + (f"; next: --page {page.page + 1}" if page.page < page.pages else ""))
    return OK


def _sessions_show(args: argparse.Namespace, settings: Settings) -> int:
    detail = session_queries.session_detail(settings.database_url, args.key, settings.partitions)
    if detail is None:
        _err(f"no session {args.key!r}")
        return FAILED
    from shared.logs import pseudonym

    detail["log_pseudonym"] = pseudonym(settings.secret_key, args.key)  # the logs name the session so (DEBUG aside)
    if args.json:
        _print_json(detail)
        return OK
    from shared.transcripts import format_transcript

    print(format_transcript(args.key, settings.database_url))
    s = detail["session"]
    lease = f"lease until {s['lease_until']}" if s["lease_until"] else "lease free"
    print(f"  partition {s['partition']}, last seq {s['last_seq']}, {lease}")
    print(f"  in the logs as {detail['log_pseudonym']}")
    for item in detail["inbox"]:
        print(f"  waiting in inbox: #{item['seq']} since {item['created_at']}")
    for letter in detail["dead_letters"]:
        print(f"  dead letter {letter['id']}: {letter['error'][:100]}")
    return OK


def _sessions_new(args: argparse.Namespace, settings: Settings) -> int:
    from workers.store import LeaseBusy, LeaseLost

    deadline = time.monotonic() + args.wait
    while True:
        try:
            generation = session_reset.force_new_session(settings.database_url, args.key, settings.lease_seconds)
            break
        except LookupError as exc:
            _err(str(exc).strip("'\""))
            return FAILED
        except (LeaseBusy, LeaseLost):
            if time.monotonic() >= deadline:
                _err(f"session {args.key!r} is busy: a turn holds its lease; try again (or --wait longer)")
                return FAILED
            time.sleep(0.25)
    if args.json:
        _print_json({"key": args.key, "generation": generation})
    else:
        print(f"session {args.key}: new conversation started (generation {generation}); earlier messages stay "
              "stored but are no longer given to the Agent")
    return OK


def _erase_summary(r: privacy.EraseReport) -> list[str]:
    return [f"  direct-message sessions: {len(r.sessions)}" + (f" ({', '.join(r.sessions)})" if r.sessions else ""),
            f"  messages (theirs and the Agent's replies to them): {r.messages}",
            f"  lifecycle events: {r.events}",
            f"  waiting (inbox) messages: {r.inbox}",
            f"  dead letters: {r.dead_letters}",
            f"  group sessions their messages were removed from: {len(r.group_sessions)}"
            + (f" ({', '.join(r.group_sessions)})" if r.group_sessions else ""),
            f"  ingress sequence counters (Redis): {r.redis_keys}"]


def _empty(r: privacy.EraseReport) -> bool:
    return not (r.sessions or r.messages or r.inbox or r.dead_letters)


def _erase_preview(args: argparse.Namespace, settings: Settings) -> privacy.EraseReport:
    """What an erase would delete (counting the Redis counters too if Redis answers)."""
    from redis import RedisError

    if settings.redis_url:
        try:
            return privacy.erase_user(settings.database_url, args.user, channel=args.channel, dry_run=True,
                                    redis_client=_redis(settings.redis_url), identity=settings.identity_of(args.user))
        except RedisError:
            pass
    return privacy.erase_user(settings.database_url, args.user, channel=args.channel, dry_run=True,
                            identity=settings.identity_of(args.user))


def _sessions_erase(args: argparse.Namespace, settings: Settings) -> int:
    url = settings.database_url
    preview = _erase_preview(args, settings)
    if _empty(preview):
        if args.json:
            _print_json({"erased": False, **preview.to_dict()})
        else:
            print(f"nothing stored about user {args.user}" + (f" on {args.channel}" if args.channel else ""))
        return FAILED
    if args.dry_run:
        if args.json:
            _print_json({"erased": False, **preview.to_dict()})
        else:
            print(f"would erase for user {args.user}:", *_erase_summary(preview), sep="\n")
        return OK
    if not args.yes:
        if not sys.stdin.isatty():
            _err("refusing to erase without --yes (stdin is not a terminal)")
            print(f"would erase for user {args.user}:", *_erase_summary(preview), sep="\n", file=sys.stderr)
            return USAGE
        print(f"about to erase for user {args.user}:", *_erase_summary(preview), sep="\n")
        if input("erase all of it? this cannot be undone [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing erased")
            return FAILED
    report = privacy.erase_user(url, args.user, channel=args.channel, progress=Progress(f"erasing {args.user}"),
                              identity=settings.identity_of(args.user))
    redis_error = None
    if settings.redis_url and report.sessions:
        from redis import RedisError

        try:
            report.redis_keys = privacy.forget_sequences(_redis(settings.redis_url), report.sessions)
        except RedisError as exc:
            redis_error = f"{exc.__class__.__name__}: {exc}"
    if args.json:
        _print_json({"erased": True, **report.to_dict(), "redis_error": redis_error})
    else:
        print(f"erased for user {args.user}:", *_erase_summary(report), sep="\n")
    if redis_error:
        keys = " ".join(f"{redis_keys.SEQ_PREFIX}{k}" for k in report.sessions)
        _err(f"the database is erased, but the ingress counters in Redis were not ({redis_error}): when Redis is "
             f"back, `DEL {keys}` there, or the user's next message first waits for the numbers before it")
        return FAILED
    return OK


def _sessions_export(args: argparse.Namespace, settings: Settings) -> int:
    doc = privacy.export_user(settings.database_url, args.user, channel=args.channel,
                            identity=settings.identity_of(args.user))
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text)
    found = any(doc[k] for k in ("direct_sessions", "group_messages", "group_inbox", "group_dead_letters"))
    if not found:
        _err(f"nothing stored about user {args.user}")
        return FAILED
    if args.output:
        print(f"wrote {len(doc['direct_sessions'])} session(s) and {len(doc['group_messages'])} group message(s) "
              f"of user {args.user} to {args.output}", file=sys.stderr)
    return OK


def _broker_view(settings: Settings):
    """The Redis broker view and the workers' queues, or (None, None) with the in-process broker."""
    if not _is_redis(settings.broker_url):
        return None, None
    ledger = _redis(settings.redis_url) if settings.redis_url and settings.redis_url != settings.broker_url else None
    view = broker_view.BrokerView(_redis(settings.broker_url, settings.redis_sentinel_master), settings.partitions, ledger)
    return view, lambda: _consumers(settings, 1.0)


def _consumers(settings: Settings, timeout: float) -> dict[str, list[str]] | None:
    try:
        return broker_view.queue_consumers(_celery(settings), timeout)
    except Exception as exc:  # noqa: BLE001 - whatever the broker raises, the table still prints
        _err(f"could not ask the workers which queues they consume: {exc.__class__.__name__}: {exc}")
        return None


def _sessions_stuck(args: argparse.Namespace, settings: Settings) -> int:
    from redis import RedisError

    view, consumers = _broker_view(settings)
    try:
        found = stuck.find_stuck(settings.database_url, args.older_than, partitions=settings.partitions,
                                 lease_seconds=settings.lease_seconds, view=view, consumers=consumers)
    except RedisError as exc:
        _err(f"broker unreachable ({redact(settings.broker_url)}): {exc.__class__.__name__}: {exc}")
        return FAILED
    recovery = None
    if args.recover and found:
        request = None
        if not settings.embedded:
            name = sweep_task_name()

            def request() -> None:
                from shared.queueing import MAINTENANCE_QUEUE

                _celery(settings).send_task(name, queue=MAINTENANCE_QUEUE)
        recovery = stuck.recover(settings.database_url, found, request)
    if args.json:
        _print_json({"older_than_s": args.older_than, "broker_inspected": view is not None,
                     "stuck": [e.to_dict() for e in found], "recovery": recovery.to_dict() if recovery else None})
    else:
        t = datetime.now(timezone.utc)
        rows = []
        for e in found:
            for i, reason in enumerate(e.reasons):
                rows.append([e.key, e.partition, stuck.format_duration(e.age_s(t)), reason] if i == 0
                            else ["", "", "", reason])
        if rows:
            print(_table(["KEY", "PART", "WAITING", "WHY"], rows, right=(1, 2)))
        print(f"{len(found)} stuck session(s) with a message waiting over {stuck.format_duration(args.older_than)}"
              + ("" if view is not None else " (broker not inspected: in-process broker)"))
        if recovery:
            for key in recovery.leases_released:
                print(f"released the expired lease of {key}")
            if recovery.sweep_requested:
                print(f"asked the sweeper ({sweep_task_name()}) to resend unsent replies and hand stalled sessions "
                      "back to their partition")
            for line in recovery.advice:
                print(f"needs an operator: {line}")
    if not found:
        return OK
    if recovery is None:
        return FAILED
    return FAILED if recovery.advice else OK


# ----------------------------------------------------------------------------------------------------------------
# partitions


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (the --partitions syntax)."""
    out: list[str] = []
    for n in sorted(numbers):
        if out and n == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ",".join(out)


def partitions_main(args: argparse.Namespace) -> int:
    from redis import RedisError

    from shared.queueing import MAINTENANCE_QUEUE

    settings = get_settings()
    if not _is_redis(settings.broker_url):
        _err(f"`partitions` reads the Redis broker; BROKER_URL is {redact(settings.broker_url)}")
        return USAGE
    view, _ = _broker_view(settings)
    try:
        view.redis.ping()
    except RedisError as exc:
        _err(f"broker unreachable ({redact(settings.broker_url)}): {exc.__class__.__name__}: {exc}")
        return FAILED
    consumers = _consumers(settings, args.timeout)
    try:
        statuses = broker_view.partition_status(view, consumers, extra_queues=[MAINTENANCE_QUEUE])
    except RedisError as exc:
        _err(f"broker unreachable ({redact(settings.broker_url)}): {exc.__class__.__name__}: {exc}")
        return FAILED
    warnings = [s for s in statuses if s.warnings]
    if args.json:
        _print_json({"partitions": settings.partitions, "workers_answered": consumers is not None,
                     "queues": [s.to_dict() for s in statuses]})
    else:
        rows = [[s.partition if s.partition is not None else "-", s.queue, s.depth, s.in_flight,
                 stuck.format_duration(s.oldest_age_s) if s.oldest_age_s is not None else "-",
                 "?" if s.consumers is None else (", ".join(s.consumers) or "-"), "; ".join(s.warnings)]
                for s in statuses]
        print(_table(["PART", "QUEUE", "DEPTH", "IN FLIGHT", "OLDEST", "CONSUMERS", "WARNING"], rows,
                     right=(0, 2, 3, 4)))
        if consumers is None:
            print("warning: the workers did not answer; consumers are unknown")
        idle = [s.partition for s in statuses if s.partition is not None and s.consumers == [] and not s.depth]
        if idle:
            print(f"warning: no consumer for partition(s) {_ranges(idle)}")
        for s in warnings:
            if s.partition not in idle or s.partition is None:
                print(f"warning: {s.queue}: {'; '.join(s.warnings)}")
    return FAILED if warnings or consumers is None else OK


# ----------------------------------------------------------------------------------------------------------------
# check


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str


def _attempt(name: str, fn: Callable[[], str]) -> CheckResult:
    try:
        return CheckResult(name, True, fn())
    except Exception as exc:  # noqa: BLE001 - a check reports every failure as a line, never a traceback
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if type(exc) is RuntimeError:  # this module's own findings: already worded
            return CheckResult(name, False, message)
        return CheckResult(name, False, f"{exc.__class__.__name__}: {message}" if message else exc.__class__.__name__)


def _check_database(url: str, timeout: float) -> str:
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine, inspect, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    from shared.db import driver_options
    from shared.migrate import alembic_config

    parsed = make_url(url)
    sqlite_file = parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
    if sqlite_file and not os.path.exists(parsed.database):  # connecting would create an empty file
        raise RuntimeError(f"{url}: no database file: run `chatsessions db upgrade`")
    connect_args = {}
    if url.startswith("postgresql"):
        connect_args = {"connect_timeout": max(1, int(timeout))} | driver_options(url)
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                raise RuntimeError("no schema: run `chatsessions db upgrade`")
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    where = parsed.render_as_string(hide_password=True)
    if version != head:
        raise RuntimeError(f"{where}: schema at {version}, this release needs {head}: run `chatsessions db upgrade`")
    return f"{where} (schema {version}, current)"


def _check_broker(settings: Settings, timeout: float) -> str:
    if settings.embedded:
        return "memory:// (in-process: works only inside `chatsessions run`)"
    app = _celery(settings)
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
    return redact(settings.broker_url)


def _check_redis(url: str | None, timeout: float) -> str:
    if not url:
        return "none (in-process ledger: `chatsessions run` only)"
    from shared.redis_client import redis_client

    client = redis_client(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
        version = client.info("server").get("redis_version", "?")
    finally:
        client.close()
    return f"{redact(url)} (Redis {version})"


def _http_get(url: str, headers: dict[str, str], timeout: float, shown: str) -> Any:
    """GET a platform API; errors name `shown` (the URL without credentials) and the platform's own words."""
    from cli.platform_api import PlatformError, call

    try:
        return call("GET", url, headers=headers, timeout=timeout, shown=shown)
    except PlatformError as exc:
        raise RuntimeError(str(exc)) from None  # worded already: `check` prints it as it is


def _check_platform(channel: Any, timeout: float) -> str:
    """One authenticated read from the platform's API with the configured credentials."""
    base, secrets, options = channel.api_base, channel.secrets, channel.options
    if channel.platform == "whatsapp":
        version = options.get("api_version", "v21.0")
        number = options["phone_number_id"]
        doc = _http_get(f"{base}/{version}/{number}?fields=id,display_phone_number,verified_name",
                        {"Authorization": f"Bearer {secrets['access_token']}"}, timeout,
                        f"{base}/{version}/{number}")
        return f"phone number {doc.get('display_phone_number') or doc.get('id') or number}" + (
            f" ({doc['verified_name']})" if doc.get("verified_name") else "")
    if channel.platform == "telegram":
        doc = _http_get(f"{base}/bot{secrets['bot_token']}/getMe", {}, timeout, f"{base}/bot<token>/getMe")
        if not doc.get("ok"):
            raise RuntimeError(f"getMe answered ok=false: {doc.get('description', '')}")
        username = str(doc.get("result", {}).get("username", ""))
        expected = str(options.get("bot_username", "")).lstrip("@")
        if expected and username.lower() != expected.lower():
            raise RuntimeError(f"the token belongs to @{username}, but options.bot_username is {expected!r}")
        return f"bot @{username}"
    if channel.platform == "discord":
        doc = _http_get(f"{base}/users/@me", {"Authorization": f"Bot {secrets['bot_token']}"}, timeout,
                        f"{base}/users/@me")
        return f"bot {doc.get('username', '?')} ({doc.get('id', '?')})"
    if channel.platform == "webchat":
        return "served by the ingress at /chat/" + channel.id + " (no platform API)"
    raise RuntimeError(f"no API check for platform {channel.platform!r}")


def run_checks(settings: Settings, platforms: bool, timeout: float) -> list[CheckResult]:
    from workers.agents import load_agent
    from shared.channels import build_channel

    results = [CheckResult("config", True, f"{settings.config_path}: {len(settings.channels)} channel(s), "
                                           f"{settings.partitions} partitions, lease {settings.lease_seconds:g}s")]
    for cid, c in settings.channels.items():
        def channel_check(c=c) -> str:
            from cli.connect import telegram_secret_problem

            build_channel(c)
            load_agent(c.agent)
            if problem := telegram_secret_problem(c):
                raise RuntimeError(problem)
            return f"{c.platform}, agent {c.agent}"
        results.append(_attempt(f"channel {cid}", channel_check))
    results.append(_attempt("database", lambda: _check_database(settings.database_url, timeout)))
    results.append(_attempt("broker", lambda: _check_broker(settings, timeout)))
    results.append(_attempt("redis", lambda: _check_redis(settings.redis_url, timeout)))
    if platforms:
        for cid, c in settings.channels.items():
            results.append(_attempt(f"platform {cid}", lambda c=c: _check_platform(c, timeout)))
    return results


def _print_checks(results: list[CheckResult], as_json: bool) -> None:
    if as_json:
        _print_json({"ok": all(r.ok for r in results),
                     "checks": [{"name": r.name, "ok": r.ok, "detail": r.detail} for r in results]})
        return
    width = max(len(r.name) for r in results)
    for r in results:
        print(f"{'ok' if r.ok else 'FAIL':4}  {r.name:{width}}  {r.detail}")


def check_main(args: argparse.Namespace) -> int:
    from shared.config import load_settings

    try:
        settings = load_settings()
    except ConfigError as exc:
        _print_checks([CheckResult("config", False, str(exc))], args.json)
        return USAGE
    results = run_checks(settings, args.platforms, args.timeout)
    _print_checks(results, args.json)
    return OK if all(r.ok for r in results) else FAILED
