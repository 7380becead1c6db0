"""`chatsessions sessions list|show|new|erase|export|stuck`: find sessions, read one, start a fresh one, a user's
data erased or exported (privacy), and the sessions whose messages are stuck (with --recover, unstuck). The
handoff's commands (waiting, takeover, reply, handback) are cli/handoff.py."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from typing import Callable

from cli import handoff, session_reset, stuck
from cli.common import FAILED, OK, USAGE, Progress, broker_view_of, celery_app, err, print_json, redact, redis_at, table
from shared import privacy, redis_keys, session_queries
from shared.config import Settings, get_settings
from shared.partitioning import partition_of


def sweep_task_name() -> str:
    """The periodic sweeper's task name (it resends unsent replies and hands stalled sessions back)."""
    from shared.queueing import SWEEP

    return SWEEP


def main(args: argparse.Namespace) -> int:
    handlers: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
        "list": _sessions_list, "show": _sessions_show, "new": _sessions_new, "erase": _sessions_erase,
        "export": _sessions_export, "stuck": _sessions_stuck,
    }
    if args.sessions_command in handoff.COMMANDS:
        return handoff.main(args, get_settings())
    return handlers[args.sessions_command](args, get_settings())


def _sessions_list(args: argparse.Namespace, settings: Settings) -> int:
    try:
        page = session_queries.find_sessions(settings.database_url, channel=args.channel, status=args.status,
                                   idle_minutes=args.idle_minutes, page=args.page, limit=args.limit)
    except ValueError as exc:
        err(str(exc))
        return USAGE
    if args.json:
        print_json({"page": page.page, "pages": page.pages, "limit": page.limit, "total": page.total,
                    "sessions": [s.to_dict(settings.partitions) for s in page.sessions]})
        return OK
    t = datetime.now(timezone.utc)
    rows = [[s.key, partition_of(s.key, settings.partitions), s.status, s.generation, s.message_count,
             f"{s.last_activity_at:%Y-%m-%d %H:%M:%S}",
             stuck.format_duration((t - s.last_activity_at).total_seconds())] for s in page.sessions]
    print(table(["KEY", "PART", "STATUS", "GEN", "MSGS", "LAST ACTIVITY (UTC)", "IDLE"], rows, right=(1, 3, 4, 6)))
    print(f"page {page.page} of {page.pages}, {page.total} session(s)"
          + (f"; next: --page {page.page + 1}" if page.page < page.pages else ""))
    return OK


def _sessions_show(args: argparse.Namespace, settings: Settings) -> int:
    detail = session_queries.session_detail(settings.database_url, args.key, settings.partitions)
    if detail is None:
        err(f"no session {args.key!r}")
        return FAILED
    from shared.logs import pseudonym

    detail["log_pseudonym"] = pseudonym(settings.secret_key, args.key)  # the logs name the session so (DEBUG aside)
    if args.json:
        print_json(detail)
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
            err(str(exc).strip("'\""))
            return FAILED
        except (LeaseBusy, LeaseLost):
            if time.monotonic() >= deadline:
                err(f"session {args.key!r} is busy: a turn holds its lease; try again (or --wait longer)")
                return FAILED
            time.sleep(0.25)
    if args.json:
        print_json({"key": args.key, "generation": generation})
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
                                    redis_client=redis_at(settings.redis_url), identity=settings.identity_of(args.user))
        except RedisError:
            pass
    return privacy.erase_user(settings.database_url, args.user, channel=args.channel, dry_run=True,
                            identity=settings.identity_of(args.user))


def _sessions_erase(args: argparse.Namespace, settings: Settings) -> int:
    url = settings.database_url
    preview = _erase_preview(args, settings)
    if _empty(preview):
        if args.json:
            print_json({"erased": False, **preview.to_dict()})
        else:
            print(f"nothing stored about user {args.user}" + (f" on {args.channel}" if args.channel else ""))
        return FAILED
    if args.dry_run:
        if args.json:
            print_json({"erased": False, **preview.to_dict()})
        else:
            print(f"would erase for user {args.user}:", *_erase_summary(preview), sep="\n")
        return OK
    if not args.yes:
        if not sys.stdin.isatty():
            err("refusing to erase without --yes (stdin is not a terminal)")
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
            report.redis_keys = privacy.forget_sequences(redis_at(settings.redis_url), report.sessions)
        except RedisError as exc:
            redis_error = f"{exc.__class__.__name__}: {exc}"
    if args.json:
        print_json({"erased": True, **report.to_dict(), "redis_error": redis_error})
    else:
        print(f"erased for user {args.user}:", *_erase_summary(report), sep="\n")
    if redis_error:
        keys = " ".join(f"{redis_keys.SEQ_PREFIX}{k}" for k in report.sessions)
        err(f"the database is erased, but the ingress counters in Redis were not ({redis_error}): when Redis is "
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
        err(f"nothing stored about user {args.user}")
        return FAILED
    if args.output:
        print(f"wrote {len(doc['direct_sessions'])} session(s) and {len(doc['group_messages'])} group message(s) "
              f"of user {args.user} to {args.output}", file=sys.stderr)
    return OK


def _sessions_stuck(args: argparse.Namespace, settings: Settings) -> int:
    from redis import RedisError

    view, consumers = broker_view_of(settings)
    try:
        found = stuck.find_stuck(settings.database_url, args.older_than, partitions=settings.partitions,
                                 lease_seconds=settings.lease_seconds, view=view, consumers=consumers)
    except RedisError as exc:
        err(f"broker unreachable ({redact(settings.broker_url)}): {exc.__class__.__name__}: {exc}")
        return FAILED
    recovery = None
    if args.recover and found:
        request = None
        if not settings.embedded:
            name = sweep_task_name()

            def request() -> None:
                from shared.queueing import MAINTENANCE_QUEUE

                celery_app(settings).send_task(name, queue=MAINTENANCE_QUEUE)
        recovery = stuck.recover(settings.database_url, found, request)
    if args.json:
        print_json({"older_than_s": args.older_than, "broker_inspected": view is not None,
                    "stuck": [e.to_dict() for e in found], "recovery": recovery.to_dict() if recovery else None})
    else:
        t = datetime.now(timezone.utc)
        rows = []
        for e in found:
            for i, reason in enumerate(e.reasons):
                rows.append([e.key, e.partition, stuck.format_duration(e.age_s(t)), reason] if i == 0
                            else ["", "", "", reason])
        if rows:
            print(table(["KEY", "PART", "WAITING", "WHY"], rows, right=(1, 2)))
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
