"""`chatsessions deadletters list|show|replay|drop`: messages whose turn failed for good."""

from __future__ import annotations

import argparse
import json
import sys

from shared.config import get_settings
from shared.transcripts import dead_letters, drop_dead_letter


def _one(url: str, letter_id: int):
    found = dead_letters(url, letter_id=letter_id)
    if not found:
        print(f"chatsessions: no dead letter {letter_id}", file=sys.stderr)
        return None
    return found[0]


def main(args: argparse.Namespace) -> int:
    settings = get_settings()
    url = settings.database_url
    if args.dl_command == "list":
        rows = dead_letters(url, limit=args.limit)
        if args.json:
            print(json.dumps([{"id": r.id, "session_key": r.session_key, "platform_message_id": r.platform_message_id,
                               "error": r.error, "attempts": r.attempts, "created_at": r.created_at.isoformat()}
                              for r in rows], indent=2))
            return 0
        print(f"{'ID':>5}  {'SESSION':50} {'TRIES':>5}  ERROR")
        for r in rows:
            print(f"{r.id:>5}  {r.session_key:50} {r.attempts:>5}  {r.error[:60]}")
        print(f"{len(rows)} dead letter(s)")
        return 0
    letter = _one(url, args.id)
    if letter is None:
        return 1
    if args.dl_command == "show":
        print(json.dumps({"id": letter.id, "error": letter.error, "attempts": letter.attempts,
                          "created_at": letter.created_at.isoformat(), "message": letter.message.to_dict()}, indent=2))
        return 0
    if args.dl_command == "replay":
        from ingress.publisher import Publisher

        if settings.embedded:
            print("chatsessions: replay needs the production broker (BROKER_URL=redis://...)", file=sys.stderr)
            return 2
        Publisher(settings).publish([letter.message], dedupe=False)
        if drop_dead_letter(url, letter.id, unchanged_since=letter.created_at):
            print(f"replayed dead letter {letter.id} into session {letter.session_key}")
        else:  # the replay already ran and failed again: the worker updated the letter, which stays
            print(f"replayed dead letter {letter.id} into session {letter.session_key}; it failed again "
                  "and is dead-lettered anew (see `deadletters show`)")
        return 0
    drop_dead_letter(url, letter.id)
    print(f"dropped dead letter {letter.id}")
    return 0
