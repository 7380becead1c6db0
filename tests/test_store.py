"""The store's steps as the turn uses them: what the claim, a commit and the release bring back, how few
transactions a turn takes, that a flooded session's messages do not wait on its row, the dormancy sweep
beside a waiting inbox, and a dead pooled connection after a database restart."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy import event, select, update
from sqlalchemy.exc import IntegrityError

from workers.agents import EchoAgent
from shared.db import STATEMENT_LISTENERS, autocommit, engine_for, transaction
from shared.models import ChatSession, Message, SessionEvent
from shared.transcripts import transcript
from shared.db import as_utc
from workers.store import SEQ_RESTART_IDLE_S, AlreadyStored, LeaseBusy, LeaseLost, now
from workers.maintenance import Maintenance
from test_turn import _hours, make_runner, msg, sent

LEASE = 30


def limits(runner) -> dict[str, int]:
    return runner.lease.history_limits


def test_the_claim_brings_the_first_ready_turn_with_its_context(database_url):
    r = make_runner(database_url, EchoAgent())
    assert r.handle(msg("one", seq=1)) == "replied"
    sid = r.store.accept(msg("two", seq=2)).session_id
    r.store.accept(msg("four", seq=4))  # waits for 3
    claim = r.store.claim(sid, LEASE, history_limits=limits(r))
    assert claim.outbox == ()
    assert claim.turn.message.text == "two" and not claim.turn.stored
    assert [(m.role, m.text) for m in claim.turn.history] == [("user", "one"), ("assistant", "echo: one")]
    assert claim.turn.claim.token == claim.token
    settled = r.store.commit_turn(claim.turn, "echo: two")
    assert [p.text for p in settled.replies] == ["echo: two"] and settled.more is False  # 4 waits for 3
    assert r.store.next_turn(claim, LEASE, history_limit=50) is None
    assert r.store.release(claim) is False


def test_the_claim_brings_unsent_replies_and_no_turn_when_the_head_waits(database_url):
    r = make_runner(database_url, EchoAgent())
    sid = r.store.accept(msg("one", seq=1)).session_id
    first = r.store.claim(sid, 0.01, history_limits=limits(r))
    r.store.commit_turn(first.turn, "echo: one")  # ... and the holder died before sending
    r.store.accept(msg("three", seq=3))
    time.sleep(0.05)
    claim = r.store.claim(sid, LEASE, history_limits=limits(r))
    assert [p.text for p in claim.outbox] == ["echo: one"]
    assert claim.outbox[0].chat_id == "5511" and claim.outbox[0].channel_id == "wa"
    assert claim.turn is None  # seq 3 waits for 2
    assert r.store.release(claim) is False  # nor is it ready: only the sweeper forces a gap
    forced = r.store.claim(sid, LEASE, history_limits=limits(r), force=True)
    assert forced.turn.message.text == "three"
    r.store.release(forced)


def test_a_commit_says_when_the_next_message_is_ready(database_url):
    r = make_runner(database_url, EchoAgent())
    sid = r.store.accept(msg("one", seq=1)).session_id
    r.store.accept(msg("two", seq=2))
    claim = r.store.claim(sid, LEASE, history_limits=limits(r))
    settled = r.store.commit_turn(claim.turn, None)  # a silent turn stores no reply
    assert settled.replies == () and settled.more is True
    turn = r.store.next_turn(claim, LEASE, history_limit=50)
    assert turn.message.text == "two" and turn.claim.last_seq == 1
    assert [m.text for m in turn.history] == ["one"]


def test_the_release_reports_a_message_that_came_in_while_the_holder_finished(database_url):
    r = make_runner(database_url, EchoAgent())
    sid = r.store.accept(msg("one", seq=1)).session_id
    claim = r.store.claim(sid, LEASE, history_limits=limits(r))
    settled = r.store.commit_turn(claim.turn, "echo: one")
    assert settled.more is False
    accepted = r.store.accept(msg("two", seq=2))  # its worker finds the lease taken ...
    with pytest.raises(LeaseBusy):
        r.store.claim(accepted.session_id, LEASE)
    assert r.store.release(claim) is True  # ... so the holder learns of it when it lets go
    again = r.store.claim(sid, LEASE, history_limits=limits(r))
    assert again.turn.message.text == "two"


def test_a_lost_lease_is_released_by_nobody(database_url):
    r = make_runner(database_url, EchoAgent())
    sid = r.store.accept(msg("one", seq=1)).session_id
    stale = r.store.claim(sid, 0.01)
    r.store.accept(msg("two", seq=2))
    time.sleep(0.05)
    current = r.store.claim(sid, LEASE)
    assert r.store.release(stale) is False  # not the holder: nothing released, nothing to do
    with pytest.raises(LeaseBusy):
        r.store.claim(sid, LEASE)
    r.store.release(current)


class Counter:
    """Database transactions and statements on the store's engine while the block runs."""

    def __init__(self, url: str):
        self.engine = engine_for(url)
        self.transactions = self.statements = 0

    def _begin(self, *_args) -> None:
        self.transactions += 1

    def _statement(self, *_args) -> None:
        self.statements += 1

    def _direct(self, conn, *_args) -> None:
        """A statement shared.db.execute ran straight on psycopg; on an autocommit connection, its own transaction
        (SQLAlchemy's begin event does not fire for it)."""
        self.statements += 1
        if autocommit(conn):
            self.transactions += 1

    def __enter__(self) -> Counter:
        event.listen(self.engine, "begin", self._begin)
        event.listen(self.engine, "before_cursor_execute", self._statement)
        STATEMENT_LISTENERS.append(self._direct)  # the turn's statements, run straight on psycopg
        return self

    def __exit__(self, *_exc) -> None:
        event.remove(self.engine, "begin", self._begin)
        event.remove(self.engine, "before_cursor_execute", self._statement)
        STATEMENT_LISTENERS.remove(self._direct)


