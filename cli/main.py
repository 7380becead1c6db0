"""`chatsessions`: one entry point for every process and tool. Exit codes: 0 ok, 1 failure, 2 bad config/usage."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading

from sqlalchemy.exc import SQLAlchemyError

from shared.config import DEFAULT_CONCURRENCY
from shared.errors import ConfigError


def _exec(argv: list[str]) -> int:
    """Replace this process (so signals reach gunicorn/celery directly, as under a process manager)."""
    exe = shutil.which(argv[0]) or os.path.join(os.path.dirname(sys.executable), argv[0])
    os.execv(exe, argv)
    return 1  # not reached


LOCAL_COMMANDS = {"run", "db", "sessions", "deadletters", "operators", "audit"}  # usable on a laptop with the shipped config
ADMIN_BIND_DEFAULT = "127.0.0.1:8001"  # `chatsessions admin`: this host only unless told otherwise


def cmd_run(args: argparse.Namespace) -> int:
    from cli import embedded
    from cli.connect import endpoint_path
    from shared.config import get_settings
    from shared.logs import configure_logging

    settings = get_settings()
    configure_logging(settings)
    running = embedded.start(args.host, args.port, args.concurrency)
    print(f"chatsessions running at {running.url} (Ctrl-C to stop)")
    for cid, c in settings.channels.items():
        print(f"  {c.platform:9} {cid:20} {running.url}{endpoint_path(c)}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    running.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cli import demo

    return demo.main(args)


def cmd_ingress(args: argparse.Namespace) -> int:
    from shared.channels import build_channel
    from shared.config import get_settings

    settings = get_settings()  # fail here, with a clear message, before gunicorn forks
    for channel in settings.channels.values():
        build_channel(channel)  # the adapters check their options (the web chat's limits, ...)
    return _exec(["gunicorn", "ingress.wsgi:app", "--bind", args.bind, "--workers", str(args.workers),
                  *_ingress_pool(args), "--graceful-timeout", "20",
                  # gunicorn's admin socket is one path per user: a second ingress on the host would take it.
                  "--no-control-socket",
                  *_forwarded_allow_ips(settings),
                  # No access log unless asked: gunicorn formats one for any --access-logfile, /dev/null included
                  # (~15 % of the CPU of a WhatsApp status callback, the cheapest webhook).
                  *(["--access-logfile", "-"] if args.access_log else [])])


def _ingress_pool(args: argparse.Namespace) -> list[str]:
    """gunicorn's worker class. gevent (the default): a greenlet per request, no hand-off to a thread pool and no
    threads contending for the GIL: ~15 % less CPU per webhook and a p99 of milliseconds, not a hundred, at 1,000
    webhooks/s on two cores (docs/benchmarks.md). threads: gunicorn's gthread, for code that must not be
    monkey-patched."""
    if args.pool == "threads":
        return ["--worker-class", "gthread", "--threads", str(args.threads)]
    return ["--worker-class", "gevent", "--worker-connections", str(args.connections)]


def _forwarded_allow_ips(settings) -> list[str]:
    """gunicorn believes the scheme headers only from TRUSTED_PROXIES (its own default trusts 127.0.0.1)."""
    return ["--forwarded-allow-ips", ",".join(str(n) for n in settings.trusted_proxies)]


def cmd_admin(args: argparse.Namespace) -> int:
    from shared.config import get_settings

    settings = get_settings()
    if not settings.admin_token:
        raise ConfigError("the session browser needs ADMIN_TOKEN (at least 32 random characters)")
    bind = args.bind or settings.admin_bind or ADMIN_BIND_DEFAULT
    # A few support leads: one process. No access log: its URLs hold session keys and searched user ids.
    return _exec(["gunicorn", "ingress.admin_wsgi:app", "--bind", bind, "--workers", "1", "--worker-class", "gthread",
                  "--threads", str(args.threads), "--no-control-socket", *_forwarded_allow_ips(settings),
                  "--access-logfile", "/dev/null"])


# A gevent pool whose greenlets are all busy stops polling the broker (its prefetch is spent), and Celery's loop for
# green pools has no event hub to start polling again when a greenlet ends: it notices at its next 2-second poll. With
# twice the prefetch the consumer keeps polling; the one message past the pool's size waits in the pool's spawn, which
# hands it a greenlet the moment one ends (acks are late, so the message stays unacked and safe while it waits).
GREEN_PREFETCH = ("--prefetch-multiplier", "2")


def worker_command(settings, partitions: str, *, pool: str | None = None, concurrency: int | None = None,
                   name: str | None = None, maintenance: bool = True, events: bool = False,
                   loglevel: str = "INFO") -> list[str]:
    """The Celery worker command of a pool consuming `partitions` ("0-7", "0,2,5-6", "all"): what
    `chatsessions worker` execs, and what the test and bench stacks start. `pool`: threads | gevent (the execution
    model; default WORKER_POOL); `concurrency`: turns at once (default WORKER_CONCURRENCY, by pool)."""
    from shared.partitioning import parse_partitions, queue_name
    from shared.queueing import MAINTENANCE_QUEUE

    if settings.embedded:
        raise ConfigError("BROKER_URL=memory:// works only inside `chatsessions run`; set BROKER_URL=redis://...")
    try:
        numbers = parse_partitions(partitions, settings.partitions)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    pool = pool or settings.worker_pool
    if concurrency is None:
        concurrency = settings.worker_concurrency if pool == settings.worker_pool else DEFAULT_CONCURRENCY[pool]
    queues = [queue_name(p) for p in numbers] + ([MAINTENANCE_QUEUE] if maintenance else [])
    return ["celery", "-A", "workers.app", "worker", *(["-E"] if events else []), "-P", pool, "-c", str(concurrency),
            "-Q", ",".join(queues), "-n", name or f"pool-{partitions.replace(',', '_')}@%h", "--without-mingle",
            "--without-gossip", *(GREEN_PREFETCH if pool == "gevent" else ()), "-l", loglevel]


def cmd_worker(args: argparse.Namespace) -> int:
    from shared.config import get_settings

    return _exec(worker_command(get_settings(), args.partitions, pool=args.pool, concurrency=args.concurrency,
                                name=args.name, maintenance=not args.no_maintenance, events=args.events,
                                loglevel=args.loglevel))


def cmd_beat(args: argparse.Namespace) -> int:
    return _exec(["celery", "-A", "workers.app", "beat", "-l", args.loglevel,
                  "--schedule", args.schedule])


def cmd_gateway(args: argparse.Namespace) -> int:
    from ingress.discord_gateway import run

    return run(args.channel_id) or 0


def cmd_db(args: argparse.Namespace) -> int:
    from shared.config import get_settings
    from shared.migrate import upgrade

    settings = get_settings()
    upgrade(settings.database_url)
    print(f"database at {settings.database_url.split('@')[-1]} is up to date")
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    from cli import sessions

    return sessions.main(args)


def cmd_partitions(args: argparse.Namespace) -> int:
    from cli import partitions

    return partitions.main(args)


def cmd_check(args: argparse.Namespace) -> int:
    from cli import check

    return check.main(args)


def cmd_worker_alive(args: argparse.Namespace) -> int:
    from workers.liveness import (
        probe,  # light: the probe runs every few seconds in each worker container
    )

    alive, line = probe(args.max_age, args.file)
    print(line)
    return 0 if alive else 1


def cmd_deadletters(args: argparse.Namespace) -> int:
    from cli import deadletters

    return deadletters.main(args)


def add_ops_commands(sub) -> None:
    """`sessions list|show|new|erase|export|stuck` (cli/sessions.py), `sessions waiting|takeover|reply|handback`
    (cli/handoff.py), `partitions` (cli/partitions.py), `check`
    (cli/check.py), `worker-alive` (workers/liveness.py)."""
    from cli.common import duration  # "90", "90s", "5m", "2h"; light: the commands' modules load when one runs

    sessions = sub.add_parser("sessions", help="inspect and manage sessions")
    s_sub = sessions.add_subparsers(dest="sessions_command", required=True)
    s_list = s_sub.add_parser("list", help="list sessions, most recently active first (paged)")
    s_list.add_argument("--channel", help="only this channel id")
    s_list.add_argument("--status", choices=["active", "dormant"])
    s_list.add_argument("--idle-minutes", type=float, metavar="N", help="only sessions idle for at least N minutes")
    s_list.add_argument("--page", type=int, default=1)
    s_list.add_argument("--limit", type=int, default=50, help="sessions per page (default 50)")
    s_list.add_argument("--json", action="store_true")
    s_show = s_sub.add_parser("show", help="a session's transcript with generations and lifecycle events")
    s_show.add_argument("key")
    s_show.add_argument("--json", action="store_true", help="everything stored about the session, as JSON")
    s_new = s_sub.add_parser("new", help="force a fresh session for KEY (as if the user sent /new)")
    s_new.add_argument("key")
    s_new.add_argument("--wait", type=duration, default=10.0, help="how long to wait for a running turn (10s)")
    s_new.add_argument("--json", action="store_true")
    s_erase = s_sub.add_parser("erase", help="delete every message and session of one platform user (privacy)")
    s_erase.add_argument("--user", required=True, help="the platform user id (phone, Telegram or Discord user id)")
    s_erase.add_argument("--channel", help="only on this channel (default: every channel)")
    s_erase.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    s_erase.add_argument("--dry-run", action="store_true", help="only report what would be deleted")
    s_erase.add_argument("--json", action="store_true")
    s_export = s_sub.add_parser("export", help="everything stored about one platform user, as JSON (access)")
    s_export.add_argument("--user", required=True, help="the platform user id")
    s_export.add_argument("--channel", help="only on this channel (default: every channel)")
    s_export.add_argument("--output", "-o", help="write to this file instead of stdout")
    s_stuck = s_sub.add_parser(
        "stuck", help="sessions whose oldest waiting message is older than a threshold, and why",
        description="Exit 0 if none is stuck; 1 if some are (with --recover: 1 only if some still need an "
                    "operator).")
    s_stuck.add_argument("--older-than", type=duration, default=60.0, metavar="S",
                         help="threshold: seconds, or 90s, 5m, 2h (default 60)")
    s_stuck.add_argument("--recover", action="store_true",
                         help="release expired leases and ask the sweeper to resend; advise on the rest")
    s_stuck.add_argument("--json", action="store_true")
    s_waiting = s_sub.add_parser("waiting", help="sessions waiting for a person, oldest first (the handoff queue)")
    s_waiting.add_argument("--operator", metavar="NAME", help="instead: the sessions this operator has")
    s_waiting.add_argument("--json", action="store_true")
    s_take = s_sub.add_parser("takeover", help="an operator takes a session over: the Agent stops answering it",
                              description="Exit 0 if the operator has it now, 1 if another operator has it.")
    s_take.add_argument("key")
    s_take.add_argument("--operator", required=True, metavar="NAME")
    s_take.add_argument("--json", action="store_true")
    s_reply = s_sub.add_parser("reply", help="an operator's reply, sent in the session's order (needs the broker)")
    s_reply.add_argument("key")
    s_reply.add_argument("text")
    s_reply.add_argument("--operator", required=True, metavar="NAME")
    s_reply.add_argument("--json", action="store_true")
    s_back = s_sub.add_parser("handback", help="return a session to the Agent")
    s_back.add_argument("key")
    s_back.add_argument("--operator", metavar="NAME", help="only if this operator has it")
    s_back.add_argument("--json", action="store_true")
    for action in s_sub.choices.values():
        action.set_defaults(fn=cmd_sessions)

    parts = sub.add_parser(
        "partitions", help="per partition queue: depth, oldest waiting message, consuming worker",
        description="Exit 0 if every partition has exactly one consumer, 1 if not (or the workers did not "
                    "answer), 2 if the broker is not Redis.")
    parts.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for the workers to answer")
    parts.add_argument("--json", action="store_true")
    parts.set_defaults(fn=cmd_partitions)

    check = sub.add_parser(
        "check", help="validate the config and reach the database, broker and Redis (one line per check)",
        description="Exit 0 if every check passes, 1 if one fails, 2 if the configuration is invalid.")
    check.add_argument("--platforms", action="store_true",
                       help="also call each channel's platform API with its configured credentials")
    check.add_argument("--timeout", type=float, default=5.0, help="seconds per check")
    check.add_argument("--json", action="store_true")
    check.set_defaults(fn=cmd_check)

    alive = sub.add_parser("worker-alive", help="liveness probe: exit 0 if this host's worker beat recently")
    alive.add_argument("--max-age", type=float, default=60.0, help="seconds (default 60)")
    alive.add_argument("--file", help="the heartbeat file (default WORKER_HEARTBEAT_FILE or the newest one)")
    alive.set_defaults(fn=cmd_worker_alive)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chatsessions", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run everything in one process (SQLite + in-process broker)")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--concurrency", type=int, default=8, help="worker threads")
    run.set_defaults(fn=cmd_run)

    demo = sub.add_parser("demo", help="play a scripted multi-platform conversation and print the transcripts")
    demo.add_argument("--keep", action="store_true", help="keep the demo database file afterwards")
    demo.set_defaults(fn=cmd_demo)

    ingress = sub.add_parser("ingress", help="serve the webhook ingress with gunicorn")
    ingress.add_argument("--bind", default=os.environ.get("BIND", "0.0.0.0:8000"))
    ingress.add_argument("--workers", type=int, default=2)
    ingress.add_argument("--pool", choices=("gevent", "threads"), default="gevent",
                         help="gunicorn's workers: gevent (default; a greenlet per request) or threads (gthread)")
    ingress.add_argument("--connections", type=int, default=1000,
                         help="requests served at once per process with --pool gevent (default 1000)")
    ingress.add_argument("--threads", type=int, default=8, help="threads per process with --pool threads (default 8)")
    ingress.add_argument("--access-log", action="store_true")
    ingress.set_defaults(fn=cmd_ingress)

    admin = sub.add_parser("admin", help="serve the session browser on its own address (see ADMIN_BIND)")
    admin.add_argument("--bind", help=f"host:port (default ADMIN_BIND, else {ADMIN_BIND_DEFAULT})")
    admin.add_argument("--threads", type=int, default=4, help="threads of its one process (default 4)")
    admin.set_defaults(fn=cmd_admin)

    worker = sub.add_parser("worker", help="consume a set of partitions (e.g. --partitions 0-7)")
    worker.add_argument("--partitions", required=True, help='"0-7", "0,2,5-6" or "all"')
    worker.add_argument("--pool", choices=sorted(DEFAULT_CONCURRENCY),
                        help="the execution model: threads (fast Agents), gevent (Agents that wait on an LLM: "
                             "a thousand turns in flight); default WORKER_POOL or threads")
    worker.add_argument("--concurrency", type=int,
                        help="turns at once (default WORKER_CONCURRENCY, else 16 threads or 1000 greenlets)")
    worker.add_argument("--name", help="Celery node name (default pool-<partitions>@host)")
    worker.add_argument("--no-maintenance", action="store_true", help="do not also consume the maintenance queue")
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--events", action="store_true",
                        help="send task events from the start (Flower turns them on by itself while it runs)")
    worker.set_defaults(fn=cmd_worker)

    beat = sub.add_parser("beat", help="run the periodic scheduler (exactly one per deployment)")
    beat.add_argument("--loglevel", default="INFO")
    beat.add_argument("--schedule", default="/tmp/chatsessions-beat-schedule")
    beat.set_defaults(fn=cmd_beat)

    gateway = sub.add_parser("gateway", help="run the Discord gateway connection for one channel")
    gateway.add_argument("channel_id")
    gateway.set_defaults(fn=cmd_gateway)

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="apply migrations").set_defaults(fn=cmd_db)

    add_ops_commands(sub)
    dl = sub.add_parser("deadletters", help="messages whose turn failed for good: list, show, replay, drop")
    dl_sub = dl.add_subparsers(dest="dl_command", required=True)
    dl_list = dl_sub.add_parser("list", help="list dead letters")
    dl_list.add_argument("--limit", type=int, default=100)
    dl_list.add_argument("--json", action="store_true")
    for name, text in (("show", "one dead letter with its message and error"),
                       ("replay", "enqueue the message again (as a new turn) and remove the dead letter"),
                       ("drop", "delete the dead letter")):
        one = dl_sub.add_parser(name, help=text)
        one.add_argument("id", type=int)
    dl.set_defaults(fn=cmd_deadletters)
    for action in dl_sub.choices.values():
        action.set_defaults(fn=cmd_deadletters)

    from cli import bench as bench_cmd  # light at import: heavy imports wait for a run
    from cli import config_init, connect, operators
    from cli import loadgen as loadgen_cmd

    setup = sub.add_parser("setup", help="connect a channel to its platform (webhook, commands), print the steps left",
                           description=connect.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    connect.add_arguments(setup)
    setup.set_defaults(fn=connect.main)
    operators.add_arguments(sub)  # `operators list|hash-password`, `audit`
    config = sub.add_parser("config", help="the channels file")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    init = config_sub.add_parser("init", help="write a commented channels file for the platforms asked for",
                                 description=config_init.__doc__)
    config_init.add_arguments(init)
    init.set_defaults(fn=config_init.main)

    lg = sub.add_parser("loadgen", help="play the platforms against an ingress: throughput, latency, correctness")
    loadgen_cmd.add_arguments(lg)
    lg.set_defaults(fn=loadgen_cmd.main)
    bench = sub.add_parser("bench", help="start the real processes and run the benchmark scenarios (make bench)")
    bench_cmd.add_arguments(bench)
    bench.set_defaults(fn=bench_cmd.main)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in LOCAL_COMMANDS:
        from cli.embedded import use_embedded_defaults

        if use_embedded_defaults():
            print("chatsessions: shipped config with demo secrets for the unset variables", file=sys.stderr)
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"chatsessions: configuration error: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"chatsessions: database error: {reason} (is the schema current? `chatsessions db upgrade`)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
