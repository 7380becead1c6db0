"""The turn and the session lifecycle as plain code, on the real SQLite and PostgreSQL stores."""

from __future__ import annotations

import threading
import time

import pytest
from channel_helpers import Reply, StandIn, make_config
from sqlalchemy import select, update

from workers.agents import DemoAgent, EchoAgent
from shared.channels.whatsapp import WhatsAppChannel
from shared.config import ChannelConfig, SessionOptions
from shared.db import transaction
from shared.messages import DM, GROUP, NEW_SESSION, InboundMessage
from shared.models import ChatSession, Message, SessionEvent
from shared.transcripts import dead_letters, drop_dead_letter, transcript
from workers.store import LeaseBusy, LeaseLost, Store, now
from workers.maintenance import Maintenance
from workers.testing import RecordingChannel, settings_for
from workers.runner import TurnRunner


def make_runner(url: str, agent=None, **session) -> TurnRunner:
    """A runner with one WhatsApp channel "wa"; `session` sets its [channels.session] options."""
    options = {"idle_minutes": 30, "history_limit": 50, "group_reply": "always"} | session
    config = ChannelConfig(id="wa", platform="whatsapp", agent="demo", api_base="http://unused", secrets={},
                           options={}, session=SessionOptions(**options))
    store = Store(url)
    store.sync_channels([config])
    return TurnRunner(settings_for(url, [config]), store, {"wa": RecordingChannel(config)}, {"wa": agent or DemoAgent()})


_ids = iter(range(10**6))


def msg(text: str, user: str = "5511", seq: int = 1, kind: str = DM, chat: str | None = None, name: str = "Ana",
        command: str | None = None, pid: str | None = None, addressed: bool = True,
        sent_at: float | None = None) -> InboundMessage:
    chat = chat or user
    return InboundMessage(
        channel_id="wa", platform="whatsapp", session_key=f"wa:{kind}:{chat}", chat_id=chat, chat_kind=kind,
        sender_id=user, sender_name=name, text=text, platform_message_id=pid or f"wamid.{next(_ids)}",
        sent_at=time.time() if sent_at is None else sent_at, command=command, seq=seq, addressed=addressed,
    )


def sent(runner: TurnRunner) -> list[tuple[str, str]]:
    return runner.channels["wa"].sent


def test_first_message_creates_an_active_session_and_replies(database_url):
    r = make_runner(database_url)
    assert r.handle(msg("hi, my name is Ana")) == "replied"
    assert sent(r) == [("5511", "Nice to meet you, Ana! How can I help?")]
    summary, lines = transcript(database_url, "wa:dm:5511")
    assert summary.status == "active" and summary.generation == 1
    assert [line.kind for line in lines] == ["event", "user", "assistant"]
    assert lines[0].text == "created" and lines[2].delivery_status == "sent"


def test_context_is_per_session(database_url):
    r = make_runner(database_url)
    r.handle(msg("my order 48213 has not arrived", user="ana", seq=1))
    r.handle(msg("my order 77120 is late", user="bruno", seq=1))
    r.handle(msg("where is my order?", user="bruno", seq=2))
    r.handle(msg("where is my order?", user="ana", seq=2))
    replies = dict()
    for chat, text in sent(r):
        replies.setdefault(chat, []).append(text)
    assert "77120" in replies["bruno"][-1] and "48213" not in " ".join(replies["bruno"])
    assert "48213" in replies["ana"][-1] and "77120" not in " ".join(replies["ana"])


def test_group_members_share_context_and_senders_are_kept(database_url):
    r = make_runner(database_url)
    r.handle(msg("our order 55501 is missing", user="bruno", name="Bruno", kind=GROUP, chat="grp1", seq=1))
    r.handle(msg("where is the order?", user="carla", name="Carla", kind=GROUP, chat="grp1", seq=2))
    assert sent(r)[-1] == ("grp1", "Carla, your order 55501 is on its way and should arrive within 2 days.")
    _, lines = transcript(database_url, "wa:group:grp1")
    assert [(line.kind, line.sender_name) for line in lines if line.kind == "user"] == [("user", "Bruno"), ("user", "Carla")]


def test_new_session_drops_context_but_keeps_history(database_url):
    r = make_runner(database_url)
    r.handle(msg("my name is Chen", seq=1))
    assert r.handle(msg("/new", seq=2, command=NEW_SESSION)) == "new_session"
    r.handle(msg("what is my name?", seq=3))
    assert sent(r)[-1][1] == "You haven't told me your name yet."
    summary, lines = transcript(database_url, "wa:dm:5511")
    assert summary.generation == 2
    assert [line.text for line in lines if line.generation == 1 and line.kind == "user"] == ["my name is Chen", "/new"]
    assert any(line.kind == "event" and line.text == "new_session" for line in lines)


