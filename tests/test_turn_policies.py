"""The session policies a turn applies ([channels.session]: group_reply, history budget, resets, bursts, routing,
retention, the WhatsApp window), as plain code on the real SQLite and PostgreSQL stores."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import timedelta

from sqlalchemy import select, update

from workers.agents import DemoAgent, EchoAgent
from shared.config import ChannelConfig, SessionOptions
from shared.db import transaction
from shared.messages import DM, GROUP, InboundMessage
from shared.models import ChatSession, Message
from shared.transcripts import transcript
from workers.store import Store, now
from workers.maintenance import Maintenance
from test_turn import make_runner, msg, sent
from workers.testing import RecordingChannel, settings_for
from workers.runner import TurnRunner
from workers.turn import NEW_SESSION_REPLY


class Recording:
    """An Agent that remembers every Conversation it was given and echoes."""

    def __init__(self):
        self.seen = []

    def reply(self, conversation):
        self.seen.append(conversation)
        return f"echo: {conversation.message.text}"


def group(text: str, seq: int, *, name: str = "Bruno", addressed: bool = False, **kw):
    return msg(text, user=name.lower(), name=name, kind=GROUP, chat="grp", seq=seq, addressed=addressed, **kw)


# -- group_reply ------------------------------------------------------------------------------------------------------

def test_mentioned_groups_store_unaddressed_messages_as_context_without_a_reply(database_url):
    agent = Recording()
    r = make_runner(database_url, agent, group_reply="mentioned")
    assert r.handle(group("my order 55501 is missing", 1)) == "context"
    assert r.handle(group("me too", 2, name="Carla")) == "context"
    assert agent.seen == [] and sent(r) == []  # the Agent did not run, nothing was sent
    assert r.handle(group("@bot where is it?", 3, name="Carla", addressed=True)) == "replied"
    assert [(u.sender_name, u.text) for u in agent.seen[0].history] == [
        ("Bruno", "my order 55501 is missing"), ("Carla", "me too")]  # what was said before it was addressed
    assert sent(r) == [("grp", "echo: @bot where is it?")]
    summary, lines = transcript(database_url, "wa:group:grp")
    assert [(line.kind, line.text) for line in lines if line.kind != "event"] == [
        ("user", "my order 55501 is missing"), ("user", "me too"), ("user", "@bot where is it?"),
        ("assistant", "echo: @bot where is it?")]
    with transaction(database_url) as s:  # every seq settled in its commit
        assert s.scalar(select(ChatSession.last_seq).where(ChatSession.key == "wa:group:grp")) == 3
    assert r.handle(group("thanks", 4)) == "context"  # the next unaddressed one does not wait for anything


def test_always_answers_every_group_message_and_dms_are_always_answered(database_url):
    r = make_runner(database_url, EchoAgent(), group_reply="always")
    assert r.handle(group("hello all", 1)) == "replied"
    m = make_runner(database_url, EchoAgent(), group_reply="mentioned")
    assert m.handle(msg("hi", user="dm-user", seq=1, addressed=True)) == "replied"


# -- context budget ---------------------------------------------------------------------------------------------------

def test_history_chars_keeps_the_newest_messages_that_fit(database_url):
    agent = Recording()
    r = make_runner(database_url, agent, history_limit=50, history_chars=30)
    for seq, text in enumerate(["a" * 20, "b" * 10, "c" * 5], start=1):
        r.handle(msg(text, seq=seq))
    # before the 3rd: a(20) echo(26) b(10) echo(16): only the newest that fit in 30 characters
    assert [u.text for u in agent.seen[2].history] == ["b" * 10, "echo: " + "b" * 10]


def test_history_limit_and_chars_together_and_never_across_generations(database_url):
    agent = Recording()
    r = make_runner(database_url, agent, history_limit=3, history_chars=1000)
    for seq, text in enumerate(["one", "two", "three"], start=1):
        r.handle(msg(text, seq=seq))
    assert [u.text for u in agent.seen[-1].history] == ["echo: one", "two", "echo: two"]  # the newest 3
    r.handle(msg("/new", seq=4, command="new"))
    r.handle(msg("four", seq=5))
    assert [u.text for u in agent.seen[-1].history] == []  # the new generation starts empty



# -- resets -----------------------------------------------------------------------------------------------------------

NOTICE = "(This is a new conversation.)"


def idle_for(url: str, key: str, hours: float) -> None:
    with transaction(url) as s:  # time passes
        s.execute(update(ChatSession).where(ChatSession.key == key)
                  .values(last_activity_at=now() - timedelta(hours=hours)))


def events(url: str, key: str) -> list[str]:
    return [line.text for line in transcript(url, key)[1] if line.kind == "event"]


def test_idle_reset_is_a_new_session_and_the_user_is_told(database_url):
    r = make_runner(database_url, DemoAgent(), reset="idle", reset_idle_hours=2)
    r.handle(msg("my name is Chen", seq=1))
    idle_for(database_url, "wa:dm:5511", 1)
    assert sent(r)[-1][1] == "Nice to meet you, Chen! How can I help?"
    r.handle(msg("what is my name?", seq=2))  # 1 h idle: the same session
    assert sent(r)[-1][1] == "Your name is Chen."
    idle_for(database_url, "wa:dm:5511", 3)
    assert r.handle(msg("what is my name?", seq=3)) == "replied"
    assert sent(r)[-1][1] == f"{NOTICE}\n\nYou haven't told me your name yet."
    summary, lines = transcript(database_url, "wa:dm:5511")
    assert summary.generation == 2 and events(database_url, "wa:dm:5511") == ["created", "new_session"]
    assert [(line.generation, line.kind) for line in lines if line.kind != "event"][-2:] == [
        (2, "user"), (2, "assistant")]  # the message that opened it belongs to the new session
    r.handle(msg("my name is Li", seq=4))
    r.handle(msg("what is my name?", seq=5))
    assert sent(r)[-1][1] == "Your name is Li."  # no second reset: the activity is recent again


def test_a_dormant_session_past_the_threshold_is_resumed_and_reset(database_url):
    agent = Recording()
    r = make_runner(database_url, agent, reset="idle", reset_idle_hours=2, reset_notice="")
    r.handle(msg("my order 48213", seq=1))
    idle_for(database_url, "wa:dm:5511", 3)
    assert Maintenance(r.store.url).mark_dormant("wa", idle_minutes=30) == 1
    r.handle(msg("where is my order?", seq=2))
    assert agent.seen[-1].history == ()  # not the old context
    assert sent(r)[-1][1] == "echo: where is my order?"  # reset_notice = "": nothing added
    summary, _ = transcript(database_url, "wa:dm:5511")
    assert summary.status == "active" and summary.generation == 2
    assert events(database_url, "wa:dm:5511") == ["created", "dormant", "resumed", "new_session"]


def test_a_dormant_session_within_the_threshold_resumes_its_context(database_url):
    agent = Recording()
    r = make_runner(database_url, agent, reset="idle", reset_idle_hours=2)
    r.handle(msg("my order 48213", seq=1))
    idle_for(database_url, "wa:dm:5511", 1)
    assert Maintenance(r.store.url).mark_dormant("wa", idle_minutes=30) == 1
    r.handle(msg("where is my order?", seq=2))
    assert [u.text for u in agent.seen[-1].history][0] == "my order 48213"
    assert events(database_url, "wa:dm:5511") == ["created", "dormant", "resumed"]


def test_daily_reset_after_the_local_hour(database_url):
    agent = Recording()
    r = make_runner(database_url, agent, reset="daily", reset_hour=4, timezone="America/Sao_Paulo")
    r.handle(msg("hello", seq=1))
    r.handle(msg("again", seq=2))  # same day: same session
    assert len(agent.seen[-1].history) == 2
    idle_for(database_url, "wa:dm:5511", 25)  # yesterday: before the latest 04:00 in São Paulo
    r.handle(msg("next day", seq=3))
    assert agent.seen[-1].history == () and sent(r)[-1][1].startswith(NOTICE)
    assert transcript(database_url, "wa:dm:5511")[0].generation == 2


def test_an_unaddressed_group_message_resets_silently(database_url):
    agent = Recording()
    r = make_runner(database_url, agent, group_reply="mentioned", reset="idle", reset_idle_hours=1)
    r.handle(group("old news", 1))
    idle_for(database_url, "wa:group:grp", 2)
    assert r.handle(group("fresh chatter", 2)) == "context"
    assert sent(r) == []  # nobody asked: nobody is told
    r.handle(group("@bot hi", 3, addressed=True))
    assert [u.text for u in agent.seen[-1].history] == ["fresh chatter"]
    assert sent(r) == [("grp", "echo: @bot hi")]



# -- reply routing ----------------------------------------------------------------------------------------------------

def two_channel_runner(url: str, agent, **session) -> TurnRunner:
    """Channels "wa" (WhatsApp) and "tg" (Telegram), both per-person, as a linked person's DMs share one session."""
    configs = [ChannelConfig(id=cid, platform=platform, agent="echo", api_base="http://unused", secrets={},
                             options={}, session=SessionOptions(**({"scope": "per-person"} | opts)))
               for cid, platform, opts in (("wa", "whatsapp", session.get("wa", {})),
                                           ("tg", "telegram", session.get("tg", {})))]
    store = Store(url)
    store.sync_channels(configs)
    return TurnRunner(settings_for(url, configs), store, {c.id: RecordingChannel(c) for c in configs},
                      {c.id: agent for c in configs})