def test_a_turn_takes_three_transactions(database_url):
    """accept with the claim (the lease is free: taken first, then the message joins the inbox, then the turn and
    its context are read), the commit (fenced, renewing the lease: the send right after it needs no fencing
    statement of its own), the release with the delivery recorded. On PostgreSQL each is one call of a function
    (migration 0007): three statements, three round trips."""
    r = make_runner(database_url, EchoAgent())
    r.handle(msg("one", seq=1))
    with Counter(database_url) as counted:
        assert r.handle(msg("two", seq=2)) == "replied"
    assert counted.transactions == 3
    sqlite_begins = counted.transactions if database_url.startswith("sqlite") else 0  # BEGIN IMMEDIATE statements
    assert counted.statements - sqlite_begins == (3 if database_url.startswith("postgresql") else 14)
    assert sent(r)[-1] == ("5511", "echo: two")
    assert transcript(database_url, "wa:dm:5511")[1][-1].delivery_status == "sent"


def test_a_busy_session_costs_its_accept_one_more_transaction(database_url):
    """The lease is held (a holder is busy): the message only joins the inbox, then the claim is tried on its own
    (the release protocol needs the message committed first); the holder takes it."""
    r = make_runner(database_url, EchoAgent())
    held = r.store.claim(r.store.accept(msg("one", seq=1)).session_id, LEASE)
    with Counter(database_url) as counted:
        assert r.handle(msg("two", seq=2)) == "queued"
    assert counted.transactions == 2
    r.store.release(held)


def test_a_backlog_takes_four_transactions_a_turn(database_url):
    r = make_runner(database_url, EchoAgent())
    r.handle(msg("one", seq=1))
    sid = r.store.accept(msg("two", seq=2)).session_id
    for i in range(3, 7):
        r.store.accept(msg(str(i), seq=i))
    with Counter(database_url) as counted:
        assert len(r.drain(sid)) == 5
    # claim + release (with the last delivery), then per turn a commit (it renews the lease: no fencing statement),
    # and for every turn but the first the next turn's read and the previous turn's delivery
    assert counted.transactions == 2 + 5 + 4 + 4
    assert [text for _, text in sent(r)][-5:] == [f"echo: {x}" for x in ("two", "3", "4", "5", "6")]