def test_dormant_session_resumes_with_context(database_url):
    r = make_runner(database_url)
    r.handle(msg("my order 48213", seq=1))
    with transaction(database_url) as s:  # an hour passes
        s.execute(update(ChatSession).values(last_activity_at=now() - _hours(1)))
    assert Maintenance(r.store.url).mark_dormant("wa", idle_minutes=30, batch=1) == 1
    assert transcript(database_url, "wa:dm:5511")[0].status == "dormant"
    r.handle(msg("where is my order?", seq=2))
    assert "48213" in sent(r)[-1][1]
    summary, lines = transcript(database_url, "wa:dm:5511")
    assert summary.status == "active" and summary.generation == 1
    assert [line.text for line in lines if line.kind == "event"] == ["created", "dormant", "resumed"]


def test_dormancy_sweeps_in_batches_and_skips_recent(database_url):
    r = make_runner(database_url)
    for i in range(5):
        r.handle(msg("hello", user=f"u{i}"))
    with transaction(database_url) as s:
        s.execute(update(ChatSession).where(ChatSession.key != "wa:dm:u4")
                  .values(last_activity_at=now() - _hours(1)))
    assert Maintenance(r.store.url).mark_dormant("wa", idle_minutes=30, batch=2) == 4
    assert transcript(database_url, "wa:dm:u4")[0].status == "active"


def test_redelivered_message_is_not_a_second_turn(database_url):
    r = make_runner(database_url, EchoAgent())
    m = msg("hello", seq=1)
    assert r.handle(m) == "replied"
    assert r.handle(m) == "duplicate"
    assert len(sent(r)) == 1
    with transaction(database_url) as s:
        assert s.scalar(select(Message.id).where(Message.role == "user").limit(2)) is not None
        assert len(s.scalars(select(Message.id)).all()) == 2


def test_unsent_reply_is_sent_when_the_message_is_redelivered(database_url):
    r = make_runner(database_url, EchoAgent())
    r.channels["wa"].ok = False
    m = msg("hello", seq=1)
    r.handle(m)
    with transaction(database_url) as s:  # as if the worker died between commit and send
        s.execute(update(Message).where(Message.role == "assistant").values(delivery_status="pending"))
    r.channels["wa"].ok = True
    assert r.handle(m) == "duplicate"
    assert sent(r)[-1] == ("5511", "echo: hello")
    assert transcript(database_url, "wa:dm:5511")[1][-1].delivery_status == "sent"


def test_a_reply_is_sent_again_under_its_stored_id(database_url):
    """The channel gets the stored reply's id with every send, the same for a holder that sends it again, so a
    platform that recognises a resend (Discord's enforced nonce) posts it once."""
    r = make_runner(database_url, EchoAgent())
    m = msg("hello", seq=1)
    r.handle(m)
    with transaction(database_url) as s:  # as if the worker died after the send, before recording it
        reply_id = s.scalar(select(Message.id).where(Message.role == "assistant"))
        s.execute(update(Message).where(Message.role == "assistant").values(delivery_status="pending"))
    r.handle(m)
    assert r.channels["wa"].reply_ids == [reply_id, reply_id]


def test_stale_holder_cannot_commit(database_url):
    store = make_runner(database_url).store
    accepted = store.accept(msg("hello", seq=1))
    first = store.claim(accepted.session_id, lease_seconds=0.01)
    stale_turn = store.next_turn(first, 0.01, history_limit=10)
    time.sleep(0.05)
    second = store.claim(accepted.session_id, lease_seconds=30)  # the lease expired: a new holder takes over
    assert second.token == first.token + 1
    with pytest.raises(LeaseLost):
        store.commit_turn(stale_turn, "late reply")
    with pytest.raises(LeaseLost):
        store.next_turn(first, 30, history_limit=10)
    with pytest.raises(LeaseBusy):
        store.claim(accepted.session_id, lease_seconds=30)
    store.commit_turn(store.next_turn(second, 30, history_limit=10), "reply")
    with transaction(database_url) as s:
        assert s.scalars(select(Message.text).where(Message.role == "assistant")).all() == ["reply"]


