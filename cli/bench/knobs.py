"""The bench's knobs: every BENCH_* environment variable with its default, its --quick default and its meaning
(`chatsessions bench --help` prints this table), read through `Knobs`; and `log`, the progress line every part of
a run writes to stderr (stdout carries only the table)."""

from __future__ import annotations

import os
import sys
import time

# name: (default, --quick default, meaning)
KNOBS: dict[str, tuple[str, str, str]] = {
    "BENCH_TURN_TURNS": ("1000", "300", "turns of the in-process turn profile"),
    "BENCH_TURN_SESSIONS": ("100", "30", "sessions they are spread over (round robin, so each has history)"),
    "BENCH_PARTITIONS": ("16", "16", "partition queues"),
    "BENCH_POOLS": ("2", "2", "worker pools; the partitions are split evenly between them"),
    "BENCH_CONCURRENCY": ("16", "16", "threads per worker pool (WORKER_CONCURRENCY)"),
    "BENCH_PREFETCH": ("", "", "worker --prefetch-multiplier (empty: the app's setting, 1)"),
    "BENCH_INGRESS_WORKERS": ("2", "2", "gunicorn worker processes"),
    "BENCH_INGRESS_THREADS": ("8", "8", "gunicorn threads per worker"),
    "BENCH_SWEEP_SECONDS": ("60", "60", "beat's dormant sweep / outbox sweep period"),
    "BENCH_CEILING_TASKS": ("20000", "5000", "no-op tasks drained for the ceiling"),
    "BENCH_CEILING_REPEAT": ("2", "1", "ceiling drains (the best is kept: noise only slows a drain)"),
    "BENCH_INGRESS_CONCURRENCY": ("16", "16", "closed-loop HTTP clients for the ingress max req/s"),
    "BENCH_INGRESS_MAX_REQUESTS": ("10000", "3000", "requests for the ingress max req/s"),
    "BENCH_INGRESS_RATE": ("1000", "1000", "open-loop req/s for the ingress p99"),
    "BENCH_INGRESS_SECONDS": ("10", "5", "duration of each open-loop ingress run (at BENCH_INGRESS_RATE and at half the max)"),
    "BENCH_STATUS_REQUESTS": ("15000", "5000", "WhatsApp status callbacks for their max req/s (closed loop)"),
    "BENCH_E2E_SESSIONS": ("1000", "300", "sessions of the e2e run"),
    "BENCH_E2E_MESSAGES": ("10", "5", "messages per session of the e2e run (at most)"),
    "BENCH_E2E_SECONDS": ("45", "20", "stop sending after this long (the e2e, memory-warm-up and scale loads)"),
    "BENCH_E2E_CONCURRENCY": ("64", "64", "closed loop: messages awaiting their reply"),
    "BENCH_PROFILE": ("0", "0", "1: py-spy record the pools and one ingress worker during e2e"),
    "BENCH_PROFILE_SECONDS": ("20", "10", "py-spy duration"),
    "BENCH_PROFILE_DIR": ("bench-profile", "bench-profile", "where py-spy's raw stacks go"),
    "BENCH_PROFILE_MODE": ("gil", "gil", "gil: samples of the thread holding the GIL (CPU); wall: every thread"),
    "BENCH_HOT_SESSIONS": ("1000", "300", "sessions chatting normally"),
    "BENCH_HOT_RATE": ("auto", "auto", "their open-loop messages/s in all; auto: half the e2e msgs/s of this run, else 50"),
    "BENCH_HOT_SECONDS": ("20", "10", "duration of each hot-session run"),
    "BENCH_HOT_FLOOD_RATE": ("50", "50", "messages/s into the one flooded session"),
    "BENCH_SLOW_CONCURRENCIES": ("1,8,32,64", "1,8,64", "worker concurrencies of the slow-Agent runs"),
    "BENCH_SLOW_POOLS": ("1", "1", "pools during the slow-Agent runs (ideal = pools x concurrency / delay)"),
    "BENCH_SLOW_SESSIONS": ("1000", "1000", "sessions of the slow-Agent runs"),
    "BENCH_SLOW_SECONDS": ("12", "6", "sending time of each slow-Agent run"),
    "BENCH_AGENT_DELAY_S": ("0.2", "0.2", "the slow Agent's time per turn"),
    "BENCH_SLOW_MODELS": ("threads,gevent", "threads,gevent", "execution models of the slow-Agent runs (--pool)"),
    "BENCH_WAIT_LATENCY_S": ("2", "2", "the stand-in LLM's time per completion (the waiting Agent)"),
    "BENCH_WAIT_IN_FLIGHT": ("1000", "1000", "sessions of each of the two full waves (each sends one message at once)"),
    "BENCH_WAIT_HALF": ("500", "500", "sessions of the third wave, whose replies' latency is checked"),
    "BENCH_WAIT_POOL": ("gevent", "gevent", "execution model of the waiting-Agent pool (--pool)"),
    "BENCH_WAIT_CONCURRENCY": ("1200", "1200", "its concurrency (greenlets or threads)"),
    "BENCH_WAIT_SENDERS": ("64", "64", "HTTP client threads posting a wave's webhooks"),
    "BENCH_MEMORY_SESSIONS": ("10000", "2000", "sessions of the memory run"),
    "BENCH_MEMORY_MESSAGES": ("9000", "3000", "messages of the memory run, in all (issue 4's figure: 100000)"),
    "BENCH_MEMORY_WARMUP": ("1500", "500", "messages before the start RSS is taken"),
    "BENCH_SCALE_LEVELS": ("10000,1000000", "10000,100000", "sessions stored before each scale run"),
    "BENCH_SCALE_SESSIONS": ("500", "200", "new sessions of each scale run"),
    "BENCH_SCALE_MESSAGES": ("10", "5", "messages per session of each scale run (at most)"),
    "BENCH_SCALE_SECONDS": ("25", "15", "sending time of each scale run"),
    "BENCH_SCALE_REPEAT": ("2", "1", "scale runs per level (the best is kept: noise only slows a run)"),
    "BENCH_PG_ADMIN": ("postgresql://postgres@127.0.0.1:5432/postgres", "postgresql://postgres@127.0.0.1:5432/postgres",
                       "PostgreSQL admin URL; the bench creates and drops its own database"),
    "BENCH_REDIS_URL": ("", "", "a Redis database to use (FLUSHed); empty: start a private redis-server"),
    "BENCH_KEEP": ("0", "0", "1: keep the database and the process logs"),
    "BENCH_QUIET_WAIT": ("0", "0", "before each scenario wait up to this many seconds for the machine to be idle"),
    "BENCH_QUIET_CORES": ("0.3", "0.3", "idle = at most this many cores busy (the idle stack included)"),
}


class Knobs:
    def __init__(self, quick: bool):
        self.quick = quick

    def str(self, name: str) -> str:
        default, quick, _ = KNOBS[name]
        value = os.environ.get(name)
        return value if value not in (None, "") else (quick if self.quick else default)

    def int(self, name: str) -> int:
        return int(float(self.str(name)))

    def float(self, name: str) -> float:
        return float(self.str(name))

    def ints(self, name: str) -> list[int]:
        return [int(float(x)) for x in self.str(name).split(",") if x.strip()]

    def flag(self, name: str) -> bool:
        return self.str(name) in ("1", "true", "yes")

    def as_dict(self) -> dict[str, str]:
        return {name: self.str(name) for name in KNOBS}


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)
