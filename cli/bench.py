"""`chatsessions bench` (`make bench`): the real processes on this machine, the scenarios of issue 4, a table and JSON.

Starts a private stack (cli/stack.py): a fresh PostgreSQL database, a private redis-server, `chatsessions ingress`
(gunicorn), BENCH_POOLS worker pools (the command `chatsessions worker` execs) and beat; a StandInPlatforms receives
the replies, a StandInLLM (cli/standins/llm.py) answers the waiting Agent's completions; `chatsessions loadgen`'s engine (cli/loadgen.py) plays WhatsApp, Telegram and Discord at it. Scenarios,
in run order (pick with SCENARIOS=e2e,ingress or --scenarios):

  turn         one worker's turn in this process (no stack): CPU ms, transactions and statements per turn
  ceiling      bare Celery no-op tasks (cli/bench_ceiling.py) through the same broker, queues and worker flags
  ingress      webhooks accepted and enqueued, workers stopped: max req/s (closed loop), p99 at BENCH_INGRESS_RATE
  status_callbacks  WhatsApp status webhooks (sent/delivered/read), workers stopped: max req/s, CPU per request,
               and that nothing was enqueued or logged at INFO for them
  e2e          webhook -> queue -> turn (PostgreSQL, demo Agent + echo) -> reply at the stand-in; ratio to ceiling
  hot_session  1,000 sessions at a steady rate, alone and while one session is flooded: the others' p99
  slow_agent   a 200 ms Agent (cli/bench_agents.py:SlowEcho), 1,000 sessions, worker concurrency 1/8/32/64, on one
               pool of each execution model (threads, then gevent: `slow_agent_gevent`)
  waiting_agent  the real OpenAI-compatible Agent against a stand-in LLM that takes 2 s, one gevent pool: waves of
               1,000 sessions sending at once (twice), then 500: turns/s, replies within 2 s + 1 s, RSS, connections
  memory       worker RSS after warm-up and after BENCH_MEMORY_MESSAGES messages over BENCH_MEMORY_SESSIONS sessions
  scale        e2e with 10k and 1M sessions stored (seeded with COPY, 10 messages each) + EXPLAIN of a turn's SQL

Sizes and knobs are environment variables (BENCH_*; `chatsessions bench --help` lists them with defaults);
--quick shrinks every size for a run of a few minutes. Results: a table on stdout, JSON at BENCH_OUT.
Each scenario also records where the machine's CPU went (stack, PostgreSQL, load generator, other processes),
because figures taken while something else loads the machine are not comparable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from collections.abc import Callable
from typing import Any

SCENARIOS = ("turn", "ceiling", "ingress", "status_callbacks", "e2e", "hot_session", "slow_agent", "waiting_agent",
             "memory", "scale")
STACKLESS = ("turn",)  # scenarios that need only a database: they run before the stack starts

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

LOADGEN = "loadgen+standin (bench process)"  # the bench process's share in `cpu`: load generator and stand-in
RATE_LIMITS = "rate_limits = { account_per_s = 1000000, account_burst = 1000000, chat_per_s = 100000, chat_burst = 100000 }"
TARGETS = {
    "e2e_ratio": 0.28, "e2e_msgs_per_s": 250.0, "slow_efficiency": 0.8, "hot_ratio": 2.0, "scale_ratio": 1.1,
    # waiting_agent (issue 12): efficiency of the ideal turns/s, share of replies within the Agent's latency + 1 s
    # at half the waves' size in flight, the pool's RSS (MB) and database connections at the full size in flight
    "waiting_efficiency": 0.8, "waiting_within": 0.95, "waiting_rss_mb": 400.0, "waiting_db_connections": 40,
    "ingress_p99_ms": 10.0, "ingress_rate": 1000.0, "ingress_max_req_per_s": 1400.0, "ingress_cpu_ms": 1.3,
    "status_max_req_per_s": 3000.0, "memory_growth": 0.1,
    # e2e CPU ms per message by role (cpu_ms_per_message): at most
    "cpu_ms_pools": 3.5, "cpu_ms_postgres": 1.5, "cpu_ms_all": 6.5,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "environment knobs (default / --quick default):\n" + "\n".join(
        f"  {name:27} {d or '-':>10} / {q or '-':<10} {meaning}" for name, (d, q, meaning) in KNOBS.items())
    parser.add_argument("--scenarios", default=os.environ.get("SCENARIOS") or "all",
                        help=f"comma-separated, from {','.join(SCENARIOS)} (default all; env SCENARIOS)")
    parser.add_argument("--out", default=os.environ.get("BENCH_OUT") or "bench-results.json",
                        help="the JSON results (env BENCH_OUT; default bench-results.json)")
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1",
                        help="small sizes: a few minutes (env BENCH_QUICK=1)")


def main(args: argparse.Namespace) -> int:
    from shared.errors import ConfigError

    names = SCENARIOS if args.scenarios in ("all", "") else tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ConfigError(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    ordered = [n for n in SCENARIOS if n in names]
    bench = Bench(Knobs(args.quick), Path(args.out))
    return bench.run(ordered)


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


# --------------------------------------------------------------------------------------------------------------------
# CPU accounting: where the machine's cores went during a scenario


class CpuMeter:
    def __init__(self, bench: Bench):
        self.bench = bench

    def _pg_pids(self) -> list[int]:
        import psycopg

        try:
            with psycopg.connect(self.bench.stack.pg_admin, autocommit=True, connect_timeout=3) as conn:
                return [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                                   (self.bench.stack.db_name,)).fetchall()]
        except psycopg.Error:
            return []

    def snapshot(self) -> dict[str, Any]:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(x) for x in fields]
        idle = values[3] + values[4]
        tick = os.sysconf("SC_CLK_TCK")
        stack = self.bench.stack
        procs = {p.name: p.cpu_seconds() for p in stack.procs}
        if stack._redis_proc is not None:
            procs["redis"] = stack._redis_proc.cpu_seconds()
        pg = 0.0
        for pid in self._pg_pids():
            try:
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                pg += (int(f[11]) + int(f[12])) / tick
            except (OSError, IndexError, ValueError):
                pass
        t = os.times()
        return {"at": time.monotonic(), "total": sum(values) / tick, "idle": idle / tick, "procs": procs,
                "pg": pg, "self": t.user + t.system}

    def delta(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        wall = max(1e-6, b["at"] - a["at"])
        busy = ((b["total"] - a["total"]) - (b["idle"] - a["idle"])) / wall
        procs = {k: max(0.0, (b["procs"][k] - a["procs"].get(k, 0.0))) / wall for k in b["procs"]}
        pg = max(0.0, b["pg"] - a["pg"]) / wall  # backends that lived through the scenario
        loadgen = (b["self"] - a["self"]) / wall
        ours = sum(procs.values()) + pg + loadgen
        return {"wall_s": round(wall, 1), "machine_busy_cores": round(busy, 2),
                "cores": {k: round(v, 2) for k, v in sorted(procs.items())} | {
                    "postgres": round(pg, 2), LOADGEN: round(loadgen, 2)},
                "other_processes_cores": round(max(0.0, busy - ours), 2)}


class Peaks:
    """`with Peaks({"rss_mb": proc.rss_mb, ...}, interval) as peaks:` reads each callable on entry, every `interval`
    seconds in a thread, and on exit; `peaks.peak[name]` is the highest reading (a reading that raises or returns
    None is skipped; a name never read is missing)."""

    def __init__(self, readings: dict[str, Callable[[], float | None]], interval: float = 0.25):
        self.readings = readings
        self.interval = interval
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-peaks", daemon=True)

    def sample(self) -> None:
        for name, read in self.readings.items():
            try:
                value = read()
            except Exception:  # noqa: BLE001 - a process gone or a connection lost: that reading is missing
                value = None
            if value is not None:
                self.peak[name] = max(self.peak.get(name, value), value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Peaks:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# --------------------------------------------------------------------------------------------------------------------
# The bench


class Bench:
    def __init__(self, knobs: Knobs, out: Path):
        self.k = knobs
        self.out = out
        self.stack: Any = None
        self.gen: Any = None
        self.standin: Any = None
        self.llm: Any = None  # the StandInLLM the waiting Agent's channels call
        self.results: dict[str, Any] = {"machine": machine_info(), "config": knobs.as_dict() | {"quick": knobs.quick}}
        for name in ("turn", "ceiling", "e2e", "slow_agent", "slow_agent_gevent", "waiting_agent", "hot_session",
                     "scale", "ingress", "status_callbacks", "memory"):
            self.results[name] = None
        self.cpu = CpuMeter(self)
        self.workdir = Path(tempfile.mkdtemp(prefix="chatsessions-bench-"))

    # -- the stack ------------------------------------------------------------------------------------------------

    def config_text(self) -> str:
        """The bench's channels, one per platform for each Agent: DemoEcho (b..), SlowEcho (s..) and the built-in
        OpenAI-compatible Agent against the stand-in LLM, which echoes (w..: the waiting Agent)."""
        out = [f"partitions = {self.k.int('BENCH_PARTITIONS')}", "lease_seconds = 120", ""]
        phone_ids = {"bwa": "100000000000101", "swa": "100000000000102", "wwa": "100000000000103"}
        llm = (f'agent_options = {{ base_url = "{self.llm.base()}", model = "bench-standin", '
               f'api_key_env = "BENCH_LLM_KEY" }}')
        for cid, platform_, agent in (("bwa", "whatsapp", "cli.bench_agents:DemoEcho"),
                                      ("btg", "telegram", "cli.bench_agents:DemoEcho"),
                                      ("bdc", "discord", "cli.bench_agents:DemoEcho"),
                                      ("swa", "whatsapp", "cli.bench_agents:SlowEcho"),
                                      ("stg", "telegram", "cli.bench_agents:SlowEcho"),
                                      ("sdc", "discord", "cli.bench_agents:SlowEcho"),
                                      ("wwa", "whatsapp", "openai"),
                                      ("wtg", "telegram", "openai"),
                                      ("wdc", "discord", "openai")):
            p = cid.upper()
            out += ["[[channels]]", f'id = "{cid}"', f'platform = "{platform_}"', f'agent = "{agent}"',
                    f'api_base = "{self.standin.base(cid)}"'] + ([llm] if agent == "openai" else [])
            if platform_ == "whatsapp":
                out += [(f'secrets = {{ app_secret = "BENCH_{p}_APP", verify_token = "BENCH_{p}_VERIFY", '
                        f'access_token = "BENCH_{p}_ACCESS" }}'),
                        (f'options = {{ phone_number_id = "{phone_ids[cid]}", api_version = "v21.0", '
                        f'{RATE_LIMITS} }}')]
            elif platform_ == "telegram":
                out += [f'secrets = {{ bot_token = "BENCH_{p}_BOT", secret_token = "BENCH_{p}_SECRET" }}',
                        f'options = {{ bot_username = "Bench{p}Bot", {RATE_LIMITS} }}']
            else:
                out += [f'secrets = {{ bot_token = "BENCH_{p}_BOT", public_key = "BENCH_DC_PUBLIC_KEY" }}',
                        f'options = {{ application_id = "1270000000000000001", {RATE_LIMITS} }}']
            out += ['session = { idle_minutes = 30, history_limit = 50, group_reply = "always" }', ""]  # every message answered
        return "\n".join(out)

    def secrets(self) -> dict[str, str]:
        env = {}
        for p in ("BWA", "SWA", "WWA"):
            env.update({f"BENCH_{p}_APP": f"{p}-app-secret", f"BENCH_{p}_VERIFY": "verify", f"BENCH_{p}_ACCESS": "token"})
        for p in ("BTG", "STG", "WTG"):
            env.update({f"BENCH_{p}_BOT": f"{random.randrange(10**8, 10**9)}:{p}-bot", f"BENCH_{p}_SECRET": f"{p}-secret"})
        for p in ("BDC", "SDC", "WDC"):
            env[f"BENCH_{p}_BOT"] = f"{p}-bot-token"
        env["BENCH_DC_PUBLIC_KEY"] = self.discord_key.public_key().public_bytes_raw().hex()
        env["BENCH_AGENT_DELAY_S"] = self.k.str("BENCH_AGENT_DELAY_S")
        env["BENCH_LLM_KEY"] = f"sk-bench-{random.getrandbits(64):x}"  # sent as the Bearer token, checked by nothing
        env["SWEEP_SECONDS"] = self.k.str("BENCH_SWEEP_SECONDS")
        env["LOG_FORMAT"] = "json"
        return env

    def layout(self, pools: int) -> list[str]:
        parts = self.k.int("BENCH_PARTITIONS")
        pools = max(1, min(pools, parts))
        if pools == 1:
            return ["all"]
        bounds = [round(i * parts / pools) for i in range(pools + 1)]
        return [f"{bounds[i]}-{bounds[i + 1] - 1}" for i in range(pools)]

    def start_pools(self, pools: int | None = None, concurrency: int | None = None, app: str | None = None,
                    pool: str | None = None) -> None:
        """`pools` pools of `concurrency` on the execution model `pool` (threads | gevent; default WORKER_POOL)."""
        pools = pools or self.k.int("BENCH_POOLS")
        concurrency = concurrency or self.k.int("BENCH_CONCURRENCY")
        extra = ("--prefetch-multiplier", self.k.str("BENCH_PREFETCH")) if self.k.str("BENCH_PREFETCH") else ()
        for i, spec in enumerate(self.layout(pools)):
            self.stack.start_pool(f"pool-{chr(97 + i)}", spec, concurrency, app=app, extra=extra, maintenance=i == 0,
                                  pool=pool)
        self.stack.wait_pools_ready()

    def stop_pools(self) -> None:
        killed = self.stack.stop(self.stack.pools())
        if killed:
            log(f"pools {killed} ignored SIGTERM and were killed")

    def setup(self) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from cli.loadgen import ECHOING_AGENTS, LoadGen, targets_from_settings
        from cli.stack import Stack
        from cli.standins.llm import StandInLLM, echo_responder
        from cli.standins.platforms import StandInPlatforms

        self.standin = StandInPlatforms().start()
        self.llm = StandInLLM(echo_responder, latency_s=self.k.float("BENCH_WAIT_LATENCY_S"), record=False).start()
        self.discord_key = Ed25519PrivateKey.generate()
        self.stack = Stack(self.workdir, env=self.secrets(), config_text=self.config_text(),
                           pg_admin=self.k.str("BENCH_PG_ADMIN"), redis_url=self.k.str("BENCH_REDIS_URL") or None,
                           partitions=self.k.int("BENCH_PARTITIONS"), keep=self.k.flag("BENCH_KEEP"))
        log(f"starting the stack in {self.workdir}")
        self.stack.setup()
        self.results["machine"]["postgres_commit_ms"] = commit_probe(self.stack.pg_url)
        self.stack.start_ingress(self.k.int("BENCH_INGRESS_WORKERS"), self.k.int("BENCH_INGRESS_THREADS"))
        self.start_pools()
        self.stack.start_beat()
        self.stack.wait_ready()
        with self.stack.applied_env():
            from shared.config import load_settings

            settings = load_settings()
        # the OpenAI-compatible Agent echoes here: the stand-in LLM answers with the user's message
        self.targets, _, warnings = targets_from_settings(settings, self.discord_key, echoing=(*ECHOING_AGENTS, "openai"))
        for w in warnings:
            log(w)
        self.gen = LoadGen(self.stack.url, self.targets, self.standin, reply_timeout=120, drain_timeout=60,
                           progress=True)
        log(f"stack up: {self.stack!r}")
        self.warm_up()

    def targets_for(self, prefix: str) -> tuple[str, ...]:
        return tuple(t.channel_id for t in self.targets if t.channel_id.startswith(prefix))

    def workload(self, name: str, sessions: int, messages: int, agent: str = "b", **kw: Any) -> Any:
        """A load on the channels of one Agent (config_text): "b" DemoEcho, "s" SlowEcho, "w" the waiting LLM Agent."""
        from cli.loadgen import Workload

        kw.setdefault("kinds", self.targets_for(agent))
        return Workload(name, sessions, messages, **kw)

    def run_load(self, *workloads: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        before = self.cpu.snapshot()
        reports = self.gen.run(*workloads)
        cpu = self.cpu.delta(before, self.cpu.snapshot())
        self.stack.assert_alive()
        return reports, cpu

    def warm_up(self, messages: int = 120) -> None:
        """Every process imports, connects and compiles its statements before anything is measured."""
        self.run_load(self.workload("warmup", max(12, messages // 2), 2, concurrency=16))

    def run(self, names: list[str]) -> int:
        started = time.monotonic()
        status = 0
        stack_tried = False  # the stack starts before the first scenario that needs it
        try:
            for name in names:
                if name not in STACKLESS and not stack_tried:
                    stack_tried = True
                    try:
                        self.setup()
                    except Exception as exc:  # noqa: BLE001 - reported in the results and the exit status
                        self.results["error"] = f"the stack did not start: {exc.__class__.__name__}: {exc}"
                        log(self.results["error"])
                        status = 1
                if name not in STACKLESS and self.results.get("error"):
                    continue
                busy = self.wait_quiet()
                log(f"== {name} == (machine busy {busy:.2f} cores before it)")
                self.results["machine"].setdefault("busy_cores_before", {})[name] = round(busy, 2)
                t0 = time.monotonic()
                try:
                    self.results[name] = getattr(self, f"scenario_{name}")()
                except Exception as exc:  # noqa: BLE001 - one broken scenario must not lose the others' figures
                    import traceback

                    traceback.print_exc()
                    self.results[name] = {"error": f"{exc.__class__.__name__}: {exc}"}
                    status = 1
                    if self.stack is not None:
                        log("process log tails:\n" + self.stack.tails(15))
                        self.recover()
                log(f"== {name} done in {time.monotonic() - t0:.0f}s ==")
                self.write()  # what is measured so far survives a later failure
        except KeyboardInterrupt:
            log("interrupted: writing what was measured")
            status = 130
        finally:
            self.results["machine"]["loadavg_end"] = list(os.getloadavg())
            self.results["machine"]["bench_seconds"] = round(time.monotonic() - started, 1)
            self.teardown()
        self.write()
        print(table(self.results))
        print(f"\nresults: {self.out}  ({self.results['machine']['bench_seconds']:.0f}s)")
        return status

    def write(self) -> None:
        self.results["targets"] = targets_met(self.results)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def wait_quiet(self) -> float:
        """Cores busy on the machine (everything: other users' processes too); waits for it to drop below
        BENCH_QUIET_CORES for up to BENCH_QUIET_WAIT seconds. Returns the last reading."""
        deadline = time.monotonic() + self.k.float("BENCH_QUIET_WAIT")
        while True:
            a = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            time.sleep(2.0)
            b = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            total = sum(int(y) - int(x) for x, y in zip(a, b))
            idle = sum(int(b[i]) - int(a[i]) for i in (3, 4))
            busy = (total - idle) / max(1, total) * (os.cpu_count() or 1)
            if busy <= self.k.float("BENCH_QUIET_CORES") or time.monotonic() > deadline:
                return busy
            log(f"machine busy ({busy:.2f} cores from other processes); waiting for it to quiet down")
            time.sleep(3.0)

    def recover(self) -> None:
        """After a failed scenario: the default pools again, whatever state the scenario left."""
        try:
            self.stop_pools()
            self.stack.purge_queues()
            self.start_pools()
        except Exception as exc:  # noqa: BLE001
            log(f"could not restore the pools: {exc}")

    def teardown(self) -> None:
        if self.gen is not None:
            self.gen.close()
        if self.stack is not None:
            if self.k.flag("BENCH_KEEP"):
                log(f"kept: database {self.stack.db_name}, logs {self.workdir}")
            self.stack.teardown()
        if self.standin is not None:
            self.standin.stop()
        if self.llm is not None:
            self.llm.stop()

    # -- scenarios ------------------------------------------------------------------------------------------------

    def scenario_turn(self) -> dict[str, Any]:
        """The turn alone, in this process, on a fresh database: what one turn costs a worker."""
        import uuid

        import psycopg

        admin = self.k.str("BENCH_PG_ADMIN")
        name = f"chatsessions_turn_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = f"{admin.rsplit('/', 1)[0]}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
        try:
            from shared.migrate import upgrade

            upgrade(url)
            result = profile_turns(url, self.k.int("BENCH_TURN_TURNS"), self.k.int("BENCH_TURN_SESSIONS"))
            log("turn profile:\n" + print_turn_profile(result))
            return result
        finally:
            from shared.db import engine_for

            engine_for(url).dispose()
            if not self.k.flag("BENCH_KEEP"):
                with psycopg.connect(admin, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def scenario_ceiling(self) -> dict[str, Any]:
        runs = [self.ceiling_once() for _ in range(max(1, self.k.int("BENCH_CEILING_REPEAT")))]
        best = max(runs, key=lambda r: r["celery_noop_msgs_per_s"])
        return best | {"runs": [r["celery_noop_msgs_per_s"] for r in runs]}

    def ceiling_once(self) -> dict[str, Any]:
        from shared.partitioning import queue_name

        n = self.k.int("BENCH_CEILING_TASKS")
        parts = self.k.int("BENCH_PARTITIONS")
        self.stop_pools()
        self.stack.purge_queues()
        with self.stack.applied_env():
            from cli.bench_ceiling import (
                NOOP,  # builds its app from the settings: the stack's environment
            )
            from shared.config import get_settings
            from shared.queueing import make_celery

            app = make_celery(get_settings())
        payload = _sample_message()
        t0 = time.monotonic()
        with app.producer_or_acquire() as producer:
            for i in range(n):
                payload["seq"] = i
                app.send_task(NOOP, args=[payload], queue=queue_name(i % parts), producer=producer)
        published = time.monotonic() - t0
        log(f"published {n} no-op tasks in {published:.1f}s; starting the no-op pools")
        before = self.cpu.snapshot()
        self.start_pools(app="cli.bench_ceiling")
        samples = []  # (t, remaining)
        deadline = time.monotonic() + max(120, n / 50)
        while time.monotonic() < deadline:
            remaining = self.stack.queue_depth()
            samples.append((time.monotonic(), remaining))
            if remaining == 0:
                break
            time.sleep(0.02)
        cpu = self.cpu.delta(before, self.cpu.snapshot())
        self.stop_pools()
        self.stack.purge_queues()
        self.start_pools()
        t_hi = next((t for t, r in samples if r <= 0.9 * n), None)
        t_lo = next((t for t, r in samples if r <= 0.1 * n), None)
        t_first = next((t for t, r in samples if r < n), None)
        t_end = samples[-1][0] if samples and samples[-1][1] == 0 else None
        if t_hi is None or t_lo is None or t_lo <= t_hi:
            raise RuntimeError(f"the no-op pools did not drain the queues: {samples[-1] if samples else None}")
        rate = 0.8 * n / (t_lo - t_hi)
        return {"celery_noop_msgs_per_s": round(rate, 1),
                "full_drain_msgs_per_s": round(n / (t_end - t_first), 1) if t_end and t_first else None,
                "tasks": n, "publish_msgs_per_s": round(n / published, 1), "cpu": cpu,
                "note": "queues prefilled, then drained by pools started with the workers' flags; rate over 90%->10%"}

    def scenario_ingress(self) -> dict[str, Any]:
        self.stop_pools()
        try:
            sessions = 1000
            max_requests = self.k.int("BENCH_INGRESS_MAX_REQUESTS")
            profiler = self.start_profile("ingress", pools=False) if self.k.flag("BENCH_PROFILE") else None
            closed, cpu_closed = self.run_load(self.workload(
                "ingress-max", sessions, math.ceil(max_requests / sessions), limit=max_requests,
                concurrency=self.k.int("BENCH_INGRESS_CONCURRENCY"), expect_replies=False))
            profile = self.finish_profile(profiler) if profiler else None
            rate = self.k.float("BENCH_INGRESS_RATE")
            total = int(rate * self.k.float("BENCH_INGRESS_SECONDS"))
            opened, cpu_open = self.run_load(self.workload(
                "ingress-rate", sessions, math.ceil(total / sessions), limit=total, rate=rate, expect_replies=False,
                senders=64))
            half_rate = round(closed[0]["msgs_per_s"] / 2)
            half_total = int(half_rate * self.k.float("BENCH_INGRESS_SECONDS"))
            (half,), _ = self.run_load(self.workload(
                "ingress-half", sessions, math.ceil(half_total / sessions), limit=half_total, rate=half_rate,
                expect_replies=False, senders=64))
        finally:
            self.stack.purge_queues()
            self.start_pools()
        c, o = closed[0], opened[0]
        return {
            "req_per_s": c["msgs_per_s"],
            "max_req_per_s": c["msgs_per_s"],
            "p99_ms": o["accept_latency_ms"]["p99"],
            "at_rate": {"offered_req_per_s": rate, "achieved_req_per_s": o["send_rate"],
                        "latency_ms": o["accept_latency_ms"], "rejected": o["rejected"], "errors": o["errors"],
                        "cpu": cpu_open},
            "at_half_max": {"offered_req_per_s": half_rate, "achieved_req_per_s": half["send_rate"],
                            "latency_ms": half["accept_latency_ms"], "rejected": half["rejected"]},
            "max": {"concurrency": c["concurrency"], "req_per_s": c["msgs_per_s"], "latency_ms": c["accept_latency_ms"],
                    "rejected": c["rejected"], "errors": c["errors"], "cpu": cpu_closed},
            **cpu_per_request(cpu_closed, c["accepted"]),
            "note": "latency = POST to 200 at the client (open loop: from the scheduled send time); workers stopped",
        } | ({"profile": profile} if profile else {})

    def scenario_status_callbacks(self) -> dict[str, Any]:
        """What a WhatsApp deployment's ingress gets three of per reply: status webhooks (sent, delivered, read),
        each to be verified, recognised and answered 200 with nothing enqueued and nothing logged at INFO.
        Workers stopped, as for `ingress`: whatever were enqueued would stay in the partition queues."""
        from cli.standins.payloads import WHATSAPP_STATUSES

        self.stop_pools()
        self.stack.purge_queues()
        ingress_log = self.stack.proc("ingress").log_path
        log_offset = ingress_log.stat().st_size
        client = self.stack.redis()
        try:
            commands_before = client.info("stats")["total_commands_processed"]
            n, sessions = self.k.int("BENCH_STATUS_REQUESTS"), 1000
            profiler = self.start_profile("status_callbacks", pools=False) if self.k.flag("BENCH_PROFILE") else None
            (report,), cpu = self.run_load(self.workload(
                "status-callbacks", sessions, math.ceil(n / sessions), limit=n, kinds=self.targets_for("bwa"),
                concurrency=self.k.int("BENCH_INGRESS_CONCURRENCY"), expect_replies=False, webhook="status"))
            commands = client.info("stats")["total_commands_processed"] - commands_before - 1  # not the INFO itself
            profile = self.finish_profile(profiler) if profiler else None
            queued = self.stack.queue_depth()
            with ingress_log.open("rb") as f:
                f.seek(log_offset)
                levels = log_levels(f.read().decode(errors="replace"))
        finally:
            client.close()
            self.stack.purge_queues()
            self.start_pools()
        return {
            "max_req_per_s": report["msgs_per_s"],
            **cpu_per_request(cpu, report["accepted"]),
            "requests": report["sent"], "accepted": report["accepted"], "rejected": report["rejected"],
            "errors": report["errors"], "concurrency": report["concurrency"],
            "latency_ms": report["accept_latency_ms"], "statuses": list(WHATSAPP_STATUSES),
            "queued_after": queued, "ingress_log_lines": sum(levels.values()), "ingress_log_levels": levels,
            "redis_commands": commands, "cpu": cpu,
            "note": ("closed loop of signed `statuses[]` webhooks, workers stopped; queued_after = messages in the "
                     "partition queues afterwards (purged before), ingress_log_lines = lines the ingress wrote "
                     "meanwhile (INFO and up: DEBUG is off), redis_commands = commands Redis processed meanwhile "
                     "(beat's included)"),
        } | ({"profile": profile} if profile else {})

    def scenario_e2e(self) -> dict[str, Any]:
        wl = self.workload("e2e", self.k.int("BENCH_E2E_SESSIONS"), self.k.int("BENCH_E2E_MESSAGES"),
                           concurrency=self.k.int("BENCH_E2E_CONCURRENCY"), duration_s=self.k.float("BENCH_E2E_SECONDS"))
        profiler = self.start_profile("e2e") if self.k.flag("BENCH_PROFILE") else None
        (report,), cpu = self.run_load(wl)
        profile = self.finish_profile(profiler) if profiler else None
        ceiling = (self.results.get("ceiling") or {}).get("celery_noop_msgs_per_s")
        result = {
            "msgs_per_s": report["msgs_per_s"],
            "ratio_to_ceiling": round(report["msgs_per_s"] / ceiling, 3) if ceiling else None,
            "latency_ms": {k: report["latency_ms"][k] for k in ("p50", "p95", "p99")},
            "lost": report["lost"], "duplicated": report["duplicated"], "reordered": report["reordered"],
            "misrouted": report["misrouted"],
            "latency_max_ms": report["latency_ms"]["max"], "accept_latency_ms": report["accept_latency_ms"],
            "sessions": report["sessions"], "messages": report["accepted"], "concurrency": report["concurrency"],
            "rejected": report["rejected"], "by_kind": report["by_kind"], "cpu": cpu,
            "cpu_ms_per_msg": cpu_per_msg(cpu, report["replied"]),
        }
        result["cpu_ms_per_message"] = cpu_by_role(result["cpu_ms_per_msg"])
        if profile:
            result["profile"] = profile
        return result

    def scenario_hot_session(self) -> dict[str, Any]:
        sessions, seconds = self.k.int("BENCH_HOT_SESSIONS"), self.k.float("BENCH_HOT_SECONDS")
        if self.k.str("BENCH_HOT_RATE") == "auto":
            e2e = (self.results.get("e2e") or {}).get("msgs_per_s")
            rate = round(e2e / 2, 1) if e2e else 50.0
        else:
            rate = self.k.float("BENCH_HOT_RATE")
        per_session = max(1, math.ceil(rate * seconds / sessions))
        total = int(rate * seconds)
        (alone,), cpu_alone = self.run_load(self.workload("hot-alone", sessions, per_session, rate=rate, limit=total))
        flood_rate = self.k.float("BENCH_HOT_FLOOD_RATE")
        flood_n = int(flood_rate * seconds)
        others = self.workload("hot-others", sessions, per_session, rate=rate, limit=total)
        flood = self.workload("hot-flood", 1, flood_n, rate=flood_rate, kinds=("bwa",), senders=4)
        (with_flood, flooded), cpu_flood = self.run_load(others, flood)
        a, b = alone["latency_ms"]["p99"], with_flood["latency_ms"]["p99"]
        return {
            "others_p99_ms_alone": a, "others_p99_ms_with_flood": b, "ratio": round(b / a, 2) if a and b else None,
            "others_rate": rate, "flood_rate": flood_rate, "seconds": seconds,
            "others_alone": _brief(alone), "others_with_flood": _brief(with_flood), "flood": _brief(flooded),
            "cpu_alone": cpu_alone, "cpu_with_flood": cpu_flood,
        }

    def scenario_slow_agent(self) -> list[dict[str, Any]]:
        """The 200 ms Agent at each concurrency, on each execution model of BENCH_SLOW_MODELS: the threads runs are
        this scenario's result (the keys of before), the gevent runs go to `slow_agent_gevent`."""
        models = [m.strip() for m in self.k.str("BENCH_SLOW_MODELS").split(",") if m.strip()]
        runs = {}
        try:
            for model in models:
                runs[model] = self.slow_agent_runs(model)
        finally:
            self.stop_pools()
            self.start_pools()
        for model, model_runs in runs.items():
            if model != "threads":
                self.results[f"slow_agent_{model}"] = model_runs
        return runs.get("threads", [])

    def slow_agent_runs(self, model: str) -> list[dict[str, Any]]:
        delay = self.k.float("BENCH_AGENT_DELAY_S")
        pools = self.k.int("BENCH_SLOW_POOLS")
        sessions = self.k.int("BENCH_SLOW_SESSIONS")
        runs = []
        for c in self.k.ints("BENCH_SLOW_CONCURRENCIES"):
            self.stop_pools()
            self.start_pools(pools=pools, concurrency=c, pool=model)
            ideal = pools * c / delay
            (report,), cpu = self.run_load(self.workload(
                f"slow-{model}-c{c}", sessions, 10, agent="s", duration_s=self.k.float("BENCH_SLOW_SECONDS"),
                concurrency=2 * pools * c + 8))
            n_sessions = min(sessions, report["accepted"])  # round robin: the first ones got a message
            runs.append({"concurrency": c, "execution_model": model, "msgs_per_s": report["msgs_per_s"],
                         "efficiency": round(report["msgs_per_s"] / ideal, 3), "reordered": report["reordered"],
                         "ideal_msgs_per_s": round(ideal, 1), "pools": pools, "sessions": n_sessions,
                         "messages": report["accepted"], "lost": report["lost"],
                         "duplicated": report["duplicated"], "misrouted": report["misrouted"],
                         "latency_ms": report["latency_ms"], "cpu": cpu})
            log(f"slow agent {model} c={c}: {report['msgs_per_s']:.1f} msg/s of ideal {ideal:.0f} "
                f"({report['msgs_per_s'] / ideal:.0%})")
        return runs

    def scenario_waiting_agent(self) -> dict[str, Any]:
        """Issue 12: an Agent that waits. The real OpenAIChatAgent (its HTTP client and connection pool) on the w..
        channels, against the stand-in LLM answering each completion BENCH_WAIT_LATENCY_S after its request, on one
        pool of BENCH_WAIT_POOL. Three waves, each offered at once (open loop: as fast as the ingress accepts them)
        once the previous one is answered: BENCH_WAIT_IN_FLIGHT new sessions send a message, the same sessions send
        their second, then the first BENCH_WAIT_HALF of them their third. Meanwhile the pool's RSS, its database
        connections (pg_stat_activity rows with the pool's application_name) and the requests waiting at the
        stand-in LLM are sampled; BENCH_PROFILE=1 records the second wave with py-spy."""
        import psycopg

        from cli.loadgen import replied_within

        model, latency = self.k.str("BENCH_WAIT_POOL"), self.llm.latency_s
        in_flight, half = self.k.int("BENCH_WAIT_IN_FLIGHT"), self.k.int("BENCH_WAIT_HALF")
        concurrency = self.k.int("BENCH_WAIT_CONCURRENCY")
        self.stop_pools()
        conn = None
        waves: list[dict[str, Any]] = []
        workloads: list[Any] = []
        try:
            self.start_pools(pools=1, concurrency=concurrency, pool=model)
            [pool] = self.stack.pools()
            self.run_load(self.workload("waiting-warmup", 12, 1, agent="w", concurrency=12))
            conn = psycopg.connect(self.stack.pg_admin, autocommit=True, connect_timeout=5)

            def backends() -> int:  # the stack names each process's connections after it (PGAPPNAME)
                return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                                    (self.stack.db_name, pool.name)).fetchone()[0]
            baseline = backends()
            for name, size in (("first", in_flight), ("second", in_flight), ("half", half)):
                wl = self.workload(f"waiting-{name}", size, 1, agent="w", rate=math.inf,
                                   senders=self.k.int("BENCH_WAIT_SENDERS"), continues=workloads[-1] if workloads else None)
                profiler = self.start_profile("waiting_agent") if name == "second" and self.k.flag("BENCH_PROFILE") else None
                self.llm.reset_peak()
                with Peaks({"rss_mb": pool.rss_mb, "db_connections": backends}) as peaks:
                    (report,), cpu = self.run_load(wl)
                workloads.append(wl)
                waves.append(waiting_wave(name, report, cpu, peaks.peak, self.llm.reset_peak()))
                if profiler:
                    waves[-1]["profile"] = self.finish_profile(profiler)
                log(f"waiting agent, wave {name}: {size} sessions, {report['msgs_per_s']:.1f} turns/s, latency p50 "
                    f"{report['latency_ms']['p50']} ms, p99 {report['latency_ms']['p99']} ms, "
                    f"{waves[-1]['llm_concurrent_peak']} at the LLM at once")
        finally:
            if conn is not None:
                conn.close()
            self.stop_pools()
            self.start_pools()
        for wave, wl in zip(waves, workloads):  # every wave is over: a late duplicate of an earlier one counts
            wave.update({k: v for k, v in self.gen.report(wl).items() if k in CORRECTNESS})
        e2e = (self.results.get("e2e") or {}).get("msgs_per_s")
        return {"execution_model": model, "agent_latency_s": latency, "in_flight": in_flight, "concurrency": concurrency,
                **waiting_figures(waves[:2], waves[2], replied_within(workloads[2], latency + 1.0), latency, in_flight,
                                  e2e),
                "db_connections_before": baseline, "waves": waves}

    def scenario_memory(self) -> dict[str, Any]:
        self.stop_pools()
        self.start_pools()
        pools = self.stack.pools()
        boot = {p.name: round(p.rss_mb(), 1) for p in pools}
        warm = self.k.int("BENCH_MEMORY_WARMUP")
        self.run_load(self.workload("memory-warmup", max(1, warm // 5), 5, concurrency=self.k.int("BENCH_E2E_CONCURRENCY")))
        start = {p.name: round(p.rss_mb(), 1) for p in pools}
        sessions, total = self.k.int("BENCH_MEMORY_SESSIONS"), self.k.int("BENCH_MEMORY_MESSAGES")
        with Peaks({p.name: p.rss_mb for p in pools}, interval=2.0) as rss:
            (report,), cpu = self.run_load(self.workload("memory", sessions, math.ceil(total / sessions), limit=total,
                                                         concurrency=self.k.int("BENCH_E2E_CONCURRENCY")))
        peak = {n: round(max(start[n], rss.peak.get(n, 0.0)), 1) for n in start}
        time.sleep(1.0)
        end = {p.name: round(p.rss_mb(), 1) for p in pools}
        s, e = sum(start.values()), sum(end.values())
        return {"rss_mb_start": round(s, 1), "rss_mb_end": round(e, 1), "growth": round(e / s - 1, 4),
                "per_pool": {n: {"boot": boot[n], "start": start[n], "peak": peak[n], "end": end[n],
                                 "growth": round(end[n] / start[n] - 1, 4)} for n in start},
                "messages": report["accepted"], "sessions": sessions, "msgs_per_s": report["msgs_per_s"],
                "lost": report["lost"], "duplicated": report["duplicated"], "reordered": report["reordered"],
                "misrouted": report["misrouted"], "cpu": cpu,
                "note": f"start = after {warm} warm-up messages on freshly started pools (sum over pools)"}

    def scenario_scale(self) -> dict[str, Any]:
        levels = self.k.ints("BENCH_SCALE_LEVELS")
        seeder = Seeder(self.stack.pg_url, channels=(("bwa", "whatsapp"), ("btg", "telegram"), ("bdc", "discord")))
        seeder.reset()
        out: dict[str, Any] = {"levels": []}
        for level in levels:
            t0 = time.monotonic()
            added = seeder.seed_to(level)
            seeded_s = time.monotonic() - t0
            log(f"stored sessions: {seeder.count} (+{added} in {seeded_s:.0f}s); vacuum analyze + checkpoint")
            seeder.settle()
            runs = []
            for i in range(max(1, self.k.int("BENCH_SCALE_REPEAT"))):
                (report,), cpu = self.run_load(self.workload(
                    f"scale-{level}-{i}", self.k.int("BENCH_SCALE_SESSIONS"), self.k.int("BENCH_SCALE_MESSAGES"),
                    concurrency=self.k.int("BENCH_E2E_CONCURRENCY"), duration_s=self.k.float("BENCH_SCALE_SECONDS")))
                runs.append({"msgs_per_s": report["msgs_per_s"], "per_msg_ms": round(1000 / report["msgs_per_s"], 3),
                             "cpu_ms_per_msg": cpu_per_msg(cpu, report["replied"]),
                             "latency_ms": report["latency_ms"], "lost": report["lost"],
                             "reordered": report["reordered"], "duplicated": report["duplicated"],
                             "misrouted": report["misrouted"], "cpu": cpu})
            best = min(runs, key=lambda r: r["per_msg_ms"])
            out["levels"].append({"sessions_stored": seeder.count, "messages_stored": seeder.messages,
                                  "seed_seconds": round(seeded_s, 1), "per_msg_ms": best["per_msg_ms"],
                                  "cpu_ms_per_msg": min(r["cpu_ms_per_msg"]["total (ours)"] for r in runs),
                                  "postgres_cpu_ms_per_msg": min(r["cpu_ms_per_msg"]["postgres"] for r in runs),
                                  "runs": runs, "table_mb": seeder.sizes()})
        first, last = out["levels"][0], out["levels"][-1]
        out["per_msg_ms_at_10k"] = first["per_msg_ms"]
        out["per_msg_ms_at_1m"] = last["per_msg_ms"]
        out["ratio"] = round(last["per_msg_ms"] / first["per_msg_ms"], 3)
        # CPU per message (all our processes, PostgreSQL included): the cost, with less of the machine's noise.
        out["cpu_ms_per_msg_at_10k"] = first["cpu_ms_per_msg"]
        out["cpu_ms_per_msg_at_1m"] = last["cpu_ms_per_msg"]
        out["cpu_ratio"] = round(last["cpu_ms_per_msg"] / first["cpu_ms_per_msg"], 3)
        out["postgres_cpu_ratio"] = round(last["postgres_cpu_ms_per_msg"] / first["postgres_cpu_ms_per_msg"], 3)
        out["note"] = (f"per_msg_ms = 1000 / msgs_per_s of a saturated closed loop; levels {levels} "
                       f"(the _at_10k/_at_1m keys hold the first and last level)")
        out["explain"] = self.explain_turn(seeder)
        out["turn_sql_counts"] = self.turn_counts
        return out

    # -- EXPLAIN of the SQL one turn runs --------------------------------------------------------------------------

    def explain_turn(self, seeder: Seeder) -> list[dict[str, Any]]:
        """Run one real turn in this process (workers.runtime.runner, the workers' own code) on a stored session,
        capture every statement it sends, and EXPLAIN ANALYZE each one (rolled back)."""
        from sqlalchemy import event

        from shared.db import STATEMENT_LISTENERS, engine_for
        from shared.messages import InboundMessage

        captured: list[tuple[str, Any]] = []
        counts = {"transactions": 0, "commits": 0, "pool_checkouts": 0}

        def capture(_conn, _cursor, statement, parameters, _context, executemany):
            captured.append((statement, parameters[0] if executemany and parameters else parameters))

        def capture_direct(_conn: Any, statement: str, parameters: dict) -> None:  # shared.db.execute's statements
            captured.append((statement, parameters))

        def count(name: str):
            def inc(*_args: Any) -> None:
                counts[name] += 1
            return inc
        listeners = [("before_cursor_execute", capture), ("begin", count("transactions")),
                     ("commit", count("commits"))]

        with self.stack.applied_env():
            from shared.config import get_settings
            from shared.logs import configure_logging
            from workers import runtime

            # the turn's log lines would land on stdout, in the table
            configure_logging(dataclasses.replace(get_settings(), log_format="console", log_level="WARNING"))
            runtime.runner.cache_clear()
            runner = runtime.runner()
            engine = engine_for(self.stack.database_url)
            session = seeder.sample_session()
            msg = InboundMessage(
                channel_id=session["channel_id"], platform="whatsapp", session_key=session["key"],
                chat_id=session["chat_id"], chat_kind=session["chat_kind"], sender_id=session["chat_id"],
                sender_name="Explain", text="lg-000000-0-0 where is my order?",
                platform_message_id=f"wamid.explain.{random.getrandbits(40)}", sent_at=time.time(),
                seq=session["last_seq"] + 1, received_at=time.time())
            checkout = count("pool_checkouts")
            for name, fn in listeners:
                event.listen(engine, name, fn)
            event.listen(engine.pool, "checkout", checkout)
            STATEMENT_LISTENERS.append(capture_direct)
            try:
                outcome = runner.handle(msg)
            finally:
                for name, fn in listeners:
                    event.remove(engine, name, fn)
                event.remove(engine.pool, "checkout", checkout)
                STATEMENT_LISTENERS.remove(capture_direct)
                runtime.runner.cache_clear()
        plans = []
        seen = set()
        for statement, params in captured:
            key = " ".join(statement.split())
            if key in seen or key.upper() in ("SELECT 1", "BEGIN", "COMMIT", "ROLLBACK"):
                continue
            seen.add(key)
            plans.append(_explain(engine, statement, params))
        log(f"EXPLAIN: one turn ({outcome}) ran {len(captured)} statements, {len(plans)} distinct, {counts}")
        self.turn_counts = {"outcome": outcome, "statements": len(captured), "distinct_statements": len(plans),
                            **counts}
        return plans

    # -- profiling ------------------------------------------------------------------------------------------------

    def start_profile(self, label: str, pools: bool = True) -> dict[str, Any] | None:
        import shutil

        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if spy is None:
            log("BENCH_PROFILE=1 but py-spy is not installed (.venv/bin/pip install py-spy); no profile")
            return None
        outdir = Path(self.k.str("BENCH_PROFILE_DIR"))
        outdir.mkdir(parents=True, exist_ok=True)
        targets = {p.name: p.pid for p in self.stack.pools()} if pools else {}
        from cli.stack import _children

        for i, pid in enumerate(_children(self.stack.proc("ingress").pid)[: 1 if pools else None]):
            targets[f"ingress-worker-{i}"] = pid
        seconds = self.k.int("BENCH_PROFILE_SECONDS")
        procs = {}
        for name, pid in targets.items():
            path = outdir / f"{label}-{name}.txt"
            mode = ["--gil"] if self.k.str("BENCH_PROFILE_MODE") == "gil" else []
            procs[name] = (subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "100",
                                             "--nonblocking", *mode, "-f", "raw", "-o", str(path)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), path)
        return procs

    def finish_profile(self, procs: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for name, (popen, path) in procs.items():
            try:
                popen.wait(timeout=120)
            except subprocess.TimeoutExpired:
                popen.kill()
            out[name] = summarize_profile(path) if path.exists() else {"error": "py-spy wrote nothing (ptrace?)"}
        return out


# --------------------------------------------------------------------------------------------------------------------
# The turn in-process: where a worker's CPU goes, per turn


class _PartTimer:
    """Wall and CPU time by part of the turn, exclusive of nested parts (a fencing check inside a send is the
    store's time, not the channel's)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[float]] = {}  # name -> [calls, wall s, cpu s]
        self._open: list[list[float]] = []  # per open call: [nested wall, nested cpu]

    def wrap(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            w0, c0 = time.perf_counter(), time.process_time()
            self._open.append([0.0, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                nested_w, nested_c = self._open.pop()
                w, c = time.perf_counter() - w0, time.process_time() - c0
                part = self.parts.setdefault(name, [0, 0.0, 0.0])
                part[0] += 1
                part[1] += w - nested_w
                part[2] += c - nested_c
                if self._open:
                    self._open[-1][0] += w
                    self._open[-1][1] += c
        return timed


def profile_turns(database_url: str, turns: int = 1000, sessions: int = 100, warmup: int = 100) -> dict[str, Any]:
    """Run `turns` turns through `TurnRunner.handle` in this process, one thread, on `database_url` (migrated;
    PostgreSQL or SQLite), with the bench's DemoEcho Agent and a channel that records its replies instead of
    posting them (the fencing check before each send still runs). The messages go round robin over `sessions`
    sessions, so a session has history when its turn comes. Logging is JSON at INFO, written to /dev/null.

    Returns per turn: wall ms, CPU ms (time.process_time: this process only, so steadier than wall time on a
    busy machine), transactions, statements, pool checkouts (each with a `SELECT 1` if the engine pre-pings),
    and the time by part of the turn (each Store method, the channel's send, the Agent, the rest)."""
    import logging

    import structlog
    from sqlalchemy import event

    from cli.bench_agents import DemoEcho
    from shared.config import ChannelConfig, SessionOptions
    from shared.db import STATEMENT_LISTENERS, engine_for
    from shared.logs import configure_logging
    from shared.messages import DM, InboundMessage
    from workers.store import Store
    from workers.testing import RecordingChannel, settings_for
    from workers.runner import TurnRunner

    config = ChannelConfig(id="bwa", platform="whatsapp", agent="cli.bench_agents:DemoEcho", api_base="http://unused",
                           secrets={}, options={}, session=SessionOptions(idle_minutes=30, history_limit=50))
    store = Store(database_url)
    store.sync_channels([config])
    channel = RecordingChannel(config)
    runner = TurnRunner(settings_for(database_url, [config], lease_seconds=120), store, {"bwa": channel},
                        {"bwa": DemoEcho()})
    root = logging.getLogger()
    saved_handlers, saved_level, saved_structlog = root.handlers[:], root.level, structlog.get_config()
    configure_logging(dataclasses.replace(runner.settings, log_format="json", log_level="INFO"))
    devnull = open(os.devnull, "w")  # noqa: SIM115 - closed below
    for handler in root.handlers:
        handler.setStream(devnull)

    def message(prefix: str, n: int, seq: int) -> InboundMessage:
        chat = f"1555{prefix}{n:06d}"
        return InboundMessage(
            channel_id="bwa", platform="whatsapp", session_key=f"bwa:{DM}:{chat}", chat_id=chat, chat_kind=DM,
            sender_id=chat, sender_name="Ana Souza", text=f"lg-{n:06d}-{seq} where is my order 48213?",
            platform_message_id=f"wamid.{prefix}.{n}.{seq}", sent_at=time.time(), seq=seq, received_at=time.time())

    seqs: dict[tuple[str, int], int] = {}

    def next_message(prefix: str, i: int, n_sessions: int) -> InboundMessage:
        """The i-th message of a round robin over n_sessions sessions: the next seq of its session."""
        key = (prefix, i % n_sessions)
        seqs[key] = seqs.get(key, 0) + 1
        return message(prefix, key[1], seqs[key])

    def play(prefix: str, count: int, n_sessions: int, handle: Any = runner.handle) -> dict[str, int]:
        outcomes: dict[str, int] = {}
        for i in range(count):
            outcome = handle(next_message(prefix, i, n_sessions))
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        return outcomes

    engine = engine_for(database_url)
    counts = {"transactions": 0, "autocommit_statements": 0, "statements": 0, "pool_checkouts": 0}

    def count(name: str) -> Any:
        def inc(*_args: Any) -> None:
            counts[name] += 1
        return inc

    def begin(conn: Any) -> None:  # each one database transaction; an autocommit statement is its own
        counts["transactions"] += 1
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            counts["autocommit_statements"] += 1
    def count_direct(conn: Any, *_args: Any) -> None:  # the statements shared.db.execute runs straight on psycopg
        counts["statements"] += 1
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":  # its own transaction
            counts["transactions"] += 1
            counts["autocommit_statements"] += 1

    listeners = [(engine, "begin", begin), (engine, "before_cursor_execute", count("statements")),
                 (engine.pool, "checkout", count("pool_checkouts"))]
    try:
        play("9", warmup, max(1, warmup // 2))  # imports, connections, compiled-statement caches
        timer = _PartTimer()
        for attr, fn in vars(Store).items():
            if not attr.startswith("_") and callable(fn):
                setattr(store, attr, timer.wrap(f"store.{attr}", getattr(store, attr)))
        channel.send = timer.wrap("channel.send (recording)", channel.send)  # type: ignore[method-assign]
        runner.agents["bwa"].reply = timer.wrap("Agent (DemoEcho)", runner.agents["bwa"].reply)  # type: ignore[attr-defined]
        sent_before = len(channel.sent)
        w0, c0 = time.perf_counter(), time.process_time()
        outcomes = play("1", turns, sessions, timer.wrap("TurnRunner.handle", runner.handle))
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        replies = len(channel.sent) - sent_before
        timed_parts = dict(timer.parts)
        timer.parts = {}
        # As many turns again (the next message of each session), counted: SQLAlchemy's statement events slow
        # every statement down, so nothing listens to them while the time is taken.
        for target, name, fn in listeners:
            event.listen(target, name, fn)
        STATEMENT_LISTENERS.append(count_direct)
        play("1", turns, sessions)
    finally:
        for target, name, fn in listeners:
            if event.contains(target, name, fn):
                event.remove(target, name, fn)
        if count_direct in STATEMENT_LISTENERS:
            STATEMENT_LISTENERS.remove(count_direct)
        root.handlers[:], root.level = saved_handlers, saved_level
        structlog.configure(**saved_structlog)
        devnull.close()
    n = max(1, turns)
    pre_ping = bool(getattr(engine.pool, "_pre_ping", False))
    parts = {name: {"calls_per_turn": round(c / n, 2), "wall_ms": round(w / n * 1000, 3), "cpu_ms": round(u / n * 1000, 3)}
             for name, (c, w, u) in sorted(timed_parts.items(), key=lambda kv: -kv[1][2])}
    rest = parts.pop("TurnRunner.handle")
    parts["rest of TurnRunner (logging included)"] = {"calls_per_turn": 1.0, "wall_ms": rest["wall_ms"],
                                                      "cpu_ms": rest["cpu_ms"]}
    store_cpu = sum(v["cpu_ms"] for k, v in parts.items() if k.startswith("store."))
    return {
        "turns": turns, "sessions": sessions, "outcomes": outcomes, "replies_sent": replies,
        "dialect": engine.dialect.name,
        "wall_ms_per_turn": round(wall / n * 1000, 3), "cpu_ms_per_turn": round(cpu / n * 1000, 3),
        "store_cpu_share": round(store_cpu / max(1e-9, cpu / n * 1000), 3),
        "per_turn": {k: round(v / n, 2) for k, v in counts.items()} | {
            "pre_pings": round(counts["pool_checkouts"] / n, 2) if pre_ping else 0.0} | ({
            # psycopg sends BEGIN and COMMIT as round trips of their own; a pre-ping is one more
            "round_trips": round((counts["statements"] + 2 * (counts["transactions"] - counts["autocommit_statements"])
                                  + (counts["pool_checkouts"] if pre_ping else 0)) / n, 2)}
            if engine.dialect.name == "postgresql" else {}),
        "turns_per_s_per_core": round(1000 / max(1e-9, cpu / n * 1000), 1),
        "parts": parts,
        "note": ("one thread, in-process, recording channel (no HTTP); CPU = time.process_time of this process; "
                 "parts exclusive of nested parts (the fencing renew inside a send is the store's)"),
    }


def print_turn_profile(result: dict[str, Any]) -> str:
    lines = [f"{result['turns']} turns over {result['sessions']} sessions ({result['dialect']}): "
             f"{result['wall_ms_per_turn']:.2f} ms wall, {result['cpu_ms_per_turn']:.2f} ms CPU per turn; per turn "
             + ", ".join(f"{k} {v:g}" for k, v in result["per_turn"].items())]
    lines.append(f"  {'part of the turn':44} {'calls':>6} {'wall ms':>8} {'CPU ms':>8}")
    for name, p in result["parts"].items():
        lines.append(f"  {name:44} {p['calls_per_turn']:>6.2f} {p['wall_ms']:>8.3f} {p['cpu_ms']:>8.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Seeding (COPY) for the scale scenario


class Seeder:
    """Stores dormant sessions with 10 messages each (5 user + 5 replies, sent), fast, with COPY."""

    SESSION_COLS = ("id", "channel_id", "key", "chat_kind", "chat_id", "status", "generation", "message_count",
                    "last_seq", "lease_token", "lease_until", "created_at", "last_activity_at")
    MESSAGE_COLS = ("id", "session_id", "generation", "position", "role", "sender_id", "sender_name", "text",
                    "channel_id", "platform_message_id", "ingress_seq", "created_at", "in_reply_to",
                    "delivery_status", "delivery_error", "delivery_attempts", "delivered_at")
    EVENT_COLS = ("session_id", "generation", "event", "at")
    PER_SESSION = 10

    def __init__(self, pg_url: str, channels: tuple[tuple[str, str], ...]):
        self.pg_url = pg_url
        self.channels = channels
        self.count = 0
        self.messages = 0

    def _connect(self):
        import psycopg

        return psycopg.connect(self.pg_url, autocommit=True)

    def reset(self) -> None:
        """Empty the store (sessions and everything that references them) so levels are exact."""
        with self._connect() as conn:
            conn.execute("TRUNCATE sessions CASCADE")
            self._check_columns(conn)
        self.count = self.messages = 0

    def _check_columns(self, conn) -> None:
        for table, cols in (("sessions", self.SESSION_COLS), ("messages", self.MESSAGE_COLS),
                            ("session_events", self.EVENT_COLS)):
            rows = conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                                "AND is_nullable = 'NO' AND column_default IS NULL", (table,)).fetchall()
            missing = [r[0] for r in rows if r[0] not in cols]
            if missing:
                raise RuntimeError(f"the seeder does not fill {table}.{missing} (schema changed): update cli/bench.py")

    def seed_to(self, total: int, writers: int = 2) -> int:
        """Store sessions until there are `total`; returns how many were added. `writers` COPY streams at once."""
        from concurrent.futures import ThreadPoolExecutor

        add = max(0, total - self.count)
        if not add:
            return 0
        with self._connect() as conn:
            base_s = conn.execute("SELECT coalesce(max(id), 0) FROM sessions").fetchone()[0] + 1
            base_m = conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0] + 1
        start, chunk = self.count, 20_000
        progress = {"done": 0, "logged": 0}
        lock = threading.Lock()

        import psycopg

        def write(lo: int) -> None:
            n = min(chunk, add - lo)
            s_rows, m_rows, e_rows = self._rows(start + lo, n, base_s + lo, base_m + lo * self.PER_SESSION)
            with self._connect() as conn:
                conn.execute("SET synchronous_commit = off")
                # Consistent by construction: skip the per-row foreign-key triggers (needs a superuser).
                try:
                    conn.execute("SET session_replication_role = replica")
                except psycopg.errors.InsufficientPrivilege:
                    log("not a superuser: seeding with the foreign-key checks (slower)")
                with conn.transaction(), conn.cursor() as cur:
                    for table, cols, rows in (("sessions", self.SESSION_COLS, s_rows),
                                              ("messages", self.MESSAGE_COLS, m_rows),
                                              ("session_events", self.EVENT_COLS, e_rows)):
                        with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as copy:
                            copy.write(rows)
            with lock:
                progress["done"] += n
                if progress["done"] - progress["logged"] >= 200_000 or progress["done"] == add:
                    progress["logged"] = progress["done"]
                    log(f"seeded {start + progress['done']} sessions")

        with ThreadPoolExecutor(max(1, writers)) as pool:
            list(pool.map(write, range(0, add, chunk)))
        with self._connect() as conn:
            for table in ("sessions", "messages"):
                conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                             f"(SELECT coalesce(max(id), 1) FROM {table}))")
        self.count += add
        self.messages += add * self.PER_SESSION
        return add

    def _rows(self, index0: int, n: int, sid0: int, mid0: int) -> tuple[str, str, str]:
        old = datetime.now(UTC) - timedelta(days=2)
        at = old.isoformat()
        sessions, messages, events = [], [], []
        nch = len(self.channels)
        for j in range(n):
            i = index0 + j
            sid = sid0 + j
            cid, _ = self.channels[i % nch]
            kind = "group" if i % 4 == 3 else "dm"
            chat = f"seed{i}"
            sessions.append(f"{sid}\t{cid}\t{cid}:{kind}:{chat}\t{kind}\t{chat}\tdormant\t1\t{self.PER_SESSION}\t"
                            f"{self.PER_SESSION // 2}\t{self.PER_SESSION // 2}\t\\N\t{at}\t{at}\n")
            mid = mid0 + j * self.PER_SESSION
            for pos in range(0, self.PER_SESSION, 2):
                seq = pos // 2 + 1
                messages.append(f"{mid + pos}\t{sid}\t1\t{pos}\tuser\t{chat}\tSeed {i}\tmy order {40000 + i} seq {seq}"
                                f"\t{cid}\tseed.{i}.{seq}\t{seq}\t{at}\t\\N\t\\N\t\\N\t0\t\\N\n")
                messages.append(f"{mid + pos + 1}\t{sid}\t1\t{pos + 1}\tassistant\tagent\tAgent\tthanks, I noted "
                                f"order {40000 + i}\t{cid}\t\\N\t\\N\t{at}\t{mid + pos}\tsent\t\\N\t1\t{at}\n")
            events.append(f"{sid}\t1\tcreated\t{at}\n")
            events.append(f"{sid}\t1\tdormant\t{at}\n")
        return "".join(sessions), "".join(messages), "".join(events)

    def settle(self) -> None:
        with self._connect() as conn:
            conn.execute("VACUUM ANALYZE sessions")
            conn.execute("VACUUM ANALYZE messages")
            conn.execute("VACUUM ANALYZE session_events")
            conn.execute("CHECKPOINT")

    def sizes(self) -> dict[str, float]:
        with self._connect() as conn:
            return {t: round(conn.execute("SELECT pg_total_relation_size(%s)", (t,)).fetchone()[0] / 2**20, 1)
                    for t in ("sessions", "messages", "session_events")}

    def sample_session(self) -> dict[str, Any]:
        from psycopg.rows import dict_row

        with self._connect() as conn:
            conn.row_factory = dict_row
            return conn.execute("SELECT * FROM sessions WHERE key LIKE 'bwa:dm:seed%%' AND status = 'dormant' "
                                "ORDER BY id DESC LIMIT 1").fetchone()


def _explain(engine: Any, statement: str, params: Any) -> dict[str, Any]:
    text = " ".join(statement.split())
    result: dict[str, Any] = {"sql": text}
    for analyze in (True, False):
        conn = engine.connect()
        trans = conn.begin()
        try:
            prefix = "EXPLAIN (ANALYZE, BUFFERS) " if analyze else "EXPLAIN "
            rows = conn.exec_driver_sql(prefix + statement, params if params else None).fetchall()
            plan = [r[0] for r in rows]
            result["analyzed"] = analyze
            result["plan"] = plan
            result["seq_scans"] = sorted({line.split("Seq Scan on ")[1].split()[0] for line in plan
                                          if "Seq Scan on " in line})
            result["uses_index"] = any("Index" in line for line in plan)
            return result
        except Exception as exc:  # noqa: BLE001 - e.g. a unique violation re-running an INSERT: plain EXPLAIN
            result["error"] = f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}"
        finally:
            trans.rollback()
            conn.close()
    return result


# --------------------------------------------------------------------------------------------------------------------
# Profile summaries (py-spy raw/collapsed stacks)

IDLE_LEAVES = ("concurrent/futures/thread.py", "Condition.wait", "Event.wait", "_epoll.poll", "select (",
               "poll (", "sleep (", "Semaphore.acquire", "Queue.get", "accept (", "_poll (")
WAITS = {"psycopg/connection.py": "waiting on PostgreSQL", "redis/_parsers": "waiting on Redis",
         "redis/connection.py": "waiting on Redis", "socket.py": "socket I/O (HTTP)", "ssl.py": "socket I/O (HTTP)"}
CATEGORIES = (  # first match on any frame of the stack, from the leaf up
    ("Agent", ("bench_agents.py", "workers/agents.py")),
    ("structlog/logging", ("structlog/", "logging/__init__.py", "shared/logs.py")),
    ("outbound HTTP (requests)", ("requests/", "urllib3/", "http/client.py", "shared/outbound.py")),
    ("rate limiter", ("shared/ratelimit.py",)),
    ("SQLAlchemy + psycopg", ("sqlalchemy/", "psycopg/")),
    ("Celery/kombu/redis", ("celery/", "kombu/", "redis/", "billiard/", "vine/")),
    ("JSON", ("json/",)),
    ("flask/werkzeug/gunicorn", ("flask/", "werkzeug/", "gunicorn/")),
    ("ingress code", ("ingress/", "shared/channels/")),
    ("turn/store code", ("workers/", "shared/store.py", "shared/db.py")),
)


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    from collections import Counter

    total = idle = 0
    waits: Counter = Counter()
    cats: Counter = Counter()
    leaves: Counter = Counter()
    app_frames: Counter = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        leaf = frames[-1]
        total += n
        if any(marker in leaf for marker in IDLE_LEAVES):
            idle += n
            continue
        wait = next((label for marker, label in WAITS.items() if marker in leaf), None)
        if wait:
            waits[wait] += n
        leaves[leaf] += n
        for label, markers in CATEGORIES:
            if any(m in f for f in reversed(frames) for m in markers):
                cats[label] += n
                break
        else:
            cats["other"] += n
        for f in set(frames):
            if any(m in f for m in ("workers/", "shared/", "ingress/")):
                app_frames[f] += n
    busy = max(1, total - idle)

    def pct(n: int) -> float:
        return round(100 * n / busy, 1)
    return {
        "samples": total, "idle_samples": idle,
        "busy_by_category_pct": {k: pct(v) for k, v in cats.most_common()},
        "waiting_pct": {k: pct(v) for k, v in waits.most_common()},
        "top_leaf_frames_pct": [(f, pct(n)) for f, n in leaves.most_common(top)],
        "top_app_frames_inclusive_pct": [(f, pct(n)) for f, n in app_frames.most_common(top)],
        "note": "percent of non-idle samples; a thread blocked in a C call (psycopg/redis socket wait) counts as busy",
    }


# --------------------------------------------------------------------------------------------------------------------
# Output


def cpu_per_msg(cpu: dict[str, Any], messages: int) -> dict[str, float]:
    """CPU milliseconds per message, by process: steadier than msgs/s when other processes share the machine."""
    if not messages:
        return {}
    per = {k: round(v * cpu["wall_s"] / messages * 1000, 2) for k, v in cpu["cores"].items() if v}
    per["total (ours)"] = round(sum(per.values()), 2)
    return per


CORRECTNESS = ("lost", "duplicated", "reordered", "misrouted")


def waiting_wave(name: str, report: dict[str, Any], cpu: dict[str, Any], peaks: dict[str, float],
                 llm_peak: int) -> dict[str, Any]:
    """One wave of the waiting_agent scenario, from loadgen's report, the CPU meter and the sampled peaks."""
    return {"wave": name, "sessions": report["sessions"], "accepted": report["accepted"], "replied": report["replied"],
            "rejected": report["rejected"], "turns_per_s": report["msgs_per_s"], "duration_s": report["duration_s"],
            "all_accepted_after_ms": report["accept_latency_ms"]["max"], "latency_ms": report["latency_ms"],
            "llm_concurrent_peak": llm_peak, "rss_mb_peak": round(peaks["rss_mb"], 1) if "rss_mb" in peaks else None,
            "db_connections_peak": peaks.get("db_connections"), **{k: report[k] for k in CORRECTNESS},
            "cpu": cpu, "cpu_ms_per_msg": cpu_per_msg(cpu, report["replied"] or 0)}


def waiting_figures(full: list[dict[str, Any]], half: dict[str, Any], within: int, latency_s: float, in_flight: int,
                    e2e_msgs_per_s: float | None) -> dict[str, Any]:
    """The waiting_agent scenario's figures from its waves (waiting_wave): the `full` ones (in_flight sessions each)
    and the `half` one, of whose replies `within` came within latency_s + 1 s of their webhook's 200."""
    seconds = sum(w["duration_s"] for w in full)
    turns = sum(w["replied"] for w in full) / seconds if seconds else 0.0
    by_wait = in_flight / latency_s
    ideal = min(by_wait, e2e_msgs_per_s) if e2e_msgs_per_s else by_wait
    waves = [*full, half]
    rss = [w["rss_mb_peak"] for w in full if w["rss_mb_peak"] is not None]
    connections = [w["db_connections_peak"] for w in waves if w["db_connections_peak"] is not None]
    return {
        "turns_per_s": round(turns, 1), "ideal_turns_per_s": round(ideal, 1),
        "efficiency": round(turns / ideal, 3) if ideal else None,
        "within_latency_plus_1s": round(within / half["accepted"], 3) if half["accepted"] else None,
        "rss_mb_peak": max(rss) if rss else None, "db_connections_peak": max(connections) if connections else None,
        "llm_concurrent_peak": max((w["llm_concurrent_peak"] for w in full), default=None),
        **{k: sum(w[k] for w in waves) for k in CORRECTNESS},
        "note": (f"turns_per_s = replies of the {len(full)} waves of {in_flight} sessions / the sum of their durations, "
                 "a wave's duration running from its first webhook POST to its last reply at the stand-in platform; "
                 f"ideal = min(in_flight / agent_latency_s = {by_wait:g}, "
                 + (f"this run's e2e msgs/s = {e2e_msgs_per_s:g})" if e2e_msgs_per_s else
                    "this run's e2e msgs/s: not measured, the e2e scenario did not run)")
                 + f"; within_latency_plus_1s: replies of the {half['sessions']}-session wave that reached the "
                 f"stand-in platform within {latency_s:g} s + 1 s of their webhook's 200, of those accepted; "
                 f"rss_mb_peak: the pool process's RSS, highest sample (every 0.25 s) during the {in_flight}-session "
                 "waves, when at most llm_concurrent_peak turns were waiting on the stand-in LLM at once (the others "
                 "were queued in the pool or done); db_connections_peak: the pool's backends in pg_stat_activity, highest sample of every wave; "
                 "correctness counts summed over the waves"),
    }


def cpu_by_role(per: dict[str, float]) -> dict[str, float]:
    """cpu_per_msg's figures by role: the pools together, and `all` = every process of ours (beat and the load
    generator included). A process that used no CPU is missing from `per`: 0 here."""
    if not per:
        return {}
    return {"all": per.get("total (ours)", 0.0), "ingress": per.get("ingress", 0.0),
            "pools": round(sum(v for k, v in per.items() if k.startswith("pool-")), 2),
            "postgres": per.get("postgres", 0.0), "redis": per.get("redis", 0.0), "loadgen": per.get(LOADGEN, 0.0)}


def cpu_per_request(cpu: dict[str, Any], requests: int) -> dict[str, Any]:
    """An ingress scenario's CPU per request: the ingress processes' (gunicorn), and every process's."""
    per = cpu_per_msg(cpu, requests)
    return {"cpu_ms_per_request": per.get("ingress", 0.0) if per else None, "cpu_ms_per_request_by_process": per}


def log_levels(text: str) -> dict[str, int]:
    """Lines of a process log by level (the JSON lines' `level`; `unparsed` for any other line)."""
    levels: dict[str, int] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            level = str(doc.get("level", "unknown")) if isinstance(doc, dict) else "unparsed"
        except ValueError:
            level = "unparsed"
        levels[level] = levels.get(level, 0) + 1
    return levels


def _sample_message() -> dict[str, Any]:
    """A task argument of the real size: an InboundMessage as the ingress enqueues it."""
    from shared.messages import InboundMessage

    return InboundMessage(
        channel_id="bwa", platform="whatsapp", session_key="bwa:dm:15551234567", chat_id="15551234567",
        chat_kind="dm", sender_id="15551234567", sender_name="Ana Souza",
        text="lg-000000-0-0 my order 48213 has not arrived", platform_message_id="wamid.HBgLMTU1NTEyMzQ1NjcVAgASGBQz",
        sent_at=time.time(), seq=1, received_at=time.time()).to_dict()


def _brief(report: dict[str, Any]) -> dict[str, Any]:
    return {k: report[k] for k in ("sessions", "accepted", "rejected", "msgs_per_s", "send_rate", "latency_ms",
                                   "lost", "duplicated", "reordered", "misrouted")}


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = None
    try:
        mem = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem, "kernel": platform.release(),
                            "python": platform.python_version(), "loadavg_start": list(os.getloadavg()),
                            "started_at": datetime.now(UTC).isoformat(timespec="seconds")}
    for name, argv in (("postgresql", ["psql", "--version"]), ("redis", ["redis-server", "--version"])):
        try:
            info[name] = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info[name] = None
    return info


def commit_probe(pg_url: str, n: int = 200) -> float | None:
    """Milliseconds per tiny committed transaction on this machine: the WAL flush a turn pays at every commit."""
    import psycopg

    try:
        with psycopg.connect(pg_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute("CREATE TABLE bench_commit_probe (x int)")
            t0 = time.perf_counter()
            for _ in range(n):
                conn.execute("INSERT INTO bench_commit_probe VALUES (1)")
            elapsed = time.perf_counter() - t0
            conn.execute("DROP TABLE bench_commit_probe")
        return round(elapsed / n * 1000, 3)
    except psycopg.Error:
        return None


def target(name: str) -> str:
    """A target as the table and the targets' keys write it: 1,400, 0.28, 3.5."""
    return f"{TARGETS[name]:,g}"


def targets_met(r: dict[str, Any]) -> dict[str, Any]:
    met: dict[str, Any] = {}

    def ok(name: str, value: Any, good: bool) -> None:
        met[name] = {"value": value, "met": bool(good)}

    def at_least(name: str, value: Any, key: str) -> None:
        if value is not None:
            ok(f"{name}>={target(key)}", value, value >= TARGETS[key])

    def at_most(name: str, value: Any, key: str) -> None:
        if value is not None:
            ok(f"{name}<={target(key)}", value, value <= TARGETS[key])
    e2e = r.get("e2e") or {}
    at_least("e2e_ratio_to_ceiling", e2e.get("ratio_to_ceiling"), "e2e_ratio")
    at_least("e2e_msgs_per_s", e2e.get("msgs_per_s"), "e2e_msgs_per_s")
    roles = e2e.get("cpu_ms_per_message") or {}
    for role in ("all", "pools", "postgres"):
        at_most(f"e2e_cpu_ms_per_message_{role}", roles.get(role), f"cpu_ms_{role}")
    for name in ("e2e", "memory", "waiting_agent"):
        block = r.get(name) or {}
        if "lost" in block:
            counts = [block[k] for k in CORRECTNESS]
            ok(f"{name}_correct", counts, not any(counts))
    for name in ("slow_agent", "slow_agent_gevent"):  # the slow Agent on each execution model
        slow = [s for s in (r.get(name) or []) if isinstance(s, dict)]
        top = max(slow, key=lambda s: s["concurrency"], default=None)
        if top:
            ok(f"{name}_efficiency_at_{top['concurrency']}>={target('slow_efficiency')}", top["efficiency"],
               top["efficiency"] >= TARGETS["slow_efficiency"])
            ok(f"{name}_reordered==0", sum(s["reordered"] for s in slow), not sum(s["reordered"] for s in slow))
    waiting = r.get("waiting_agent") or {}
    at_least("waiting_agent_efficiency", waiting.get("efficiency"), "waiting_efficiency")
    at_least("waiting_agent_within_latency_plus_1s", waiting.get("within_latency_plus_1s"), "waiting_within")
    at_most("waiting_agent_rss_mb_peak", waiting.get("rss_mb_peak"), "waiting_rss_mb")
    at_most("waiting_agent_db_connections_peak", waiting.get("db_connections_peak"), "waiting_db_connections")
    hot = r.get("hot_session") or {}
    if hot.get("ratio") is not None:
        ok("hot_session_ratio<=2", hot["ratio"], hot["ratio"] <= TARGETS["hot_ratio"])
    scale = r.get("scale") or {}
    if scale.get("ratio") is not None:
        ok("scale_ratio<=1.1", scale["ratio"], scale["ratio"] <= TARGETS["scale_ratio"])
        seq = sorted({t for p in scale.get("explain", []) for t in p.get("seq_scans", [])})
        ok("scale_turn_queries_use_indexes", seq or "no seq scans", not seq)
    ingress = r.get("ingress") or {}
    at_least("ingress_max_req_per_s", ingress.get("max_req_per_s"), "ingress_max_req_per_s")
    at_most("ingress_cpu_ms_per_request", ingress.get("cpu_ms_per_request"), "ingress_cpu_ms")
    if ingress.get("p99_ms") is not None:
        achieved = ingress["at_rate"]["achieved_req_per_s"] or 0
        ok("ingress_p99<10ms@1000/s", {"p99_ms": ingress["p99_ms"], "achieved_req_per_s": achieved},
           ingress["p99_ms"] < TARGETS["ingress_p99_ms"] and achieved >= 0.95 * TARGETS["ingress_rate"])
    status = r.get("status_callbacks") or {}
    at_least("status_callbacks_max_req_per_s", status.get("max_req_per_s"), "status_max_req_per_s")
    if "queued_after" in status:
        quiet = {k: status[k] for k in ("rejected", "queued_after", "ingress_log_lines")}
        ok("status_callbacks_quiet", quiet, not any(quiet.values()))
    mem = r.get("memory") or {}
    if mem.get("growth") is not None:
        ok("memory_growth<=10%", mem["growth"], abs(mem["growth"]) <= TARGETS["memory_growth"])
    return met


def table(r: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str]] = []

    def f(x: Any, digits: int = 1) -> str:
        return "-" if x is None else (f"{x:,.{digits}f}" if isinstance(x, (int, float)) else str(x))

    def err(name: str) -> bool:
        block = r.get(name)
        if isinstance(block, dict) and "error" in block:
            rows.append((name, "FAILED", block["error"][:60], ""))
            return True
        return block is None
    t = r.get("targets", {})

    def met(key_prefix: str) -> str:
        hit = [v for k, v in t.items() if k.startswith(key_prefix)]
        return "" if not hit else ("yes" if all(v["met"] for v in hit) else "NO")
    if not err("turn"):
        tr = r["turn"]
        pt = tr["per_turn"]
        rows.append(("turn", "CPU / wall ms per turn (in-process)", f"{f(tr['cpu_ms_per_turn'], 2)} / "
                     f"{f(tr['wall_ms_per_turn'], 2)}", ""))
        rows.append(("turn", "transactions / statements / round trips per turn",
                     f"{f(pt['transactions'], 1)} / {f(pt['statements'], 1)} / {f(pt.get('round_trips'), 1)}", ""))
    if not err("ceiling"):
        rows.append(("ceiling", "celery no-op msgs/s", f(r["ceiling"]["celery_noop_msgs_per_s"]), ""))
    if not err("e2e"):
        e = r["e2e"]
        rows.append(("e2e", "msgs/s", f(e["msgs_per_s"]), f">= {target('e2e_msgs_per_s')} {met('e2e_msgs_per_s')}"))
        rows.append(("e2e", "ratio to ceiling", f(e["ratio_to_ceiling"], 3),
                     f">= {target('e2e_ratio')} {met('e2e_ratio')}"))
        roles = e.get("cpu_ms_per_message") or {}
        for role, label in (("all", "all processes"), ("pools", "pools (a turn)"), ("postgres", "PostgreSQL")):
            if role in roles:
                rows.append(("e2e", f"CPU ms per message, {label}", f(roles[role], 2),
                             f"<= {target(f'cpu_ms_{role}')} {met(f'e2e_cpu_ms_per_message_{role}')}"))
        if roles:
            rows.append(("e2e", "CPU ms per message, ingress / Redis / load generator",
                         " / ".join(f(roles[k], 2) for k in ("ingress", "redis", "loadgen")), ""))
        lat = e["latency_ms"]
        rows.append(("e2e", "latency p50/p95/p99 ms", f"{f(lat['p50'])} / {f(lat['p95'])} / {f(lat['p99'])}", ""))
        rows.append(("e2e", "lost/dup/reordered/misrouted",
                     "/".join(str(e[k]) for k in ("lost", "duplicated", "reordered", "misrouted")),
                     f"all 0 {met('e2e_correct')}"))
    for name, model in (("slow_agent", "threads"), ("slow_agent_gevent", "gevent")):
        if not err(name) and r[name]:
            for s in r[name]:
                rows.append((name, f"{model} c={s['concurrency']} msgs/s (ideal {f(s['ideal_msgs_per_s'])})",
                             f"{f(s['msgs_per_s'])} ({s['efficiency']:.0%}), reordered {s['reordered']}", ""))
            hit = "NO" if "NO" in (met(f"{name}_efficiency_at"), met(f"{name}_reordered")) else "yes"
            rows[-1] = (*rows[-1][:3], f">= {TARGETS['slow_efficiency']:.0%} {hit}")
    if not err("waiting_agent"):
        w = r["waiting_agent"]
        n, wait = f(w["in_flight"], 0), f"{w['agent_latency_s']:g} s"
        half = w["waves"][-1]["sessions"] if w.get("waves") else "-"
        rows.append(("waiting_agent", f"turns/s, {n} in flight, {wait} Agent, {w['execution_model']} (ideal "
                     f"{f(w['ideal_turns_per_s'])})", f"{f(w['turns_per_s'])} ({f(w['efficiency'], 3)})",
                     f">= {target('waiting_efficiency')} {met('waiting_agent_efficiency')}"))
        rows.append(("waiting_agent", f"replies within {wait} + 1 s, {half} in flight",
                     "-" if w["within_latency_plus_1s"] is None else f"{w['within_latency_plus_1s']:.1%}",
                     f">= {TARGETS['waiting_within']:.0%} {met('waiting_agent_within')}"))
        rows.append(("waiting_agent", f"pool RSS MB at {n} in flight (peak; at most {f(w['llm_concurrent_peak'], 0)} "
                     "waiting on the LLM)", f(w["rss_mb_peak"]),
                     f"<= {target('waiting_rss_mb')} {met('waiting_agent_rss')}"))
        rows.append(("waiting_agent", "database connections of the pool (peak)", f(w["db_connections_peak"], 0),
                     f"<= {target('waiting_db_connections')} {met('waiting_agent_db')}"))
        rows.append(("waiting_agent", "lost/dup/reordered/misrouted", "/".join(str(w[k]) for k in CORRECTNESS),
                     f"all 0 {met('waiting_agent_correct')}"))
    if not err("hot_session"):
        h = r["hot_session"]
        rows.append(("hot_session", "others p99 ms alone / flooded",
                     f"{f(h['others_p99_ms_alone'])} / {f(h['others_p99_ms_with_flood'])} (x{f(h['ratio'], 2)})",
                     f"<= 2x {met('hot_session')}"))
    if not err("scale"):
        s = r["scale"]
        for lvl in s["levels"]:
            rows.append(("scale", f"per-msg ms at {lvl['sessions_stored']:,} sessions", f(lvl["per_msg_ms"], 2), ""))
        rows.append(("scale", "ratio largest/smallest", f(s["ratio"], 3), f"<= 1.1 {met('scale_ratio')}"))
        if s.get("cpu_ratio") is not None:
            rows.append(("scale", "CPU ms/msg smallest -> largest (ratio)",
                         (f"{f(s['cpu_ms_per_msg_at_10k'], 2)} -> {f(s['cpu_ms_per_msg_at_1m'], 2)} "
                         f"(x{f(s['cpu_ratio'], 3)}; PostgreSQL x{f(s['postgres_cpu_ratio'], 3)})"), ""))
        seq = sorted({x for p in s.get("explain", []) for x in p.get("seq_scans", [])})
        rows.append(("scale", f"turn statements EXPLAINed: {len(s.get('explain', []))}",
                     "seq scans: " + (", ".join(seq) if seq else "none"), f"indexes {met('scale_turn')}"))
    if not err("ingress"):
        i = r["ingress"]
        rows.append(("ingress", "max req/s (closed loop)", f(i["req_per_s"]),
                     f">= {target('ingress_max_req_per_s')} {met('ingress_max_req_per_s')}"))
        rows.append(("ingress", "CPU ms per request, ingress processes", f(i.get("cpu_ms_per_request"), 2),
                     f"<= {target('ingress_cpu_ms')} {met('ingress_cpu_ms')}"))
        if i.get("at_half_max"):
            h = i["at_half_max"]
            rows.append(("ingress", f"p50/p99 ms at {f(h['offered_req_per_s'], 0)} req/s (half the max)",
                         f"{f(h['latency_ms']['p50'], 2)} / {f(h['latency_ms']['p99'], 2)}", ""))
        rows.append(("ingress", (f"p99 ms at {f(i['at_rate']['offered_req_per_s'], 0)} req/s "
                                f"(achieved {f(i['at_rate']['achieved_req_per_s'], 0)})"),
                     f(i["p99_ms"], 2), f"< {target('ingress_p99_ms')} ms {met('ingress_p99')}"))
    if not err("status_callbacks"):
        sc = r["status_callbacks"]
        by = sc.get("cpu_ms_per_request_by_process") or {}
        rows.append(("status_callbacks", "WhatsApp statuses max req/s (closed loop)", f(sc["max_req_per_s"]),
                     f">= {target('status_max_req_per_s')} {met('status_callbacks_max')}"))
        rows.append(("status_callbacks", "CPU ms per request: ingress / Redis / load generator",
                     " / ".join(f(by.get(k, 0.0), 2) for k in ("ingress", "redis", LOADGEN)), ""))
        rows.append(("status_callbacks", "rejected / left in queues / ingress log lines",
                     f"{sc['rejected']} / {sc['queued_after']} / {sc['ingress_log_lines']}",
                     f"all 0 {met('status_callbacks_quiet')}"))
    if not err("memory"):
        m = r["memory"]
        rows.append(("memory", f"worker RSS MB start -> end ({m['messages']:,} msgs)",
                     f"{f(m['rss_mb_start'])} -> {f(m['rss_mb_end'])} ({m['growth']:+.1%})",
                     f"<= 10% {met('memory')}"))
    widths = [max(len(row[i]) for row in rows + [("scenario", "figure", "value", "target")]) for i in range(4)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format("scenario", "figure", "value", "target"), line.format(*("-" * w for w in widths))]
    out += [line.format(*row) for row in rows]
    m = r["machine"]
    out.append(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; load avg at start "
               f"{', '.join(f'{x:.2f}' for x in m['loadavg_start'])}")
    return "\n".join(out)
