"""`chatsessions operators list|hash-password` and `chatsessions audit`: the operator console's accounts
(`[[operators]]`, shared/accounts.py) and the log of what operators did (shared/audit.py)."""

from __future__ import annotations

import argparse
import getpass
import sys

from cli.common import FAILED, OK, USAGE, err, print_json, table
from shared import accounts, audit
from shared.config import get_settings

MIN_PASSWORD = 12


def add_arguments(sub) -> None:
    ops = sub.add_parser("operators", help="the operator console's accounts ([[operators]] in the channels file)")
    ops_sub = ops.add_subparsers(dest="operators_command", required=True)
    listing = ops_sub.add_parser("list", help="the configured accounts and their roles (never their hashes)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(fn=list_accounts)
    hashing = ops_sub.add_parser(
        "hash-password", help="print the password_hash line of an [[operators]] entry",
        description="Reads the password from the terminal (twice) or, when stdin is not a terminal, its first line.")
    hashing.set_defaults(fn=hash_password)
    log = sub.add_parser("audit", help="what operators did: take over, reply, hand back (newest first)")
    log.add_argument("--operator", metavar="NAME", help="only this operator's actions")
    log.add_argument("--session", metavar="KEY", help="only actions on this session")
    log.add_argument("--limit", type=int, default=100, help="entries to show (default 100)")
    log.add_argument("--json", action="store_true")
    log.set_defaults(fn=print_audit)


def list_accounts(args: argparse.Namespace) -> int:
    settings = get_settings()
    rows = [{"name": a.name, "role": a.role} for a in settings.operators.values()]
    if settings.admin_token:
        rows.append({"name": accounts.TOKEN_ACCOUNT, "role": accounts.ADMIN, "login": "ADMIN_TOKEN"})
    if args.json:
        print_json({"operators": rows})
    elif rows:
        print(table(["NAME", "ROLE"], [[r["name"], r["role"] + (" (ADMIN_TOKEN)" if "login" in r else "")]
                                       for r in rows]))
    else:
        print("no accounts: add [[operators]] to the channels file or set ADMIN_TOKEN (docs/operations.md)")
    return OK


def hash_password(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if password != getpass.getpass("again: "):
            err("the two passwords differ")
            return USAGE
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_PASSWORD:
        err(f"a password needs at least {MIN_PASSWORD} characters")
        return USAGE
    print(f'password_hash = "{accounts.hash_password(password)}"')
    return OK


def print_audit(args: argparse.Namespace) -> int:
    if args.limit < 1:
        err("--limit must be at least 1")
        return USAGE
    found = audit.entries(get_settings().database_url, actor=args.operator, key=args.session, limit=args.limit)
    if args.json:
        print_json({"entries": [e.to_dict() for e in found]})
        return OK if found else FAILED
    if not found:
        print("no operator actions recorded" + (" for that filter" if args.operator or args.session else ""))
        return FAILED
    print(table(["WHEN (UTC)", "OPERATOR", "ACTION", "SESSION", "VIA", "DETAIL"],
                [[e.at.strftime("%Y-%m-%d %H:%M:%S"), e.actor, e.action, e.session_key, e.via, e.detail or ""]
                 for e in found]))
    return OK
