"""The bench's verdict: the targets (issue 11's, and issue 12's for the waiting Agent), which of them a run met
(`targets_met`, the JSON's `targets`) and the table printed at the end of a run (`table`)."""

from __future__ import annotations

from typing import Any

from cli.bench.meters import LOADGEN

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

CORRECTNESS = ("lost", "duplicated", "reordered", "misrouted")


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
    if m.get("packages"):
        out.append("packages: " + ", ".join(f"{name} {v or '-'}" for name, v in m["packages"].items()))
    return "\n".join(out)
