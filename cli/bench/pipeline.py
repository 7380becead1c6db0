"""Scenarios of the message path: the broker's ceiling (bare Celery no-op tasks), the ingress alone (webhooks
accepted and enqueued, workers stopped), WhatsApp status callbacks (answered, never enqueued), the whole path end to
end (webhook -> queue -> turn -> reply at the stand-in), and one flooded session beside the others."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from cli.bench.knobs import log
from cli.bench.meters import cpu_by_role, cpu_per_msg, cpu_per_request


class PipelineScenarios:
    """ceiling, ingress, status_callbacks, e2e and hot_session: methods of Bench (cli/bench/harness.py)."""

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