def test_a_message_arriving_while_the_session_is_held_is_taken_by_the_holder(database_url):
    r = make_runner(database_url, EchoAgent())
    first, second = msg("one", seq=1), msg("two", seq=2)
    held = r.store.claim(r.store.accept(first).session_id, lease_seconds=30)  # a turn in progress elsewhere
    assert r.handle(second) == "queued"  # no thread waits: it joins the inbox
    r.store.release(held)
    assert r.handle(first) == "replied"  # whoever holds the session next takes both, in order
    assert [text for _, text in sent(r)] == ["echo: one", "echo: two"]


def test_a_later_message_waits_for_an_earlier_one_then_both_run_in_order(database_url):
    r = make_runner(database_url, EchoAgent())
    assert r.handle(msg("two", seq=2)) == "queued"  # seq 1 has not arrived yet
    assert sent(r) == []
    assert r.handle(msg("one", seq=1)) == "replied"
    assert [text for _, text in sent(r)] == ["echo: one", "echo: two"]


def test_a_gap_is_passed_only_when_forced(database_url):
    r = make_runner(database_url, EchoAgent())
    accepted = r.store.accept(msg("three", seq=3))  # seq 1 and 2 never arrive
    assert r.drain(accepted.session_id) == {}
    assert Maintenance(r.store.url).stalled(grace_s=0, order_wait_s=3600) == [(accepted.session_id, "wa:dm:5511", False)]
    assert Maintenance(r.store.url).stalled(grace_s=0, order_wait_s=0)[0][2] is True
    assert list(r.drain(accepted.session_id, force=True).values()) == ["replied"]
    assert r.handle(msg("four", seq=4)) == "replied"
    assert [text for _, text in sent(r)] == ["echo: three", "echo: four"]