def person_msg(channel: str, chat: str, text: str, seq: int, **kw) -> InboundMessage:
    platform = {"wa": "whatsapp", "tg": "telegram"}[channel]
    return InboundMessage(channel_id=channel, platform=platform, session_key="person:ana:dm", chat_id=chat,
                          chat_kind=DM, sender_id=chat, sender_name="Ana", text=text,
                          platform_message_id=f"{channel}.{chat}.{seq}", sent_at=time.time(), seq=seq,
                          person="ana", **kw)


def test_a_per_person_session_answers_each_message_through_its_own_channel_and_chat(database_url):
    agent = Recording()
    r = two_channel_runner(database_url, agent, tg={"history_limit": 1})
    r.handle(person_msg("wa", "5511987650001", "my order 48213", 1))
    r.handle(person_msg("tg", "381920001", "where is it?", 2))
    r.handle(person_msg("wa", "5511987650001", "thanks", 3))
    assert r.channels["wa"].sent == [("5511987650001", "echo: my order 48213"), ("5511987650001", "echo: thanks")]
    assert r.channels["tg"].sent == [("381920001", "echo: where is it?")]  # not the session row's WhatsApp chat
    assert len(agent.seen[1].history) == 1  # the Telegram message's channel's history_limit, not the session row's
    assert len(agent.seen[2].history) == 4
    with transaction(database_url) as s:
        rows = s.execute(select(Message.channel_id, Message.chat_id, Message.role).order_by(Message.position)).all()
    assert [tuple(row) for row in rows] == [
        ("wa", "5511987650001", "user"), ("wa", "5511987650001", "assistant"),
        ("tg", "381920001", "user"), ("tg", "381920001", "assistant"),
        ("wa", "5511987650001", "user"), ("wa", "5511987650001", "assistant")]
    assert r.handle(person_msg("tg", "381920001", "where is it?", 2)) == "duplicate"  # found under its own channel


