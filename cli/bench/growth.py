"""Scenarios of what grows: `memory`, the worker pools' RSS over many messages and sessions, and `scale`, the
end-to-end cost per message with more and more sessions stored (seeded by cli/bench/seeder.py), with an EXPLAIN
ANALYZE of every statement one real turn sends, to show the turn's queries use indexes."""

from __future__ import annotations

import dataclasses
import math
import random
import re
import time
from typing import Any

from cli.bench.knobs import log
from cli.bench.meters import Peaks, cpu_per_msg
from cli.bench.seeder import Seeder


class GrowthScenarios:
    """memory and scale (and the EXPLAIN of a turn): methods of Bench (cli/bench/harness.py)."""

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
            if _TURN_FUNCTION.search(key):
                plans.extend(_explain_call(engine, statement, params))
            else:
                plans.append(_explain(engine, statement, params))
        log(f"EXPLAIN: one turn ({outcome}) ran {len(captured)} statements, {len(plans)} distinct, {counts}")
        self.turn_counts = {"outcome": outcome, "statements": len(captured), "distinct_statements": len(plans),
                            **counts}
        return plans


_TURN_FUNCTION = re.compile(r"\bcs_\w+\(")  # a call of one of the turn's functions (migration 0007)


def _plan_facts(plan: list[str]) -> dict[str, Any]:
    return {"plan": plan, "uses_index": any("Index" in line for line in plan),
            "seq_scans": sorted({line.split("Seq Scan on ")[1].split()[0] for line in plan if "Seq Scan on " in line})}


def _explain_call(engine: Any, statement: str, params: Any) -> list[dict[str, Any]]:
    """The plans of the statements inside a turn function's call, as auto_explain reports them to the client
    (`log_nested_statements`, at NOTICE), the call run again and rolled back. A statement the second run refuses
    (an INSERT of a message stored by the first) ends the list; it is marked with the error."""
    conn = engine.connect()
    raw = conn.connection.dbapi_connection
    notices: list[str] = []

    def keep(diag: Any) -> None:
        notices.append(diag.message_primary or "")

    raw.add_notice_handler(keep)
    trans = conn.begin()
    error = None
    try:
        conn.exec_driver_sql("LOAD 'auto_explain'")
        for setting in ("log_min_duration = 0", "log_analyze = on", "log_buffers = on", "log_nested_statements = on",
                        "log_level = notice"):
            conn.exec_driver_sql(f"SET LOCAL auto_explain.{setting}")
        conn.exec_driver_sql(statement, params if params else None).fetchall()
    except Exception as exc:  # noqa: BLE001 - reported with the plans it got to
        error = f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}"
    finally:
        trans.rollback()
        raw.remove_notice_handler(keep)
        conn.close()
    call = " ".join(statement.split())
    results = []
    for notice in notices:
        # "duration: ... plan:", "Query Text: ..." (over as many lines as the query), then the plan's nodes
        lines = notice.splitlines()
        start = next((i for i, line in enumerate(lines) if "(cost=" in line), len(lines))
        query = " ".join(lines[1:start]).removeprefix("Query Text: ")
        if not query or _TURN_FUNCTION.search(query):
            continue  # the call itself
        plan = lines[start:]
        results.append({"sql": " ".join(query.split()), "in_call": call[:80], "analyzed": True, **_plan_facts(plan)})
    if error is not None or not results:
        results.append({"sql": call, "analyzed": False, "error": error or "auto_explain reported no statement",
                        "plan": [], "uses_index": False, "seq_scans": []})
    return results


def _explain(engine: Any, statement: str, params: Any) -> dict[str, Any]:
    text = " ".join(statement.split())
    result: dict[str, Any] = {"sql": text}
    for analyze in (True, False):
        conn = engine.connect()
        trans = conn.begin()
        try:
            prefix = "EXPLAIN (ANALYZE, BUFFERS) " if analyze else "EXPLAIN "
            rows = conn.exec_driver_sql(prefix + statement, params if params else None).fetchall()
            result["analyzed"] = analyze
            result.update(_plan_facts([r[0] for r in rows]))
            return result
        except Exception as exc:  # noqa: BLE001 - e.g. a unique violation re-running an INSERT: plain EXPLAIN
            result["error"] = f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}"
        finally:
            trans.rollback()
            conn.close()
    return result
