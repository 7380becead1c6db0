"""`chatsessions sessions waiting|takeover|reply|handback`: the operators' commands of handing a conversation to a
person (shared/handoff.py); the operator console offers the same."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

from cli import stuck
from cli.common import FAILED, OK, USAGE, err, print_json, table
from shared import handoff
from shared.config import Settings
from shared.models import HUMAN, WAITING


def waiting(args: argparse.Namespace, settings: Settings) -> int:
    """The waiting queue, oldest first; with --operator, the sessions that operator has."""
    mode, who = (HUMAN, handoff.operator_name(args.operator)) if args.operator else (WAITING, None)
    rows = handoff.handovers(settings.database_url, mode, who)
    if args.json:
        print_json({"sessions": [r.to_dict() for r in rows]})
        return OK
    t = datetime.now(timezone.utc)
    print(table(["KEY", "CHANNEL", "WAITING" if mode == WAITING else "SINCE LAST REPLY", "REASON"],
                [[r.key, r.channel_id, stuck.format_duration((t - r.since).total_seconds()) if r.since else "-",
                  (r.reason or "")[:60]] for r in rows]))
    print(f"{len(rows)} session(s) " + ("waiting for a person" if mode == WAITING else f"with {who}"))
    return OK


def take_over(args: argparse.Namespace, settings: Settings) -> int:
    before = handoff.take_over(settings.database_url, args.key, args.operator)
    if args.json:
        print_json({"key": args.key, "operator": args.operator, "mode_before": before})
    else:
        print(f"{args.operator} has {args.key} (it was {before}); the Agent does not answer it until it is handed back")
    return OK


def reply(args: argparse.Namespace, settings: Settings) -> int:
    """Queue the operator's reply on the session's partition: its worker stores and sends it in order."""
    if settings.embedded:
        err("a reply goes through the broker to the session's worker: set BROKER_URL=redis://...")
        return USAGE
    from ingress.publisher import Publisher

    message = handoff.operator_reply(settings.database_url, args.key, args.operator, args.text,
                                     publish=Publisher(settings).publish)
    if args.json:
        print_json({"key": args.key, "operator": args.operator, "id": message.platform_message_id, "queued": True})
    else:
        print(f"queued {message.platform_message_id}: `sessions show {args.key}` shows its delivery")
    return OK


def hand_back(args: argparse.Namespace, settings: Settings) -> int:
    actor = args.operator or "cli"
    changed = handoff.hand_back(settings.database_url, args.key, actor,
                                handoff.operator_name(args.operator) if args.operator else None)
    if args.json:
        print_json({"key": args.key, "returned": changed})
    else:
        print(f"{args.key} is the Agent's again" if changed else f"{args.key} was the Agent's already")
    return OK


COMMANDS = {"waiting": waiting, "takeover": take_over, "reply": reply, "handback": hand_back}


def main(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return COMMANDS[args.sessions_command](args, settings)
    except handoff.TakenBy as exc:
        err(str(exc))
        return FAILED
    except handoff.HandoffError as exc:
        err(str(exc))
        return USAGE