def test_a_reply_goes_to_the_topic_of_the_message_it_answers(database_url):
    r = make_runner(database_url, EchoAgent())
    m = msg("hello topic", kind=GROUP, chat="-100123", seq=1)
    r.handle(replace(m, thread_id="7"))
    r.handle(msg("hello group", kind=GROUP, chat="-100123", seq=2))
    assert r.channels["wa"].threads == ["7", None]


def test_an_unsent_reply_keeps_its_route_and_an_old_one_goes_to_the_session_chat(database_url):
    r = make_runner(database_url, EchoAgent())
    sid = r.store.accept(replace(msg("one", kind=GROUP, chat="grp", seq=1), thread_id="9")).session_id
    claim = r.store.claim(sid, 30, history_limits={"wa": 50})
    r.store.commit_turn(claim.turn, "echo: one")
    [pending] = r.store.pending_replies(sid)
    assert (pending.channel_id, pending.chat_id, pending.chat_kind, pending.thread_id) == ("wa", "grp", GROUP, "9")
    with transaction(database_url) as s:  # a reply committed before migration 0004: no route of its own
        s.execute(update(Message).values(chat_id=None, chat_kind=None, thread_id=None))
    [old] = r.store.pending_replies(sid)
    assert (old.chat_id, old.chat_kind, old.thread_id) == ("grp", GROUP, None)
    r.store.release(claim)
    again = r.store.claim(sid, 30, history_limits={"wa": 50})
    assert [(p.chat_id, p.chat_kind) for p in again.outbox] == [("grp", GROUP)]
    r.store.release(again)


