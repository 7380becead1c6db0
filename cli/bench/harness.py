"""The Bench: the private stack a run measures (cli/stack.py: PostgreSQL database, Redis, ingress, worker pools,
beat), the stand-in platforms and LLM that answer it, the bench's channels, the load generator playing the
platforms, and the run itself: the scenarios in order, one failure not losing the others' figures, the JSON written
after each scenario and the table at the end. The scenarios are mixed in by family (cli/bench/turn.py,
pipeline.py, slow_agents.py, growth.py) with py-spy profiling (pyspy.py)."""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from cli.bench.growth import GrowthScenarios
from cli.bench.knobs import Knobs, log
from cli.bench.meters import CpuMeter, commit_probe, machine_info
from cli.bench.pipeline import PipelineScenarios
from cli.bench.pyspy import PySpyProfiling
from cli.bench.report import table, targets_met
from cli.bench.slow_agents import SlowAgentScenarios
from cli.bench.turn import TurnScenario

SCENARIOS = ("turn", "ceiling", "ingress", "status_callbacks", "e2e", "hot_session", "slow_agent", "waiting_agent",
             "memory", "scale")
STACKLESS = ("turn",)  # scenarios that need only a database: they run before the stack starts

# the bench channels' rate limits: high enough that no load of the bench meets them
RATE_LIMITS = "rate_limits = { account_per_s = 1000000, account_burst = 1000000, chat_per_s = 100000, chat_burst = 100000 }"


class Bench(TurnScenario, PipelineScenarios, SlowAgentScenarios, GrowthScenarios, PySpyProfiling):
    """One run: `run(names)` plays the scenarios `scenario_<name>` (from the mixins) in order and writes the results."""

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
