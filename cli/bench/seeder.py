"""Seeding for the `scale` scenario: dormant sessions with their messages and events, stored fast with COPY (and
without the per-row foreign-key checks where the bench connects as a superuser), so a level of a million sessions
takes minutes."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from cli.bench.knobs import log


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
                raise RuntimeError(f"the seeder does not fill {table}.{missing} (schema changed): update cli/bench/seeder.py")

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
