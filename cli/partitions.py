"""`chatsessions partitions`: per partition queue of the Redis broker, its depth, its oldest waiting message and the
workers consuming it; exit 1 when a partition has no consumer or several, or the workers did not answer."""

from __future__ import annotations

import argparse

from cli import broker_view, stuck
from cli.common import FAILED, OK, USAGE, broker_view_of, consumers_of, err, is_redis, print_json, redact, table
from shared.config import get_settings


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (the --partitions syntax)."""
    out: list[str] = []
    for n in sorted(numbers):
        if out and n == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ",".join(out)


def main(args: argparse.Namespace) -> int:
    from redis import RedisError

    from shared.queueing import MAINTENANCE_QUEUE

    settings = get_settings()
    if not is_redis(settings.broker_url):
        err(f"`partitions` reads the Redis broker; BROKER_URL is {redact(settings.broker_url)}")
        return USAGE
    view, _ = broker_view_of(settings)
    try:
        view.redis.ping()
    except RedisError as exc:
        err(f"broker unreachable ({redact(settings.broker_url)}): {exc.__class__.__name__}: {exc}")
        return FAILED
    consumers = consumers_of(settings, args.timeout)
    try:
        statuses = broker_view.partition_status(view, consumers, extra_queues=[MAINTENANCE_QUEUE])
    except RedisError as exc:
        err(f"broker unreachable ({redact(settings.broker_url)}): {exc.__class__.__name__}: {exc}")
        return FAILED
    warnings = [s for s in statuses if s.warnings]
    if args.json:
        print_json({"partitions": settings.partitions, "workers_answered": consumers is not None,
                    "queues": [s.to_dict() for s in statuses]})
    else:
        rows = [[s.partition if s.partition is not None else "-", s.queue, s.depth, s.in_flight,
                 stuck.format_duration(s.oldest_age_s) if s.oldest_age_s is not None else "-",
                 "?" if s.consumers is None else (", ".join(s.consumers) or "-"), "; ".join(s.warnings)]
                for s in statuses]
        print(table(["PART", "QUEUE", "DEPTH", "IN FLIGHT", "OLDEST", "CONSUMERS", "WARNING"], rows,
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