def test_telegram_sends_a_topic_reply_with_its_message_thread_id():
    from channel_helpers import Reply, StandIn, fixture, make_config

    from shared.channels.telegram import TelegramChannel

    with StandIn(default=Reply(body=fixture("telegram", "send_message_response"))) as server:
        ch = TelegramChannel(make_config("telegram", api_base=server.base))
        assert ch.send("-1001987654321", GROUP, "in the topic", thread_id="5").ok
        assert ch.send("-1001987654321", GROUP, "in the group").ok
    assert server.requests[0].body == {"chat_id": -1001987654321, "message_thread_id": 5, "text": "in the topic"}
    assert server.requests[1].body == {"chat_id": -1001987654321, "text": "in the group"}


# -- bursts -----------------------------------------------------------------------------------------------------------

def queue_up(r: TurnRunner, *messages: InboundMessage) -> int:
    """The messages arrive while a turn of their session runs elsewhere (the lease is held), then it ends."""
    sid = r.store.accept(messages[0]).session_id
    held = r.store.claim(sid, 30)
    for m in messages[1:]:
        assert r.handle(m) == "queued"
    r.store.release(held)
    return sid


def stored(url: str, key: str = "wa:dm:5511") -> list[tuple[str, str, str | None]]:
    return [(line.kind, line.text, line.delivery_status) for line in transcript(url, key)[1] if line.kind != "event"]


def test_collect_gives_the_waiting_messages_to_the_agent_as_one_turn(database_url):
    agent = Recording()
    r = make_runner(database_url, agent, burst="collect")
    r.handle(msg("hello", seq=1))
    m2, m3, m4 = msg("my order 48213", seq=2), msg("it is late", seq=3), msg("where is it?", seq=4)
    sid = queue_up(r, m2, m3, m4)
    outcomes = r.drain(sid)
    assert outcomes == {m2.platform_message_id: "collected", m3.platform_message_id: "collected",
                        m4.platform_message_id: "replied"}
    assert len(agent.seen) == 2  # one turn for the burst
    assert [u.text for u in agent.seen[1].history] == ["hello", "echo: hello", "my order 48213", "it is late"]
    assert agent.seen[1].message.text == "where is it?"
    assert sent(r) == [("5511", "echo: hello"), ("5511", "echo: where is it?")]  # one reply
    assert stored(database_url) == [("user", "hello", None), ("assistant", "echo: hello", "sent"),
                                    ("user", "my order 48213", None), ("user", "it is late", None),
                                    ("user", "where is it?", None), ("assistant", "echo: where is it?", "sent")]
    with transaction(database_url) as s:
        assert s.scalar(select(ChatSession.last_seq)) == 4
    assert r.handle(msg("next", seq=5)) == "replied"  # nothing waits for a seq of the burst


def test_a_command_in_a_burst_is_a_turn_of_its_own(database_url):
    agent = Recording()
    r = make_runner(database_url, agent, burst="collect")
    ms = [msg("a", seq=1), msg("b", seq=2), msg("/new", seq=3, command="new"), msg("c", seq=4), msg("d", seq=5)]
    r.drain(queue_up(r, *ms))
    assert [(c.message.text, [u.text for u in c.history]) for c in agent.seen] == [("b", ["a"]), ("d", ["c"])]
    assert [text for _, text in sent(r)] == ["echo: b", NEW_SESSION_REPLY, "echo: d"]


def test_collect_survives_a_crash_before_its_commit(database_url):
    agent = Recording()
    r = make_runner(database_url, agent, burst="collect")
    m1, m2, m3 = msg("one", seq=1), msg("two", seq=2), msg("three", seq=3)
    sid = queue_up(r, m1, m2, m3)
    dying = r.store.claim(sid, 0.01, history_limits={"wa": 50}, take={"wa": 20})
    assert [m.text for m in dying.turn.messages] == ["one", "two", "three"]  # ... and its worker died here
    time.sleep(0.05)
    assert r.handle(m2) == "collected"  # Celery redelivers a copy: the next holder runs the burst once
    assert r.handle(m3) == "duplicate" and r.handle(m1) == "duplicate"
    assert len(agent.seen) == 1 and sent(r) == [("5511", "echo: three")]


