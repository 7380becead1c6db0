"""Compare what the driver got accepted with what the stand-in platforms received, and with the database.

Per fault:
  lost        accepted (200) but never answered
  duplicated  answered more than once (each extra copy counts)
  reordered   replies of a session that arrived after a reply to a later message of that session
  misrouted   a reply that arrived in another chat than its session's
  recover     seconds from the end of the fault to the last reply of the traffic
Database: every stored inbound of a session has exactly one reply row, no reply row lacks its inbound, every reply
is marked sent, the inbound rows are stored in send order, one inbound per accepted message, and dead letters
exist only for poison messages (and for every accepted poison message).
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared.logs import pseudonym

from .harness import SECRETS, FaultStack
from .traffic import Sent, Traffic

REPLY = re.compile(r"^echo: (?P<text>(?P<label>[\w-]+)#(?P<i>\d+)(?: slow)?)$")
RESULTS: list[dict[str, Any]] = []  # one row per fault, printed at the end of the session (conftest.py)


@dataclass
class Report:
    fault: str
    posted: int = 0
    accepted: int = 0
    lost: list[Sent] = field(default_factory=list)
    excused: list[Sent] = field(default_factory=list)  # lost, but within a fault's stated exception
    duplicated: dict[str, int] = field(default_factory=dict)  # text -> extra copies
    dup_excused: dict[str, int] = field(default_factory=dict)  # extra copies within a fault's stated exception
    reordered: dict[str, list[int]] = field(default_factory=dict)  # session label -> reply order (indices)
    misrouted: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # replies to texts never sent, or to refused messages
    problems: list[str] = field(default_factory=list)  # failed database and fault-specific checks
    recover_s: float | None = None
    last_reply_at: float | None = None
    notes: list[str] = field(default_factory=list)
    evidence: dict[str, list[str]] = field(default_factory=dict)  # message text -> log lines that mention it
    copies: dict[str, list[str]] = field(default_factory=dict)  # duplicated text -> when each copy reached the platform

    @property
    def n_duplicated(self) -> int:
        return sum(self.duplicated.values())

    @property
    def n_reordered(self) -> int:
        return sum(late_count(order) for order in self.reordered.values())

    def row(self) -> dict[str, Any]:
        lost = f"{len(self.lost)}+{len(self.excused)}*" if self.excused else len(self.lost)
        dup = f"{self.n_duplicated}+{sum(self.dup_excused.values())}*" if self.dup_excused else self.n_duplicated
        return {"fault": self.fault, "messages": self.accepted, "lost": lost,
                "duplicated": dup, "reordered": self.n_reordered, "misrouted": len(self.misrouted),
                "recover_s": self.recover_s, "other": len(self.problems) + len(self.unexpected),
                "notes": "; ".join(self.notes)}

    def record(self) -> None:
        """Add this fault's row to the session's summary table (printed by conftest.py) and print it."""
        row = self.row()
        RESULTS.append(row)
        print("\n" + format_table([row]))

    def describe(self, limit: int = 12) -> str:
        """The evidence, for an assertion message."""
        out = [f"{self.fault}: {self.accepted} accepted of {self.posted} posted"]
        if self.lost:
            out.append(f"lost {len(self.lost)}: " + ", ".join(
                f"{s.text} ({s.platform_message_id}, accepted +{s.accepted_at - s.first_at:.1f}s, "
                f"answers {s.answers})" for s in self.lost[:limit]))
        if self.duplicated:
            out.append(f"duplicated {self.n_duplicated}: " + ", ".join(
                f"{t} x{n + 1} (at {', '.join(self.copies.get(t, []))})"
                for t, n in list(self.duplicated.items())[:limit]))
        if self.reordered:
            out.append(f"reordered {self.n_reordered}: " + "; ".join(
                f"{label} replies in order {order}" for label, order in list(self.reordered.items())[:limit]))
        if self.misrouted:
            out.append(f"misrouted {len(self.misrouted)}: " + "; ".join(self.misrouted[:limit]))
        if self.unexpected:
            out.append(f"unexpected replies {len(self.unexpected)}: " + "; ".join(self.unexpected[:limit]))
        if self.problems:
            out.append(f"problems ({len(self.problems)}): " + "; ".join(self.problems[:limit]))
        out += self.notes
        for text, lines in self.evidence.items():
            out.append(f"logs mentioning {text}:")
            out += [f"    {line[:400]}" for line in lines]
        return "\n  ".join(out)


def late_count(order: list[int]) -> int:
    """How many entries arrive after a larger one (replies overtaken by a later message's reply)."""
    late, top = 0, -1
    for i in order:
        if i < top:
            late += 1
        top = max(top, i)
    return late


# --------------------------------------------------------------------------------------------------------------------
# Waiting for the system to settle


def answered_texts(stack: FaultStack) -> collections.Counter[str]:
    return collections.Counter(m.group("text") for s in list(stack.standin.sent) if (m := REPLY.match(s.text)))


def wait_settled(stack: FaultStack, traffic: Traffic, timeout: float, quiet_s: float = 1.5,
                 skip: Callable[[Sent], bool] | None = None) -> float:
    """Until every accepted (non-poison, not `skip`ped) message has a reply, no reply is pending in the database
    and the stand-in received nothing for `quiet_s`; or `timeout`. Returns the seconds waited."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        answered = answered_texts(stack)
        missing = [s for s in traffic.accepted()
                   if not s.poison and s.text not in answered and not (skip and skip(s))]
        if not missing and traffic.done.is_set():
            try:
                pending = stack.query("SELECT count(*) AS n FROM messages WHERE delivery_status = 'pending'")[0]["n"]
            except Exception:  # the database may be down in the middle of a fault
                pending = 1
            last = max((s.at for s in list(stack.standin.sent)), default=0)
            if not pending and time.time() - last >= quiet_s:
                break
        time.sleep(0.25)
    return time.monotonic() - started


# --------------------------------------------------------------------------------------------------------------------
# The comparison


def check(stack: FaultStack, traffic: Traffic, fault: str, fault_end: float | None,
          excuse: Callable[[Sent], bool] | None = None,
          excuse_dup: Callable[[Sent, list[float]], bool] | None = None) -> Report:
    """`excuse(sent)`: True for an accepted message the fault is allowed to lose (reported, not a failure).
    `excuse_dup(sent, arrival times)`: True for a duplicate reply the fault is allowed to cause (likewise)."""
    report = Report(fault, posted=len(traffic.sent))
    accepted = traffic.accepted()
    report.accepted = len(accepted)
    by_text = {s.text: s for s in traffic.sent}
    sessions = {s.label: s for s in traffic.sessions}

    replies: dict[str, list[Any]] = collections.defaultdict(list)  # text -> stand-in records
    order: dict[str, list[int]] = collections.defaultdict(list)  # label -> first replies' indices, arrival order
    for rec in list(stack.standin.sent):
        m = REPLY.match(rec.text)
        if rec.text.startswith("echo: warm-up"):
            continue
        if not m or m.group("text") not in by_text:
            report.unexpected.append(f"{rec.prefix}/{rec.chat_id}: {rec.text!r}")
            continue
        text, label = m.group("text"), m.group("label")
        session = sessions[label]
        if (rec.prefix, rec.chat_id) != (session.channel, session.chat_id):
            report.misrouted.append(f"{text!r} for {session.channel}/{session.chat_id} went to "
                                    f"{rec.prefix}/{rec.chat_id}")
        replies[text].append(rec)
        if len(replies[text]) == 1:
            order[label].append(int(m.group("i")))

    for s in traffic.sent:
        got = replies.get(s.text, [])
        if s.accepted and not s.poison and not got:
            (report.excused if excuse and excuse(s) else report.lost).append(s)
        if len(got) > 1:
            excused = excuse_dup is not None and excuse_dup(s, sorted(r.at for r in got))
            (report.dup_excused if excused else report.duplicated)[s.text] = len(got) - 1
            report.copies[s.text] = [time.strftime("%H:%M:%S", time.gmtime(r.at)) + f".{int(r.at % 1 * 1000):03d}Z"
                                     for r in got]
        if got and s.poison:
            report.unexpected.append(f"poison message {s.text!r} was answered")
        if got and not s.accepted and any(a.startswith("4") for a in s.answers):
            report.unexpected.append(f"{s.text!r} was refused ({s.answers}) yet answered")
    for label, got in order.items():
        if late_count(got):
            report.reordered[label] = got

    all_replies = [r for recs in replies.values() for r in recs]
    if all_replies:
        report.last_reply_at = max(r.at for r in all_replies)
        if fault_end is not None:
            report.recover_s = round(max(0.0, report.last_reply_at - fault_end), 1)
    refused = collections.Counter(a for s in traffic.sent for a in s.answers if a.startswith("4"))
    if refused:
        report.problems.append(f"the ingress refused messages: {dict(refused)}")
    if traffic.errors:
        report.problems.append(f"traffic driver errors: {traffic.errors[:3]}")
    report.problems += check_database(stack, traffic, {s.text for s in report.excused})
    collect_evidence(stack, report, [*report.lost[:4], *(by_text[t] for t in list(report.duplicated)[:4])])
    return report


def collect_evidence(stack: FaultStack, report: Report, sent: list[Sent], lines: int = 12) -> None:
    """The log lines of every process that mention these messages' platform ids (the failure's evidence)."""
    for s in sent:
        logged_as = pseudonym(SECRETS["SECRET_KEY"], s.platform_message_id)  # as the log lines name it at INFO
        found = stack.grep(f'"{logged_as}"', workers_only=False)
        report.evidence[s.text] = found[:lines] or [f"(no log line mentions {s.platform_message_id})"]


def check_database(stack: FaultStack, traffic: Traffic, excused: set[str] = frozenset()) -> list[str]:
    problems: list[str] = []
    rows = stack.query(
        "SELECT m.id, m.role, m.text, m.channel_id, m.platform_message_id, m.in_reply_to, m.delivery_status, "
        "m.position, m.generation, s.key FROM messages m JOIN sessions s ON s.id = m.session_id ORDER BY m.id")
    rows = [r for r in rows if r["text"] not in ("warm-up", "echo: warm-up")]
    users = {r["id"]: r for r in rows if r["role"] == "user"}
    assistants = [r for r in rows if r["role"] == "assistant"]
    replies_to: dict[int, list[dict]] = collections.defaultdict(list)
    for a in assistants:
        if a["in_reply_to"] not in users:
            problems.append(f"reply row {a['id']} {a['text']!r} has no inbound row (in_reply_to={a['in_reply_to']})")
        else:
            replies_to[a["in_reply_to"]].append(a)
        if a["delivery_status"] != "sent":
            problems.append(f"reply {a['text']!r} is {a['delivery_status']}")
    for uid, u in users.items():
        n = len(replies_to.get(uid, []))
        if n != 1:
            problems.append(f"inbound {u['text']!r} ({u['key']}) has {n} reply rows")
    stored = collections.Counter((u["channel_id"], u["platform_message_id"]) for u in users.values())
    by_session = {s.label: s for s in traffic.sessions}
    for s in traffic.sent:
        n = stored.get((s.session.channel, s.platform_message_id), 0)
        if s.poison and n:
            problems.append(f"poison message {s.text!r} was stored as a turn")
        elif s.accepted and not s.poison and n != 1 and not (n == 0 and s.text in excused):
            problems.append(f"accepted {s.text!r} stored {n} times")
    positions: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    for u in users.values():
        m = re.match(r"^(?P<label>[\w-]+)#(?P<i>\d+)(?: slow)?$", u["text"])
        if m and m.group("label") in by_session:
            positions[m.group("label")].append((u["position"], int(m.group("i"))))
            expected = by_session[m.group("label")].key
            if u["key"] != expected:
                problems.append(f"{u['text']!r} stored in session {u['key']}, expected {expected}")
    for label, pairs in positions.items():
        stored_order = [i for _, i in sorted(pairs)]
        if late_count(stored_order):
            problems.append(f"{label} stored out of order: {stored_order}")
    poison = {s.platform_message_id for s in traffic.sent if s.poison}
    for d in stack.query("SELECT platform_message_id, error FROM dead_letters"):
        if d["platform_message_id"] not in poison:
            problems.append(f"dead letter for a healthy message {d['platform_message_id']}: {d['error']}")
    return problems


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = [("fault", "fault", 44), ("messages", "messages", 8), ("lost", "lost", 5), ("duplicated", "dup", 5),
            ("reordered", "reord", 5), ("misrouted", "misr", 5), ("recover_s", "recover s", 9), ("other", "other", 5)]
    head = " | ".join(f"{title:<{w}}" if key == "fault" else f"{title:>{w}}" for key, title, w in cols) + " | notes"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for key, _, w in cols:
            v = r.get(key)
            v = "-" if v is None else v
            cells.append(f"{str(v):<{w}}" if key == "fault" else f"{str(v):>{w}}")
        lines.append(" | ".join(cells) + " | " + str(r.get("notes", "")))
    return "\n".join(lines)
