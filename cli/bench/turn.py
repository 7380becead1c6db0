"""The `turn` scenario: one worker's turn in this process, no stack, on a fresh database: where a worker's CPU
goes per turn (CPU and wall ms, transactions, statements, round trips, and the time by part of the turn: each Store
method, the channel's send, the Agent, the rest). tests/test_store.py runs `profile_turns` small on SQLite."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from cli.bench.knobs import log


class TurnScenario:
    """The `turn` scenario, a method of Bench (cli/bench/harness.py): it needs the knobs only, no stack."""

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
    from shared.db import STATEMENT_LISTENERS, autocommit, engine_for
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
        if autocommit(conn):
            counts["autocommit_statements"] += 1
    def count_direct(conn: Any, *_args: Any) -> None:  # the statements shared.db.execute runs straight on psycopg
        counts["statements"] += 1
        if autocommit(conn):  # its own transaction
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
