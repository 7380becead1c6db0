"""What a run measured: the report of a workload (throughput, latencies, the correctness counts) and its summary."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from cli.loadgen.workload import Workload


def workload_report(wl: Workload, unmatched: int) -> dict[str, Any]:
    """The workload's figures; `unmatched`: replies the load generator could not match to a message of its own."""
    msgs = list(wl.msgs.values())
    accepted = [m for m in msgs if m.t_accepted is not None]
    replied = [m for m in accepted if m.receipts]
    duplicated = sum(len(m.receipts) - 1 for m in msgs if m.receipts)
    misrouted = sum(1 for m in msgs for (_, _, prefix, chat) in m.receipts
                    if (prefix, chat) != (m.session.target.prefix, m.session.chat_id))
    reordered = 0
    by_session: dict[int, list[tuple[int, int]]] = {}
    for m in msgs:
        if m.receipts:
            by_session.setdefault(m.session.index, []).append((m.receipts[0][0], m.k))
    for arrivals in by_session.values():
        highest = -1
        for _, k in sorted(arrivals):
            if k < highest:
                reordered += 1
            highest = max(highest, k)
    latencies = [max(0.0, m.receipts[0][1] - m.t_accepted) for m in replied]
    accept = [m.t_accepted - (m.t_sched if wl.rate is not None else m.t_sent) for m in accepted]
    first = min((m.t_sent for m in msgs), default=wl.t_start)
    if wl.expect_replies:
        last = max((m.receipts[0][1] for m in replied), default=first)
        done = len(replied)
    else:
        last = max((m.t_accepted for m in accepted), default=first)
        done = len(accepted)
    duration = max(1e-9, last - first)
    send_span = max(1e-9, max((m.t_sent for m in msgs), default=first) - first)
    kinds: dict[str, dict[str, Any]] = {}
    for label in sorted({s.label for s in wl.plan}):
        mine = [m for m in accepted if m.session.label == label]
        lat = [max(0.0, m.receipts[0][1] - m.t_accepted) for m in mine if m.receipts]
        kinds[label] = {"sessions": sum(1 for s in wl.plan if s.label == label), "accepted": len(mine),
                        "replied": len(lat), "latency_ms": _percentiles(lat)}
    return {
        "workload": wl.name,
        "mode": "open" if wl.rate is not None else "closed",
        "rate": wl.rate,
        "concurrency": wl.concurrency,
        "window": wl.window if wl.rate is None else None,
        "sessions": wl.sessions,
        "messages_per_session": wl.messages,
        "messages": wl.total,
        "sent": len(msgs),
        "accepted": len(accepted),
        "rejected": len(msgs) - len(accepted),
        "retried": sum(1 for m in msgs if m.attempts > 1),
        "errors": dict(wl._errors),
        "replied": len(replied) if wl.expect_replies else None,
        "duration_s": round(duration, 3),
        "msgs_per_s": round(done / duration, 2),
        "send_rate": round(len(msgs) / send_span, 2) if len(msgs) > 1 else None,
        "latency_ms": _percentiles(latencies) if wl.expect_replies else None,
        "accept_latency_ms": _percentiles(accept),
        "lost": len(accepted) - len(replied) if wl.expect_replies else 0,
        "duplicated": duplicated,
        "reordered": reordered,
        "misrouted": misrouted,
        "unmatched_replies": unmatched,
        "by_kind": kinds,
    }



def replied_within(wl: Workload, seconds: float) -> int:
    """Messages of the workload whose first reply reached the stand-in at most `seconds` after the webhook's 200."""
    return sum(1 for m in wl.msgs.values()
               if m.t_accepted is not None and m.receipts and m.receipts[0][1] - m.t_accepted <= seconds)


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return sorted_values[min(rank, len(sorted_values) - 1)]


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    s = sorted(values)
    return {"p50": round(_pct(s, 50) * 1000, 2), "p95": round(_pct(s, 95) * 1000, 2),
            "p99": round(_pct(s, 99) * 1000, 2), "max": round(s[-1] * 1000, 2),
            "mean": round(sum(s) / len(s) * 1000, 2)}


def correct(report: Mapping[str, Any]) -> bool:
    return not (report["lost"] or report["duplicated"] or report["reordered"] or report["misrouted"])


def summary(report: Mapping[str, Any]) -> str:
    lat = report.get("latency_ms") or {}
    acc = report.get("accept_latency_ms") or {}
    shape = (f"open loop {report['rate']:g} msg/s" if report["mode"] == "open"
             else f"closed loop, concurrency {report['concurrency']}, window {report['window']}")
    lines = [
        f"{report['workload']}: {report['sessions']} sessions x {report['messages_per_session']} messages, {shape}",
        f"  accepted {report['accepted']}/{report['sent']} (rejected {report['rejected']}, retried {report['retried']})"
        + (f", errors {report['errors']}" if report["errors"] else ""),
        f"  throughput {report['msgs_per_s']:.1f} msg/s over {report['duration_s']:.1f}s",
        f"  webhook 200 in  p50 {acc.get('p50')} ms  p95 {acc.get('p95')} ms  p99 {acc.get('p99')} ms",
    ]
    if report.get("latency_ms") is not None:
        lines.append(f"  200 -> reply    p50 {lat.get('p50')} ms  p95 {lat.get('p95')} ms  p99 {lat.get('p99')} ms  "
                     f"max {lat.get('max')} ms")
        lines.append(f"  lost {report['lost']}  duplicated {report['duplicated']}  reordered {report['reordered']}  "
                     f"misrouted {report['misrouted']}  (unmatched replies {report['unmatched_replies']})")
        for label, k in report["by_kind"].items():
            lines.append(f"    {label:18} {k['sessions']:6} sessions  {k['replied']:7}/{k['accepted']:<7} replied  "
                         f"p50 {k['latency_ms']['p50']} ms  p99 {k['latency_ms']['p99']} ms")
    return "\n".join(lines)
