"""`chatsessions loadgen`: play WhatsApp, Telegram and Discord against a running ingress and check every reply.

Each simulated session is a real chat in the platform's own webhook format, correctly signed:
  * WhatsApp Cloud API `messages` webhooks (X-Hub-Signature-256), DMs and groups (several members);
  * Telegram Bot API Updates (X-Telegram-Bot-Api-Secret-Token), private chats and supergroups;
  * Discord `/ask` application-command interactions on the interactions endpoint (Ed25519-signed), DM channels and
    guild channels. (Not the gateway: interactions need no extra process, and reach the same sessions.)
Replies are received by a StandInPlatforms (the platforms' send APIs, cli/standins/platforms.py) that this command
starts on the host:port of the channels' `api_base`; the first path segment of the api_base is the stand-in prefix.

Every message text starts with a tag `lg-<run>-<session>-<n>`; the Agent must repeat it in its reply (the `echo`
Agent does, as do cli.bench_agents:DemoEcho and SlowEcho). That gives, per message: latency from the webhook's
200 to the reply at the stand-in, and the correctness counts:
  lost        accepted (200) but no reply arrived
  duplicated  replies beyond the first for one message
  reordered   replies that arrived after the reply to a later message of the same session
  misrouted   replies that arrived in another chat than the message's session
A session's messages are POSTed one after the other (the next only after the previous one's 200), as the
platforms deliver a chat's updates, so the order the ingress sees is the order they were written in.

Load shapes: --concurrency C (closed loop: at most C messages awaiting their reply, and --window per session) or
--rate R (open loop: R messages/s offered, sessions round-robin, whatever the replies do). In code, a Workload with
`continues=` an earlier one plays the next messages of that one's sessions (the same chats: waves of a benchmark).

--status-callbacks posts what a WhatsApp deployment gets three of for every reply instead: signed status webhooks
(`statuses[]`: sent, delivered, read of the session's replies, in turn); the ingress answers them 200 and nothing
else, so a status callback is done at its 200.

    chatsessions loadgen --url http://127.0.0.1:8000 --config channels.toml --sessions 300 --messages 10 \
        --concurrency 32 --json

The package, in the order a run uses it:
  targets.py   the channels loadgen can drive (Target, targets_from_settings) and the Discord signing key
  chats.py     the simulated chats (Session), their messages (Msg) and the signed webhook requests
  workload.py  a Workload: sessions x messages in one load shape, and which session sends next
  engine.py    LoadGen: sends the workloads, matches each reply to its message
  report.py    what a run measured: the report, its correctness (correct) and its summary
This module is the command (add_arguments, main) and names the pieces for `from cli.loadgen import ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cli.loadgen.chats import (
    DISCORD_GUILD,
    KINDS,
    NAMES,
    Msg,
    Session,
    _session,
    build_request,
    build_status_request,
    discord_interaction,
)
from cli.loadgen.engine import FILLERS, TAG, LoadGen
from cli.loadgen.report import correct, replied_within, summary, workload_report
from cli.loadgen.targets import ECHOING_AGENTS, Target, discord_key_from_seed, targets_from_settings
from cli.loadgen.workload import WEBHOOKS, Workload

__all__ = [
    "DISCORD_GUILD", "ECHOING_AGENTS", "FILLERS", "KINDS", "NAMES", "TAG", "WEBHOOKS", "LoadGen", "Msg", "Session",
    "Target", "Workload", "_session", "add_arguments", "build_request", "build_status_request", "correct",
    "discord_interaction", "discord_key_from_seed", "main", "replied_within", "summary", "targets_from_settings",
    "workload_report",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("LOADGEN_URL", "http://127.0.0.1:8000"),
                        help="the ingress (default http://127.0.0.1:8000)")
    parser.add_argument("--config", default=os.environ.get("CHATSESSIONS_CONFIG"),
                        help="the deployment's channels TOML (secrets from the environment it names); "
                             "default CHATSESSIONS_CONFIG")
    parser.add_argument("--sessions", type=int, default=60)
    parser.add_argument("--messages", type=int, default=5, help="messages per session")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--rate", type=float, help="open loop: messages per second offered")
    shape.add_argument("--concurrency", type=int, help="closed loop: messages awaiting their reply (default 16)")
    parser.add_argument("--window", type=int, default=1,
                        help="closed loop: messages of one session awaiting a reply at once (0 = no limit)")
    parser.add_argument("--senders", type=int, default=32, help="open loop: HTTP client threads")
    parser.add_argument("--duration", type=float, help="stop sending after this many seconds")
    parser.add_argument("--channels", help="comma-separated channel ids (default: every usable channel)")
    parser.add_argument("--platforms", help="comma-separated platforms (whatsapp,telegram,discord)")
    parser.add_argument("--discord-key", default=os.environ.get("LOADGEN_DISCORD_KEY"),
                        help="hex Ed25519 seed whose public key the Discord channel has (env LOADGEN_DISCORD_KEY)")
    parser.add_argument("--no-replies", action="store_true", help="ingress only: a message is done at its 200")
    parser.add_argument("--status-callbacks", action="store_true",
                        help="POST WhatsApp status callbacks (sent, delivered, read) to the WhatsApp channels' DM "
                             "sessions instead of messages; implies --no-replies")
    parser.add_argument("--reply-timeout", type=float, default=60.0)
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="after the last send, give up when no reply came for this long")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def main(args: argparse.Namespace) -> int:
    from cli.standins.platforms import StandInPlatforms
    from shared.config import load_settings
    from shared.errors import ConfigError

    env = dict(os.environ)
    if args.config:
        env["CHATSESSIONS_CONFIG"] = args.config
    settings = load_settings(env)
    key = discord_key_from_seed(args.discord_key) if args.discord_key else None
    platforms = args.platforms.split(",") if args.platforms else None
    if args.status_callbacks:
        if platforms and "whatsapp" not in platforms:
            raise ConfigError("--status-callbacks: status callbacks are WhatsApp's (--platforms whatsapp)")
        platforms = ["whatsapp"]
    targets, address, warnings = targets_from_settings(
        settings, key, args.channels.split(",") if args.channels else None, platforms)
    for w in warnings:
        print(f"loadgen: {w}", file=sys.stderr)
    if not targets or address is None:
        raise ConfigError(f"{settings.config_path}: no channel loadgen can drive (it needs api_base pointing at a "
                          "local stand-in, http://127.0.0.1:PORT/PREFIX)")
    try:
        standin = StandInPlatforms(address[0], address[1]).start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address[0]}:{address[1]} for the replies (api_base): {exc}") from None
    concurrency = None if args.rate else (args.concurrency or 16)
    wl = Workload("loadgen", args.sessions, args.messages, rate=args.rate, concurrency=concurrency,
                  window=args.window, expect_replies=not (args.no_replies or args.status_callbacks),
                  senders=args.senders, duration_s=args.duration,
                  webhook="status" if args.status_callbacks else "message")
    gen = LoadGen(args.url, targets, standin, reply_timeout=args.reply_timeout, drain_timeout=args.drain_timeout,
                  progress=False if args.quiet else None)
    if not args.quiet and not sys.stderr.isatty():
        gen.progress = True
    try:
        report = gen.run(wl)[0]
    finally:
        gen.close()
        standin.stop()
    report["channels"] = [t.channel_id for t in targets]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(summary(report))
    return 0 if correct(report) and not report["rejected"] else 1