def test_accepting_into_an_active_session_does_not_wait_for_its_row(postgres_url):
    """A flooded session: its holder's transactions lock the session's row over and over; the flood's accepts
    must not queue behind them (nor behind each other)."""
    r = make_runner(postgres_url, EchoAgent())
    try:
        sid = r.store.accept(msg("one", seq=1)).session_id
        plain = postgres_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(plain) as holder:  # a transaction in the middle of the holder's commit
            holder.execute("UPDATE sessions SET message_count = message_count + 0, last_seq = last_seq "
                           "WHERE id = %s", (sid,))
            done = threading.Event()
            accepted = []

            def flood() -> None:
                accepted.append(r.store.accept(msg("two", seq=2)))
                done.set()
            t = threading.Thread(target=flood, daemon=True)
            t.start()
            assert done.wait(5), "accept waited on the session's row lock"
            holder.rollback()
        assert accepted[0].new and accepted[0].session_id == sid
    finally:
        with engine_for(postgres_url).begin() as conn:
            conn.exec_driver_sql("TRUNCATE dead_letters, session_events, messages, inbox, sessions, channels CASCADE")


def test_concurrent_first_messages_create_one_session(postgres_url):
    r = make_runner(postgres_url, EchoAgent())
    try:
        barrier = threading.Barrier(4)
        results = []

        def first(i: int) -> None:
            barrier.wait()
            results.append(r.store.accept(msg(f"hi {i}", seq=i + 1)))
        threads = [threading.Thread(target=first, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len({a.session_id for a in results}) == 1 and all(a.new for a in results)
        with transaction(postgres_url) as s:
            assert s.scalars(select(SessionEvent.event)).all() == ["created"]
    finally:
        with engine_for(postgres_url).begin() as conn:
            conn.exec_driver_sql("TRUNCATE dead_letters, session_events, messages, inbox, sessions, channels CASCADE")


def test_a_session_with_a_waiting_inbox_is_not_marked_dormant(database_url):
    r = make_runner(database_url, EchoAgent())
    r.handle(msg("one", seq=1))
    r.store.accept(msg("three", seq=3))  # waits for seq 2
    with transaction(database_url) as s:  # an hour passes
        s.execute(update(ChatSession).values(last_activity_at=now() - _hours(1)))
    assert Maintenance(r.store.url).mark_dormant("wa", idle_minutes=30) == 0
    assert transcript(database_url, "wa:dm:5511")[0].status == "active"


def test_accepting_leaves_the_activity_time_to_the_turn(database_url):
    r = make_runner(database_url, EchoAgent())
    r.handle(msg("one", seq=1))
    an_hour_ago = now() - _hours(1)
    with transaction(database_url) as s:
        s.execute(update(ChatSession).values(last_activity_at=an_hour_ago))
    r.store.accept(msg("three", seq=3))  # waits for seq 2: no turn yet

    def last_activity():
        return as_utc(transcript(database_url, "wa:dm:5511")[0].last_activity_at)
    assert abs((last_activity() - an_hour_ago).total_seconds()) < 1
    r.handle(msg("two", seq=2))  # both turns run
    assert (now() - last_activity()).total_seconds() < 60


def test_a_session_put_to_sleep_beside_an_accept_wakes_at_its_turn(database_url):
    """The dormancy sweep can read the inbox just before an accept commits into it; the claim then finds a
    dormant session with a waiting message and wakes it, with its event."""
    r = make_runner(database_url, EchoAgent())
    r.handle(msg("one", seq=1))
    sid = r.store.accept(msg("two", seq=2)).session_id
    with transaction(database_url) as s:
        s.execute(update(ChatSession).values(status="dormant"))
    assert r.drain(sid) == {msg_id_of(database_url, "two"): "replied"}
    summary, lines = transcript(database_url, "wa:dm:5511")
    assert summary.status == "active"
    assert [line.text for line in lines if line.kind == "event"] == ["created", "resumed"]


def msg_id_of(url: str, text: str) -> str:
    with transaction(url) as s:
        return s.scalar(select(Message.platform_message_id).where(Message.text == text))


def _kill_connections(url: str) -> int:
    """What a PostgreSQL restart does to the pooled connections of this process."""
    db = url.rsplit("/", 1)[1]
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as admin:
        return len(admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE datname = %s AND pid <> pg_backend_pid()", (db,)).fetchall())


def test_a_dead_pooled_connection_is_replaced_not_failed(postgres_url, monkeypatch):
    import shared.db

    r = make_runner(postgres_url, EchoAgent())
    retried = []
    monkeypatch.setattr(shared.db.log, "warning", lambda event, **kw: retried.append(event))
    try:
        assert r.handle(msg("one", seq=1)) == "replied"
        assert _kill_connections(postgres_url) >= 1  # the pool now holds a dead connection (used just now)
        assert r.handle(msg("two", seq=2)) == "replied"
        assert retried == ["db.stale_connection"]  # one attempt failed; the pool was invalidated, then all went on
        sid = r.store.accept(msg("three", seq=3)).session_id
        claim = r.store.claim(sid, LEASE)
        _kill_connections(postgres_url)
        r.store.renew(claim, LEASE)  # the single-statement (autocommit) path
        r.store.release(claim)
        assert retried == ["db.stale_connection"] * 2
        assert [text for _, text in sent(r)] == ["echo: one", "echo: two"]
    finally:
        with engine_for(postgres_url).begin() as conn:
            conn.exec_driver_sql("TRUNCATE dead_letters, session_events, messages, inbox, sessions, channels CASCADE")


def test_a_busy_moment_leaves_its_connections_open_for_the_next(postgres_url):
    """A pool of more threads than usual connections: the connections a burst opened are kept and reused, not
    closed at checkin and opened again (a fresh backend costs PostgreSQL a fork and its cached plans)."""
    engine = engine_for(postgres_url)
    engine.dispose()
    barrier = threading.Barrier(30)

    def burst() -> list[int]:
        pids: list[int] = []

        def hold() -> None:
            with engine.connect() as conn:
                pids.append(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar())
                barrier.wait(timeout=10)  # all 30 checked out at once

        threads = [threading.Thread(target=hold) for _ in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return pids

    try:
        first, second = burst(), burst()
        assert len(set(first)) == 30
        assert set(second) == set(first)
        assert engine.pool.checkedin() == 30
    finally:
        engine.dispose()  # the run's other tests share the database's connection slots


def test_the_bench_turn_profile_counts_a_turn(tmp_path):
    """`chatsessions bench --scenarios turn`, small, on SQLite: the figures the docs quote come from here."""
    from cli.bench.turn import print_turn_profile, profile_turns
    from shared.migrate import upgrade

    url = f"sqlite:///{tmp_path}/bench.db"
    upgrade(url)
    try:
        result = profile_turns(url, turns=20, sessions=5, warmup=4)
    finally:
        engine_for(url).dispose()
    assert result["outcomes"] == {"replied": 20} and result["replies_sent"] == 20
    assert result["per_turn"]["transactions"] == 3 and result["cpu_ms_per_turn"] > 0
    assert "store.accept" in result["parts"] and "store.commit_turn" in print_turn_profile(result)


def test_a_connection_idle_in_the_pool_is_pinged_before_use(postgres_url, monkeypatch):
    import shared.db

    r = make_runner(postgres_url, EchoAgent())
    try:
        assert r.handle(msg("one", seq=1)) == "replied"
        monkeypatch.setattr(shared.db, "IDLE_PING_S", 0.0)  # every pooled connection counts as idle
        _kill_connections(postgres_url)
        retried = []
        monkeypatch.setattr(shared.db.log, "warning", lambda event, **kw: retried.append(event))
        assert r.handle(msg("two", seq=2)) == "replied"
        assert retried == []  # replaced at checkout, before any work ran on it
    finally:
        with engine_for(postgres_url).begin() as conn:
            conn.exec_driver_sql("TRUNCATE dead_letters, session_events, messages, inbox, sessions, channels CASCADE")


def test_pending_replies_lists_the_outbox(database_url):
    r = make_runner(database_url, EchoAgent())
    sid = r.store.accept(msg("one", seq=1)).session_id
    claim = r.store.claim(sid, LEASE, history_limits=limits(r))
    settled = r.store.commit_turn(claim.turn, "echo: one")
    assert r.store.pending_replies(sid) == list(settled.replies)


# -- the ingress's counter restarted (SEQ_TTL_S): the session's order starts over --------------------------------------

def _session_of(url: str, key: str = "wa:dm:5511") -> ChatSession:
    with transaction(url) as s:
        return s.scalars(select(ChatSession).where(ChatSession.key == key)).one()


def _idle_for(url: str, seconds: float, key: str = "wa:dm:5511") -> None:
    """As if the session's last turn had committed `seconds` ago."""
    with transaction(url) as s:
        s.execute(update(ChatSession).where(ChatSession.key == key)
                  .values(last_activity_at=now() - timedelta(seconds=seconds)))


def test_a_restarted_counter_is_ordered_again(database_url):
    """The session's counter expired after a long silence; the next messages are numbered 1, 2 again. Arriving out
    of order (2 before 1), 2 waits for 1, as it would in any session — not run at once as a replay of an old 2."""
    r = make_runner(database_url, EchoAgent())
    for n, text in enumerate(["one", "two", "three"], 1):
        assert r.handle(msg(text, seq=n)) == "replied"
    _idle_for(database_url, SEQ_RESTART_IDLE_S + 60)
    assert r.handle(msg("five", seq=2)) == "queued"  # waits for the new 1
    assert _session_of(database_url).last_seq == 0
    assert r.handle(msg("four", seq=1)) == "replied"
    assert [text for _, text in sent(r)][-2:] == ["echo: four", "echo: five"]
    assert _session_of(database_url).last_seq == 2
    assert r.handle(msg("six", seq=3)) == "replied"  # and on from there


@pytest.mark.parametrize("case", ["active", "already stored", "inbox waiting", "above last_seq"])
def test_the_order_starts_over_only_for_a_restarted_counter(database_url, case):
    r = make_runner(database_url, EchoAgent())
    first = msg("one", seq=1)
    for m in (first, msg("two", seq=2), msg("three", seq=3)):
        r.handle(m)
    if case != "active":
        _idle_for(database_url, SEQ_RESTART_IDLE_S + 60)
    late = {
        "active": msg("a replay, or a message passed by a gap", seq=2),  # recent activity: no restart possible
        "already stored": msg("one", seq=1, pid=first.platform_message_id),  # a (very) late redelivery
        "above last_seq": msg("four", seq=4),  # the counter did not restart: the next number
    }.get(case)
    if case == "inbox waiting":
        r.store.accept(msg("five", seq=5))  # waits for 4 (its turn decides; the inbox is not reordered)
        late = msg("two again", seq=2)
    r.store.accept(late)
    assert _session_of(database_url).last_seq == 3


def test_reading_stored_times_keeps_none_of_them():
    """Every stored message has its own time: a worker that converts them (history, transcripts) must not keep them
    (an unbounded cache here grew with every conversation a worker had read)."""
    import tracemalloc
    from datetime import datetime, timezone

    zone = timezone(timedelta(hours=-3))
    times = [datetime(2026, 1, 1, tzinfo=zone) + timedelta(microseconds=i) for i in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for t in times:
            assert as_utc(t).tzinfo is timezone.utc
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 200_000, f"{kept} bytes kept after converting {len(times)} times"


class _Recorder:
    """Echoes, but stays silent on "quiet ..."; keeps what each turn showed it (its history)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, list[tuple[str, str]]]] = []

    def reply(self, conversation) -> str | None:
        self.seen.append((conversation.message.text, [(u.role, u.text) for u in conversation.history]))
        return None if conversation.message.text.startswith("quiet") else f"echo: {conversation.message.text}"


def _conversation(url: str, user: str, functions: bool) -> dict:
    """One session's life through the store, with PostgreSQL's turn functions (migration 0007) or the statements:
    a new session, an unanswered message, a history longer than its limit, a redelivery, a message queued behind a
    held lease, a dormant session woken, a turn that lost its lease. What was stored, sent and shown to the Agent."""
    agent = _Recorder()
    r = make_runner(url, agent, history_limit=3)
    r.store._calls = functions
    first = msg("one", user=user, seq=1)
    outcomes = [r.handle(first), r.handle(msg("quiet two", user=user, seq=2))]
    outcomes += [r.handle(msg(text, user=user, seq=seq)) for seq, text in enumerate(("three", "four", "five"), 3)]
    outcomes.append(r.handle(first))  # a redelivery of an answered message
    sid = r.store.accept(msg("six", user=user, seq=6)).session_id
    held = r.store.claim(sid, LEASE)
    outcomes.append(r.handle(msg("seven", user=user, seq=7)))  # queued: the lease is held
    assert r.store.release(held) is True  # both wait in the inbox
    outcomes += sorted(r.drain(sid).values())
    with transaction(url) as s:
        s.execute(update(ChatSession).where(ChatSession.key == f"wa:dm:{user}").values(status="dormant"))
    outcomes.append(r.handle(msg("eight", user=user, seq=8)))
    stale = r.store.accept(msg("nine", user=user, seq=9), r.lease).claim
    assert stale is not None and stale.turn is not None
    with transaction(url) as s:  # another holder took over meanwhile
        s.execute(update(ChatSession).where(ChatSession.id == sid).values(lease_token=ChatSession.lease_token + 1))
    with pytest.raises(LeaseLost):
        r.store.commit_turn(stale.turn, "echo: nine")
    return {"outcomes": outcomes, "sent": [text for _, text in sent(r)], "seen": agent.seen, **_stored(url, sid, user)}


def _burst(url: str, user: str, functions: bool) -> dict:
    """A channel with burst = "collect": messages that waited behind a held lease make one turn."""
    agent = _Recorder()
    r = make_runner(url, agent, burst="collect")
    r.store._calls = functions
    outcomes = [r.handle(msg("one", user=user, seq=1))]
    sid = r.store.accept(msg("two", user=user, seq=2)).session_id
    held = r.store.claim(sid, LEASE)
    outcomes += [r.handle(msg(text, user=user, seq=seq)) for seq, text in ((3, "three"), (4, "four"))]
    assert r.store.release(held) is True
    outcomes += sorted(r.drain(sid).values())
    outcomes.append(r.handle(msg("five", user=user, seq=5)))
    return {"outcomes": outcomes, "sent": [text for _, text in sent(r)], "seen": agent.seen, **_stored(url, sid, user)}


def _stored(url: str, sid: int, user: str) -> dict:
    """Every column a turn writes, of one session's rows (ids and times as what they point at, or whether set; the
    user's id as "user")."""
    with engine_for(url).connect() as conn:
        session = conn.exec_driver_sql(
            "SELECT status, generation, message_count, last_seq, lease_until IS NULL, mode, operator, notice_sent "
            "FROM sessions WHERE id = %(s)s", {"s": sid}).one()
        messages = conn.exec_driver_sql(
            "SELECT m.generation, m.position, m.role, m.sender_id, m.sender_name, m.text, m.channel_id, m.chat_id, "
            "m.chat_kind, m.thread_id, m.platform_message_id IS NULL, m.ingress_seq, r.position, m.delivery_status, "
            "m.delivery_error, m.delivery_attempts, m.user_sent_at IS NULL, m.delivered_at IS NULL "
            "FROM messages m LEFT JOIN messages r ON r.id = m.in_reply_to WHERE m.session_id = %(s)s "
            "ORDER BY m.position", {"s": sid}).all()
        events = conn.exec_driver_sql("SELECT generation, event, actor, detail FROM session_events "
                                      "WHERE session_id = %(s)s ORDER BY id", {"s": sid}).all()
        inbox = conn.exec_driver_sql("SELECT seq FROM inbox WHERE session_id = %(s)s ORDER BY seq", {"s": sid}).all()
    def plain(rows) -> list[tuple]:
        return [tuple("user" if value == user else value for value in row) for row in rows]
    return {"session": tuple(session), "messages": plain(messages), "events": plain(events), "inbox": plain(inbox)}


def test_the_turn_functions_do_what_the_statements_do(clean_postgres_url):
    """On PostgreSQL a turn's three transactions are function calls for the common case; everything else takes the
    statements SQLite runs. Played both ways, one session's life leaves the same trace, column by column."""
    with_functions = _conversation(clean_postgres_url, "5511", functions=True)
    with_statements = _conversation(clean_postgres_url, "5522", functions=False)
    assert with_functions == with_statements
    assert with_functions["outcomes"][:6] == ["replied", "silent", "replied", "replied", "replied", "duplicate"]
    assert with_functions["seen"][4] == ("five", [("assistant", "echo: three"), ("user", "four"),
                                                  ("assistant", "echo: four")])  # the newest 3 (history_limit)
    assert [e[1] for e in with_functions["events"]] == ["created", "resumed"]
    assert with_functions["inbox"] == [(9,)]  # the stale holder's message waits for the next one
    assert _burst(clean_postgres_url, "5533", functions=True) == _burst(clean_postgres_url, "5544", functions=False)


def test_a_message_stored_meanwhile_is_not_stored_twice_by_the_function(clean_postgres_url):
    """The commit's call refuses a platform message id stored since the turn was read (AlreadyStored), and
    applies nothing: the inbox keeps the message for its redelivery turn."""
    r = make_runner(clean_postgres_url, EchoAgent())
    r.handle(msg("one", seq=1))
    claim = r.store.accept(msg("two", seq=2, pid="wamid.twice"), r.lease).claim
    with transaction(clean_postgres_url) as s:
        row = s.scalars(select(Message).where(Message.text == "one")).first()
        s.add(Message(session_id=row.session_id, generation=1, position=99, role="user", sender_id="x",
                      sender_name="x", text="two", channel_id="wa", platform_message_id="wamid.twice",
                      created_at=now()))
    with pytest.raises(AlreadyStored):
        r.store.commit_turn(claim.turn, "echo: two")
    assert transcript(clean_postgres_url, "wa:dm:5511")[0].message_count == 2  # the failed call changed nothing


@pytest.mark.parametrize("functions", [True, False])
def test_another_refused_insert_is_an_error_not_a_duplicate(clean_postgres_url, functions):
    """Only the platform id's constraint means "stored already". Any other refusal (here: the position a commit
    takes is taken) stays an error, so the turn is retried, then dead-lettered — never dropped as a duplicate,
    although PostgreSQL's message of an error inside a function quotes the INSERT's column names."""
    r = make_runner(clean_postgres_url, EchoAgent())
    r.store._calls = functions
    r.handle(msg("one", seq=1))
    claim = r.store.accept(msg("two", seq=2), r.lease).claim
    with transaction(clean_postgres_url) as s:
        row = s.scalars(select(Message).where(Message.text == "one")).first()
        s.add(Message(session_id=row.session_id, generation=1, position=2, role="user", sender_id="x",
                      sender_name="x", text="squatter", channel_id="wa", platform_message_id="wamid.other",
                      created_at=now()))
    with pytest.raises(IntegrityError) as refused:
        r.store.commit_turn(claim.turn, "echo: two")
    assert "uq_messages_session_position" in str(refused.value.orig)


def test_a_schema_without_the_turn_functions_takes_the_statements(monkeypatch):
    """Workers started on this code before `chatsessions db upgrade` (a database at migration 0006) still answer,
    with the statements, and say what to run."""
    from alembic import command

    import workers.store
    from conftest import fresh_database
    from shared.migrate import alembic_config

    warned = []
    monkeypatch.setattr(workers.store.log, "warning", lambda event, **kw: warned.append(event))
    with fresh_database("chatsessions_0006") as url:
        command.downgrade(alembic_config(url), "0006")
        r = make_runner(url, EchoAgent())
        r.handle(msg("one", seq=1))
        with Counter(url) as counted:
            assert r.handle(msg("two", seq=2)) == "replied"
        assert counted.statements == 14 and warned == ["store.turn_functions_missing"]
        command.upgrade(alembic_config(url), "head")
        assert workers.store.Store(url)._functions() is False  # known per process: used after a restart
