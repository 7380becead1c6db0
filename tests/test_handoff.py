"""Handing a conversation to a person: the modes, who triggers a handoff, the notice once, operators' replies through
the session's outbox in order, one owner, handing back (by an operator or after human_idle_minutes) and the Agent's
context afterwards. Real store (SQLite and PostgreSQL) and real turns; the platform is a recording channel."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import update

from shared import handoff
from shared.db import transaction
from shared.models import AGENT, HUMAN, WAITING, ChatSession
from shared.session_queries import session_detail
from shared.transcripts import format_transcript, transcript
from workers.agents import Conversation, EchoAgent, Handoff
from workers.maintenance import Maintenance
from workers.store import now

from test_turn import make_runner, msg, sent

KEY = "wa:dm:5511"


class Recorder:
    """An Agent that echoes and remembers every conversation it was given; "person please" makes it hand off."""

    def __init__(self):
        self.seen: list[Conversation] = []

    def reply(self, conversation: Conversation):
        self.seen.append(conversation)
        if conversation.message.text == "person please":
            return Handoff("customer wants a refund", text="Let me get a colleague.")
        return f"echo: {conversation.message.text}"


def mode_of(url: str, key: str = KEY) -> tuple[str, str | None]:
    summary, _ = transcript(url, key)
    return summary.mode, summary.operator


def events(url: str, key: str = KEY) -> list[tuple[str, str, str | None]]:
    return [(line.text, line.sender_name, line.detail) for line in transcript(url, key)[1] if line.kind == "event"]


def operator_says(r, url: str, operator: str, text: str, seq: int) -> str:
    """What the CLI and the console do: build the reply's inbox message; here the runner takes it directly."""
    return r.handle(replace(handoff.operator_reply(url, KEY, operator, text), seq=seq))


def test_the_user_asks_for_a_person_and_is_told_once(database_url):
    agent = Recorder()
    r = make_runner(database_url, agent, handoff_keywords=("/human", "talk to a human"))
    assert r.handle(msg("hello", seq=1)) == "replied"
    assert r.handle(msg("Talk to a human", seq=2)) == "handoff"
    assert mode_of(database_url) == (WAITING, None)
    assert r.handle(msg("anyone there?", seq=3)) == "held"
    assert r.handle(msg("hello??", seq=4)) == "held"
    assert sent(r) == [("5511", "echo: hello"), ("5511", "A person will answer shortly.")]
    assert [c.message.text for c in agent.seen] == ["hello"]  # the Agent did not run again
    assert events(database_url)[-1] == ("handoff_requested", "user", "the user asked for a person")
    [waiting] = handoff.handovers(database_url)
    assert (waiting.key, waiting.mode, waiting.reason) == (KEY, WAITING, "the user asked for a person")


def test_the_agent_hands_off_with_its_own_text_and_reason(database_url):
    r = make_runner(database_url, Recorder())
    assert r.handle(msg("person please", seq=1)) == "handoff"
    assert sent(r) == [("5511", "Let me get a colleague.")]
    assert events(database_url)[-1] == ("handoff_requested", "agent", "customer wants a refund")
    assert r.handle(msg("still there?", seq=2)) == "held" and len(sent(r)) == 1  # told once, not per message


def test_an_operator_takes_over_replies_in_order_and_hands_back(database_url):
    agent = Recorder()
    r = make_runner(database_url, agent, operator_prefix="{operator}: ")
    r.handle(msg("my parcel 4471 is lost", seq=1))
    assert handoff.take_over(database_url, KEY, "Maria") == AGENT
    assert mode_of(database_url) == (HUMAN, "Maria")
    assert r.handle(msg("hello?", seq=2)) == "held"  # taken from the Agent: the notice at the user's next message
    assert operator_says(r, database_url, "Maria", "I found it, it ships today", seq=3) == "operator_reply"
    assert r.handle(msg("thanks!", seq=4)) == "held"
    assert sent(r) == [("5511", "echo: my parcel 4471 is lost"), ("5511", "A person will answer shortly."),
                       ("5511", "Maria: I found it, it ships today")]
    assert handoff.hand_back(database_url, KEY, "Maria", operator="Maria") is True
    assert mode_of(database_url) == (AGENT, None)
    assert r.handle(msg("one more question", seq=5)) == "replied"
    seen = agent.seen[-1].history  # the whole generation, the operator's words as the assistant side, with a name
    assert ("assistant", "Maria", "Maria: I found it, it ships today") in [(u.role, u.sender_name, u.text) for u in seen]
    assert [e[0] for e in events(database_url)][-2:] == ["taken_over", "returned"]
    shown = format_transcript(KEY, database_url)
    assert "Maria: Maria: I found it" in shown and "taken_over by Maria: from agent" in shown
    detail = session_detail(database_url, KEY)
    assert detail["session"]["mode"] == AGENT and detail["events"][-1]["actor"] == "Maria"