def test_turns_of_one_session_run_in_seq_order_even_if_started_out_of_order(database_url):
    r = make_runner(database_url, EchoAgent())
    messages = [msg(f"m{i}", seq=i) for i in range(1, 6)]
    threads = [threading.Thread(target=r.handle, args=(m,)) for m in reversed(messages)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join(timeout=30)
    assert [text for _, text in sent(r)] == [f"echo: m{i}" for i in range(1, 6)]


class Flaky:
    """Raises for messages containing "poison"; fails `transient` times before answering the others."""

    def __init__(self, transient: int = 0):
        self.transient = transient
        self.calls = 0

    def reply(self, conversation):
        self.calls += 1
        if "poison" in conversation.message.text:
            raise RuntimeError("model cannot handle this")
        if self.transient:
            self.transient -= 1
            raise TimeoutError("model timed out")
        return f"ok: {conversation.message.text}"


def test_transient_agent_failure_is_retried_in_place(database_url):
    r = make_runner(database_url, Flaky(transient=2))
    r.agent_backoff_s = 0.01
    assert r.handle(msg("hello", seq=1)) == "replied"
    assert sent(r) == [("5511", "ok: hello")]


def test_poison_message_is_dead_lettered_and_the_session_goes_on(database_url):
    agent = Flaky()
    r = make_runner(database_url, agent)
    r.agent_backoff_s = 0.01
    poison = msg("poison pill", seq=1)
    assert r.handle(poison) == "dead_lettered"
    assert agent.calls == r.agent_attempts
    assert r.handle(msg("hello again", seq=2)) == "replied"  # no gap to wait for: seq 1 is settled
    assert sent(r) == [("5511", "ok: hello again")]
    [letter] = dead_letters(database_url)
    assert letter.message == poison and "model cannot handle this" in letter.error
    assert letter.attempts == r.agent_attempts
    assert drop_dead_letter(database_url, letter.id) and not dead_letters(database_url)


def test_a_replayed_dead_letter_that_fails_again_stays_visible(database_url):
    r = make_runner(database_url, Flaky())
    r.agent_backoff_s = 0.01
    poison = msg("poison pill", seq=1)
    r.handle(poison)
    [read] = dead_letters(database_url)  # the operator's replay read the letter and published it ...
    time.sleep(0.01)
    assert r.handle(poison) == "dead_lettered"  # ... and a worker failed on it again before the letter was dropped
    assert not drop_dead_letter(database_url, read.id, unchanged_since=read.created_at)
    [again] = dead_letters(database_url)
    assert again.message == poison and again.created_at > read.created_at


@pytest.mark.parametrize("sent_at", [float("inf"), float("nan"), 1e400, -1e300])
def test_a_message_the_store_cannot_take_is_dead_lettered_and_the_session_goes_on(database_url, sent_at):
    """A send time no datetime can hold once failed the turn's commit for ever: the message stayed at the inbox head,
    and every sweep ran the Agent again. Now it is set aside at once and the next message is answered."""
    r = make_runner(database_url, EchoAgent())
    bad = msg("when?", seq=1, sent_at=sent_at)
    assert r.handle(bad) == "dead_lettered"
    assert Maintenance(r.store.url).stalled(grace_s=0, order_wait_s=0) == []  # nothing left for the sweeper to run again
    assert r.handle(msg("hello", seq=2)) == "replied"
    assert sent(r) == [("5511", "echo: hello")]
    [letter] = dead_letters(database_url)
    assert letter.platform_message_id == bad.platform_message_id and letter.attempts == 1
    assert letter.error.startswith("not retryable: ") and letter.message.text == "when?"


def test_unexpected_failure_releases_the_lease_and_keeps_the_message(database_url):
    r = make_runner(database_url, EchoAgent())
    channel = r.channels["wa"]

    def broken_send(*_args, **_kwargs):  # a bug outside the Agent: KeyError while sending
        raise KeyError("bug")

    channel.send = broken_send
    with pytest.raises(KeyError):
        r.handle(msg("hello", seq=1))
    del channel.send
    assert r.handle(msg("hello again", seq=2)) == "replied"  # not blocked behind a held lease
    assert [text for _, text in sent(r)] == ["echo: hello", "echo: hello again"]  # nothing lost, in order
    with transaction(database_url) as s:
        assert s.scalar(select(SessionEvent.event)) == "created"


def _hours(n: float):
    from datetime import timedelta

    return timedelta(hours=n)


def test_stale_holder_does_not_send(database_url):
    r = make_runner(database_url, EchoAgent())
    claim = r.store.claim(r.store.accept(msg("hello", seq=1)).session_id, lease_seconds=30)
    settled = r.store.commit_turn(r.store.next_turn(claim, 30, history_limit=10), "echo: hello")
    with transaction(database_url) as s:  # another holder took the session over meanwhile
        s.execute(update(ChatSession).values(lease_token=ChatSession.lease_token + 1))
    with pytest.raises(LeaseLost):
        r.dispatch(claim, settled.replies)
    assert sent(r) == []


def test_orphaned_replies_are_found_and_sent_once(database_url):
    r = make_runner(database_url, EchoAgent())
    session_id = r.store.accept(msg("hello", seq=1)).session_id
    claim = r.store.claim(session_id, lease_seconds=0.01)
    r.store.commit_turn(r.store.next_turn(claim, 0.01, history_limit=10), "echo: hello")  # ... then the worker died
    time.sleep(0.05)
    assert Maintenance(r.store.url).stale_outbox(older_than_s=0) == [(session_id, "wa:dm:5511")]
    r.drain(session_id)
    assert sent(r) == [("5511", "echo: hello")]
    assert Maintenance(r.store.url).stale_outbox(older_than_s=0) == []
    r.drain(session_id)
    assert len(sent(r)) == 1


def test_messages_stranded_by_a_dead_holder_are_found(database_url):
    r = make_runner(database_url, EchoAgent())
    session_id = r.store.accept(msg("one", seq=1)).session_id
    r.store.claim(session_id, lease_seconds=0.01)  # the holder dies before taking the inbox
    r.store.accept(msg("two", seq=2))
    time.sleep(0.05)
    assert Maintenance(r.store.url).stalled(grace_s=0, order_wait_s=3600) == [(session_id, "wa:dm:5511", False)]
    r.drain(session_id)
    assert [text for _, text in sent(r)] == ["echo: one", "echo: two"]
    assert Maintenance(r.store.url).stalled(grace_s=0, order_wait_s=0) == []


def test_a_stopping_worker_starts_no_new_turn_and_leaves_the_inbox_to_the_next_owner(database_url):
    r = make_runner(database_url, EchoAgent())
    held = r.store.claim(r.store.accept(msg("one", seq=1)).session_id, lease_seconds=30)
    r.store.accept(msg("two", seq=2))
    r.store.release(held)
    r.stopping.set()  # warm shutdown began
    assert r.drain(held.session_id) == {}
    assert sent(r) == []
    r.stopping.clear()  # the next owner of the partition
    assert list(r.drain(held.session_id).values()) == ["replied", "replied"]
    assert [text for _, text in sent(r)] == ["echo: one", "echo: two"]


class _TakeoverWhilePacing:
    """A rate limiter that makes the first send wait, and while it waits another holder takes the session."""

    def __init__(self, url: str):
        self.url, self.waited = url, False

    def try_take(self, buckets) -> float:
        if self.waited:
            return 0.0
        self.waited = True
        with transaction(self.url) as s:  # the lease expired during the wait and a new holder claimed it
            s.execute(update(ChatSession).values(lease_token=ChatSession.lease_token + 1))
        return 0.01


def test_a_holder_that_loses_the_session_while_paced_sends_nothing(database_url):
    r = make_runner(database_url, EchoAgent())
    with StandIn(default=Reply(body={"messages": [{"id": "wamid.out"}]})) as platform:
        config = make_config("whatsapp", "wa", api_base=platform.base)
        r.channels = {"wa": WhatsAppChannel(config, _TakeoverWhilePacing(database_url))}
        claim = r.store.claim(r.store.accept(msg("hello", seq=1)).session_id, lease_seconds=30)
        settled = r.store.commit_turn(r.store.next_turn(claim, 30, history_limit=10), "echo: hello")
        with pytest.raises(LeaseLost):
            r.dispatch(claim, settled.replies)
        assert platform.requests == []  # the fencing check runs after the pacing wait, right before the POST
    assert transcript(database_url, "wa:dm:5511")[1][-1].delivery_status == "pending"  # the new holder sends it


def test_a_holder_paused_inside_the_renewal_does_not_send(database_url):
    r = make_runner(database_url, EchoAgent())
    claim = r.store.claim(r.store.accept(msg("hello", seq=1)).session_id, lease_seconds=0.2)
    settled = r.store.commit_turn(r.store.next_turn(claim, 0.2, history_limit=10), "echo: hello")
    renew = r.store.renew

    def paused_renew(c, lease_seconds):  # the database answered, then the process was stopped for a while
        renew(c, lease_seconds)
        time.sleep(lease_seconds / 2 + 0.1)

    r.store.renew = paused_renew
    with pytest.raises(LeaseLost):
        r.dispatch(claim, settled.replies)
    assert sent(r) == []


def test_a_reply_sent_while_the_database_was_down_is_not_sent_again_by_the_next_holder(database_url):
    from sqlalchemy.exc import OperationalError

    from workers.deliveries import MemoryJournal

    journal = MemoryJournal()  # production: RedisJournal, shared by every worker
    first = make_runner(database_url, EchoAgent())
    first.journal = journal
    recorded = first.store.mark_delivery

    def database_down(reply_id, delivery, retry_for_s=60.0):
        raise OperationalError("UPDATE messages", {}, Exception("the database is restarting"))

    released = first.store.release

    def release(claim, deliveries=()):  # the release would record the outcome with it: the database is gone
        if deliveries:
            raise OperationalError("UPDATE messages", {}, Exception("the database is restarting"))
        return released(claim)

    first.store.mark_delivery, first.store.release = database_down, release  # the sender gives up (or dies)
    with pytest.raises(OperationalError):
        first.handle(msg("hello", seq=1))
    assert sent(first) == [("5511", "echo: hello")]
    first.store.mark_delivery, first.store.release = recorded, released

    successor = make_runner(database_url, EchoAgent())
    successor.journal = journal
    [session_id] = [s for s in _session_ids(database_url)]
    successor.drain(session_id)
    assert sent(successor) == []  # the journal said it went out: recorded, not resent
    assert transcript(database_url, "wa:dm:5511")[1][-1].delivery_status == "sent"

    unaware = make_runner(database_url, EchoAgent())  # control: without the note, the reply would go out twice
    with transaction(database_url) as s:
        s.execute(update(Message).where(Message.role == "assistant").values(delivery_status="pending"))
    unaware.drain(session_id)
    assert sent(unaware) == [("5511", "echo: hello")]


def _session_ids(url: str) -> list[int]:
    with transaction(url) as s:
        return list(s.scalars(select(ChatSession.id)))


def test_a_busy_connection_pool_is_waited_out_not_dead_lettered(database_url):
    """Many turns at once (greenlets) can wait longer than the pool's timeout for a connection: SQLAlchemy's
    TimeoutError is transient like an unavailable database (the task retries), never a reason to set a message
    aside."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    r = make_runner(database_url, EchoAgent())
    commit = r.store.commit_turn

    def pool_exhausted(*_args, **_kwargs):
        raise PoolTimeout("QueuePool limit of size 40 overflow 0 reached, connection timed out, timeout 30.00")

    r.store.commit_turn = pool_exhausted
    with pytest.raises(PoolTimeout):
        r.handle(msg("hello", seq=1))
    r.store.commit_turn = commit
    assert dead_letters(database_url) == []
    assert [sid for sid, _, _ in Maintenance(r.store.url).stalled(grace_s=0, order_wait_s=3600)]  # left for the retry / sweeper
