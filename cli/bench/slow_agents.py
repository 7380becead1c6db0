"""Scenarios of Agents that take their time: `slow_agent`, a 200 ms Agent (cli/bench_agents.py:SlowEcho) at
several worker concurrencies on each execution model, and `waiting_agent` (issue 12), the real OpenAI-compatible
Agent against a stand-in LLM that answers after 2 s, in waves of sessions sending at once; with the waiting
scenario's figures (`waiting_wave`, `waiting_figures`)."""

from __future__ import annotations

import math
from typing import Any

from cli.bench.knobs import log
from cli.bench.meters import Peaks, cpu_per_msg
from cli.bench.report import CORRECTNESS


class SlowAgentScenarios:
    """slow_agent (and slow_agent_gevent) and waiting_agent: methods of Bench (cli/bench/harness.py)."""

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