def test_a_redelivered_copy_of_a_collected_message_is_not_a_second_turn(database_url):
    agent = Recording()
    r = make_runner(database_url, agent, burst="collect")
    m1, m2, m3 = msg("one", seq=1), msg("two", seq=2), msg("three", seq=3)
    sid = queue_up(r, m1, m2, m3)
    claim = r.store.claim(sid, 0.01, history_limits={"wa": 50}, take={"wa": 20})
    r.store.commit_turn(claim.turn, "echo: one two three")  # committed, then the worker died before sending
    time.sleep(0.05)
    assert r.handle(m2) == "duplicate"  # the redelivered copy only settles its seq and sends the unsent reply
    assert r.handle(m1) == "duplicate"
    assert agent.seen == [] and sent(r) == [("5511", "echo: one two three")]
    assert [kind for kind, _, _ in stored(database_url)] == ["user", "user", "user", "assistant"]


def test_latest_answers_only_the_newest_and_keeps_the_others_as_context(database_url):
    agent = Recording()
    r = make_runner(database_url, agent, burst="latest")
    m1, m2, m3 = msg("one", seq=1), msg("two", seq=2), msg("three", seq=3)
    outcomes = r.drain(queue_up(r, m1, m2, m3))
    assert outcomes[m3.platform_message_id] == "replied"
    assert [u.text for u in agent.seen[0].history] == ["one", "two"]
    assert sent(r) == [("5511", "echo: three")]
    assert stored(database_url) == [("user", "one", None), ("user", "two", None), ("user", "three", None),
                                    ("assistant", "echo: three", "sent")]


class ArrivesMeanwhile(Recording):
    """While the Agent thinks about the first message, the user sends another one."""

    def __init__(self, runner_box: list, newer: InboundMessage):
        super().__init__()
        self.runner_box, self.newer = runner_box, newer

    def reply(self, conversation):
        if len(self.seen) == 0:
            assert self.runner_box[0].handle(self.newer) == "queued"
        return super().reply(conversation)


def test_latest_drops_a_reply_a_newer_message_made_stale(database_url):
    box: list = []
    newer = msg("actually, order 77120", seq=2)
    agent = ArrivesMeanwhile(box, newer)
    r = make_runner(database_url, agent, burst="latest")
    box.append(r)
    first = msg("my order 48213", seq=1)
    assert r.handle(first) == "superseded"
    assert sent(r) == [("5511", "echo: actually, order 77120")]  # only the answer to the newest message
    assert [u.text for u in agent.seen[1].history] == ["my order 48213"]  # the whole burst; not the stale reply
    assert stored(database_url) == [("user", "my order 48213", None), ("assistant", "echo: my order 48213", "skipped"),
                                    ("user", "actually, order 77120", None),
                                    ("assistant", "echo: actually, order 77120", "sent")]
    assert Maintenance(r.store.url).stale_outbox(older_than_s=0) == []  # a skipped reply is not an unsent one


def test_queue_sends_every_reply_even_when_a_newer_message_waits(database_url):
    box: list = []
    agent = ArrivesMeanwhile(box, msg("two", seq=2))
    r = make_runner(database_url, agent)  # burst = "queue"
    box.append(r)
    assert r.handle(msg("one", seq=1)) == "replied"
    assert [text for _, text in sent(r)] == ["echo: one", "echo: two"]


# -- retention --------------------------------------------------------------------------------------------------------

def test_retention_deletes_closed_sessions_messages_in_batches(database_url):
    r = make_runner(database_url, EchoAgent())
    for user in ("old1", "old2", "old3", "recent", "active"):
        r.handle(msg("hello", user=user, seq=1))
    for user in ("old1", "old2", "old3"):
        idle_for(database_url, f"wa:dm:{user}", 24 * 40)
    idle_for(database_url, "wa:dm:recent", 24 * 10)
    assert Maintenance(r.store.url).mark_dormant("wa", idle_minutes=30) == 4
    idle_for(database_url, "wa:dm:active", 24 * 40)
    with transaction(database_url) as s:  # still active (e.g. the sweep has not run): not closed, kept
        s.execute(update(ChatSession).where(ChatSession.key == "wa:dm:active").values(status="active"))
    assert Maintenance(r.store.url).purge_expired("wa", retention_days=30, batch=2) == (3, 6)
    for user in ("old1", "old2", "old3"):
        summary, lines = transcript(database_url, f"wa:dm:{user}")
        assert lines == [] and summary.status == "dormant"  # the row stays, its content is gone
    assert len(transcript(database_url, "wa:dm:recent")[1]) == 4  # created, user, assistant, dormant
    assert len(transcript(database_url, "wa:dm:active")[1]) == 3
    assert Maintenance(r.store.url).purge_expired("wa", retention_days=30) == (0, 0)  # nothing left to do
    assert Maintenance(r.store.url).purge_expired("other-channel", retention_days=1) == (0, 0)
    assert r.handle(msg("back again", user="old1", seq=2)) == "replied"  # resumes, with an empty context
    assert [line.text for line in transcript(database_url, "wa:dm:old1")[1]] == ["resumed", "back again",
                                                                               "echo: back again"]