def test_one_owner_two_operators_racing_one_wins(database_url):
    r = make_runner(database_url)
    r.handle(msg("hello", seq=1))
    results: dict[str, object] = {}
    start = threading.Barrier(2)

    def take(name: str) -> None:
        start.wait()
        try:
            results[name] = handoff.take_over(database_url, KEY, name)
        except handoff.TakenBy as exc:
            results[name] = exc
        except Exception as exc:  # SQLite: the loser's write may find the database locked
            results[name] = exc

    threads = [threading.Thread(target=take, args=(n,)) for n in ("Ana", "Bruno")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [n for n, v in results.items() if v == AGENT]
    assert len(winners) == 1
    owner = mode_of(database_url)[1]
    assert owner == winners[0]
    loser = "Bruno" if owner == "Ana" else "Ana"
    with pytest.raises(handoff.TakenBy, match=f"taken by {owner}"):  # told who has it
        handoff.take_over(database_url, KEY, loser)
    with pytest.raises(handoff.TakenBy):
        handoff.operator_reply(database_url, KEY, loser, "hi")
    with pytest.raises(handoff.TakenBy):
        handoff.hand_back(database_url, KEY, loser, operator=loser)


def test_a_reply_from_an_operator_who_no_longer_has_the_session_is_stored_failed_never_sent(database_url):
    r = make_runner(database_url)
    r.handle(msg("hello", seq=1))
    handoff.take_over(database_url, KEY, "Maria")
    queued = handoff.operator_reply(database_url, KEY, "Maria", "on my way")
    handoff.hand_back(database_url, KEY, "Maria")  # handed back before the reply's turn ran
    assert r.handle(replace(queued, seq=2)) == "operator_refused"
    assert len(sent(r)) == 1  # the Agent's answer to "hello" only
    [line] = [x for x in transcript(database_url, KEY)[1] if x.kind == "assistant" and x.sender_name == "Maria"]
    assert line.delivery_status == "failed" and "no longer has the session" in line.delivery_error


def test_a_redelivered_operator_reply_is_sent_once(database_url):
    r = make_runner(database_url, EchoAgent())
    r.handle(msg("hello", seq=1))
    handoff.take_over(database_url, KEY, "Maria")
    queued = replace(handoff.operator_reply(database_url, KEY, "Maria", "hi, Maria here"), seq=2)
    assert r.handle(queued) == "operator_reply"
    assert r.handle(queued) == "duplicate"
    assert [t for _, t in sent(r)].count("hi, Maria here") == 1


def test_operator_actions_are_checked(database_url):
    r = make_runner(database_url)
    r.handle(msg("hello", seq=1))
    with pytest.raises(handoff.HandoffError, match="take it over first"):
        handoff.operator_reply(database_url, KEY, "Maria", "hi")
    with pytest.raises(handoff.HandoffError, match="no session"):
        handoff.take_over(database_url, "wa:dm:nobody", "Maria")
    with pytest.raises(handoff.HandoffError, match="operator name"):
        handoff.take_over(database_url, KEY, "")
    handoff.take_over(database_url, KEY, "Maria")
    with pytest.raises(handoff.HandoffError, match="empty"):
        handoff.operator_reply(database_url, KEY, "Maria", "   ")
    assert handoff.hand_back(database_url, KEY, "cli") is True
    assert handoff.hand_back(database_url, KEY, "cli") is False  # the Agent's already


def test_a_session_an_operator_left_silent_returns_to_the_agent(database_url):
    r = make_runner(database_url, EchoAgent())
    r.handle(msg("hello", seq=1))
    handoff.take_over(database_url, KEY, "Maria")
    assert Maintenance(database_url).return_idle("wa", idle_minutes=60) == 0
    with transaction(database_url) as s:
        s.execute(update(ChatSession).values(mode_at=now() - timedelta(minutes=61)))
    assert Maintenance(database_url).return_idle("wa", idle_minutes=60) == 1
    assert mode_of(database_url) == (AGENT, None)
    assert events(database_url)[-1] == ("returned", "idle", "no operator reply for 60 minutes")
    assert r.handle(msg("back?", seq=2)) == "replied"


def test_a_failed_turn_asks_for_a_person_when_the_policy_says_so(database_url):
    class Broken:
        def reply(self, conversation):
            raise RuntimeError("model unavailable")

    r = make_runner(database_url, Broken(), handoff_on_failure=True)
    r.agent_attempts = 1
    assert r.handle(msg("hello", seq=1)) == "dead_lettered"
    assert mode_of(database_url) == (WAITING, None)
    assert sent(r) == [("5511", "A person will answer shortly.")]
    assert events(database_url)[-1][:2] == ("handoff_requested", "policy")
    assert r.handle(msg("hello again", seq=2)) == "held" and len(sent(r)) == 1


def test_a_takeover_does_not_undo_a_waiting_session_the_user_asked_for(database_url):
    """Taken while waiting: the user was told already; no second notice."""
    r = make_runner(database_url)
    r.handle(msg("/human", seq=1))
    assert handoff.take_over(database_url, KEY, "Maria") == WAITING
    assert r.handle(msg("hi?", seq=2)) == "held"
    assert [t for _, t in sent(r)] == ["A person will answer shortly."]
