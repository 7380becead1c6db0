"""`chatsessions sessions ...`: read-only views of sessions for operators."""

from __future__ import annotations

import argparse
import sys

from shared.config import get_settings
from shared.store import list_sessions, transcript


def format_transcript(key: str, url: str) -> str:
    found = transcript(url, key)
    if found is None:
        raise LookupError(f"no session {key!r}")
    summary, lines = found
    out = [f"session {summary.key}  [{summary.status}, generation {summary.generation}]"]
    for line in lines:
        at = line.at.strftime("%H:%M:%S")
        if line.kind == "event":
            out.append(f"  {at}  -- {line.text} (generation {line.generation})")
        elif line.kind == "user":
            out.append(f"  {at}  g{line.generation} {line.sender_name}: {line.text}")
        else:
            status = f"  [{line.delivery_status}]" if line.delivery_status != "sent" else ""
            out.append(f"  {at}  g{line.generation}   Agent: {line.text}{status}")
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    url = get_settings().database_url
    if args.sessions_command == "show":
        try:
            print(format_transcript(args.key, url))
        except LookupError as exc:
            print(f"chatsessions: {exc}", file=sys.stderr)
            return 1
        return 0
    rows = list_sessions(url, args.channel, args.limit)
    print(f"{'KEY':60} {'STATUS':8} {'GEN':>3} {'MSGS':>5}  LAST ACTIVITY")
    for r in rows:
        print(f"{r.key:60} {r.status:8} {r.generation:>3} {r.message_count:>5}  {r.last_activity_at:%Y-%m-%d %H:%M:%S}")
    return 0