def test_retention_skips_a_session_with_a_waiting_message(database_url):
    r = make_runner(database_url, EchoAgent())
    r.handle(msg("hello", seq=1))
    idle_for(database_url, "wa:dm:5511", 24 * 40)
    Maintenance(r.store.url).mark_dormant("wa", idle_minutes=30)
    r.store.accept(msg("three", seq=3))  # wakes it; waits for seq 2
    with transaction(database_url) as s:
        s.execute(update(ChatSession).values(status="dormant"))  # as if the sweep raced the accept
    assert Maintenance(r.store.url).purge_expired("wa", retention_days=30) == (0, 0)



# -- WhatsApp's customer-service window --------------------------------------------------------------------------------

TWO_DAYS_AGO = time.time() - 2 * 86400


def test_a_reply_outside_the_window_is_recorded_undeliverable_not_sent(database_url):
    r = make_runner(database_url, EchoAgent())
    assert r.handle(msg("are you there?", seq=1, sent_at=TWO_DAYS_AGO)) == "replied"
    assert sent(r) == []  # not attempted as free text
    _, lines = transcript(database_url, "wa:dm:5511")
    assert lines[-1].delivery_status == "failed"
    assert lines[-1].delivery_error.startswith("outside the 24h customer-service window")
    assert Maintenance(r.store.url).stale_outbox(older_than_s=0) == []  # nothing for the sweeper (or `sessions stuck`) to retry
    from shared.transcripts import format_transcript

    assert "[failed: outside the 24h customer-service window" in format_transcript("wa:dm:5511", database_url)
    r.handle(msg("hello again", seq=2))  # a fresh message opens the window again
    assert sent(r) == [("5511", "echo: hello again")]


def test_a_reply_outside_the_window_goes_as_the_configured_template(database_url):
    r = make_runner(database_url, EchoAgent(), window_hours=12, window_template="support_followup",
                    window_template_language="pt_BR")
    r.handle(msg("late", seq=1, sent_at=time.time() - 13 * 3600))
    assert sent(r) == [("5511", "template:support_followup:pt_BR")]
    assert transcript(database_url, "wa:dm:5511")[1][-1].delivery_status == "sent"


def test_the_window_is_whatsapp_only(database_url):
    r = two_channel_runner(database_url, EchoAgent())
    r.handle(person_msg("tg", "381920001", "old but fine", 1))
    with transaction(database_url) as s:  # even a reply to a two-day-old Telegram message is sent
        s.execute(update(Message).where(Message.role == "assistant")
                  .values(user_sent_at=now() - timedelta(days=2), delivery_status="pending"))
    r.drain(r.store.accept(person_msg("tg", "381920001", "again", 2)).session_id)
    assert [text for _, text in r.channels["tg"].sent] == ["echo: old but fine", "echo: old but fine",
                                                           "echo: again"]


def test_whatsapp_sends_a_template_message_in_the_cloud_api_shape():
    from channel_helpers import Reply, StandIn, make_config

    from shared.channels.whatsapp import WhatsAppChannel

    with StandIn(default=Reply(body={"messages": [{"id": "wamid.tpl"}]})) as server:
        ch = WhatsAppChannel(make_config("whatsapp", api_base=server.base))
        delivery = ch.send_template("5511987650001", DM, "support_followup", "pt_BR")
    assert delivery.ok and delivery.platform_message_ids == ("wamid.tpl",)
    assert server.requests[0].body == {
        "messaging_product": "whatsapp", "recipient_type": "individual", "to": "5511987650001", "type": "template",
        "template": {"name": "support_followup", "language": {"code": "pt_BR"}}}
