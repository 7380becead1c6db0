"""Session policies end to end: signed webhook -> gunicorn ingress -> Redis partition queues -> worker pools ->
PostgreSQL -> the stand-in platform, on channels whose [channels.session] sets the option under test
(conftest.POLICY_WHATSAPP). Chat ids are unique per test, so the stand-in's records never mix.
"""

from __future__ import annotations

import time

import pytest

from cli.standins.payloads import encode, telegram_headers, telegram_text

from .conftest import PERSON, SECRETS, SLOW_AGENT_S, TG_ECHO, session_key

pytestmark = pytest.mark.integration

OUR_NUMBER = "15550783881"  # the display_phone_number of the stand-in's WhatsApp payloads
NOTICE = "(This is a new conversation.)"


def wait_user_messages(stack, key: str, count: int) -> list[dict]:
    return stack.wait_until(lambda: (rows := stack.messages(key)) and
                            len([m for m in rows if m["role"] == "user"]) >= count and rows,
                            60, f"{key} to store {count} user messages")


def user_texts(stack, key: str) -> list[str]:
    return [m["text"] for m in stack.messages(key) if m["role"] == "user"]


def lease_held(stack, key: str) -> None:
    """Wait until a turn of the session runs (a worker holds its lease)."""
    stack.wait_until(lambda: (row := stack.session(key)) is not None and row["lease_until"] is not None,
                     30, f"a turn of {key} to start")


# -- group_reply = "mentioned" ---------------------------------------------------------------------------------------

def test_a_group_is_answered_only_when_addressed_and_every_message_is_context(stack):
    group, channel = "GRPMENTION01", "wa-mention"
    key = session_key(channel, "group", group)
    stack.whatsapp(channel, "5513000000001", "our order 61001 is late", name="Ana", group_id=group)
    stack.whatsapp(channel, "5513000000002", "same here", name="Bruno", group_id=group)
    wait_user_messages(stack, key, 2)
    stack.whatsapp(channel, "5513000000002", f"@{OUR_NUMBER} where is our order?", name="Bruno", group_id=group)
    replies = stack.wait_replies(channel, group, 1)
    assert "61001" in replies[0] and replies[0].startswith("Bruno")  # it knew what was said before it was asked
    rows = stack.wait_settled(key, 3)
    assert [(m["role"], m["sender_name"]) for m in rows] == [
        ("user", "Ana"), ("user", "Bruno"), ("user", "Bruno"), ("assistant", "Agent")]
    assert stack.session(key)["last_seq"] == 3  # the unanswered messages settled their seqs
    time.sleep(1)
    assert len(stack.replies(channel, group)) == 1  # and never got a reply of their own


# -- context budget ---------------------------------------------------------------------------------------------------

def test_history_chars_keeps_only_the_newest_context_that_fits(stack):
    phone, channel = "5513000000010", "wa-budget"
    stack.whatsapp(channel, phone, "my name is Ana")
    stack.wait_replies(channel, phone, 1)
    stack.whatsapp(channel, phone, "what is my name?")
    assert stack.wait_replies(channel, phone, 2)[-1] == "Your name is Ana."  # 14 + 38 characters fit in 60
    stack.whatsapp(channel, phone, "I will tell you a long story about my day today ok")
    stack.wait_replies(channel, phone, 3)
    stack.whatsapp(channel, phone, "what is my name?")
    assert stack.wait_replies(channel, phone, 4)[-1] == "You haven't told me your name yet."  # out of the budget


# -- resets -----------------------------------------------------------------------------------------------------------

def test_an_idle_reset_of_a_dormant_session_is_a_new_session_and_the_user_is_told(stack):
    phone, channel = "5513000000020", "wa-reset"  # idle 1.2 s -> dormant; reset after 3.6 s without a message
    key = session_key(channel, "dm", phone)
    stack.whatsapp(channel, phone, "my name is Chen")
    stack.wait_replies(channel, phone, 1)
    stack.wait_until(lambda: "dormant" in stack.events(key), 30, f"{key} to go dormant")
    time.sleep(4)  # past reset_idle_hours
    stack.whatsapp(channel, phone, "what is my name?")
    reply = stack.wait_replies(channel, phone, 2)[-1]
    assert reply == f"{NOTICE}\n\nYou haven't told me your name yet."  # not the old context
    assert stack.events(key)[:4] == ["created", "dormant", "resumed", "new_session"]
    session = stack.session(key)
    assert session["generation"] == 2
    assert [(m["generation"], m["role"]) for m in stack.wait_settled(key, 2)] == [
        (1, "user"), (1, "assistant"), (2, "user"), (2, "assistant")]
    stack.whatsapp(channel, phone, "my name is Li")
    stack.whatsapp(channel, phone, "what is my name?")
    assert stack.wait_replies(channel, phone, 4)[-1] == "Your name is Li."  # recent activity: no reset


def test_a_daily_reset_starts_a_new_session_after_the_local_hour(stack):
    phone, channel = "5513000000021", "wa-daily"
    key = session_key(channel, "dm", phone)
    stack.whatsapp(channel, phone, "my name is Dana")
    stack.whatsapp(channel, phone, "what is my name?")
    assert stack.wait_replies(channel, phone, 2)[-1] == "Your name is Dana."  # the same day: the same session
    stack.wait_settled(key, 2)
    with_pg = stack.query("UPDATE sessions SET last_activity_at = now() - interval '2 days' WHERE key = %s "
                          "RETURNING id", key)  # two days pass (an 04:00 in São Paulo with them)
    assert with_pg
    stack.whatsapp(channel, phone, "what is my name?")
    assert stack.wait_replies(channel, phone, 3)[-1] == ("(New day, new conversation.)\n\n"
                                                         "You haven't told me your name yet.")
    assert stack.session(key)["generation"] == 2 and stack.events(key)[-1] == "new_session"


# -- bursts -----------------------------------------------------------------------------------------------------------

def test_collect_answers_a_burst_once_and_a_redelivered_copy_changes_nothing(stack):
    phone, channel = "5513000000030", "wa-collect"  # the Agent takes SLOW_AGENT_S per turn
    key = session_key(channel, "dm", phone)
    stack.whatsapp(channel, phone, "first")
    lease_held(stack, key)
    bodies = [stack.whatsapp_body(channel, phone, text) for text in ("my order", "is 48213", "where is it?")]
    for body, headers, _ in bodies:  # while the first turn runs
        assert stack.post(f"/webhooks/{channel}", body, headers).status_code == 200
    replies = stack.wait_replies(channel, phone, 2)
    assert replies == ["echo: first", "echo: where is it?"]  # one turn, one reply for the three
    rows = stack.wait_settled(key, 4)
    assert [m["text"] for m in rows] == ["first", "echo: first", "my order", "is 48213", "where is it?",
                                         "echo: where is it?"]
    # A crash redelivery of a collected message (past the ingress ledger, as Celery would after a worker died):
    body, headers, msg_id = bodies[1]
    assert stack.redis.delete(f"seen:{channel}:{msg_id}") == 1
    assert stack.post(f"/webhooks/{channel}", body, headers).status_code == 200
    stack.whatsapp(channel, phone, "thanks")
    assert stack.wait_replies(channel, phone, 3)[-1] == "echo: thanks"
    time.sleep(SLOW_AGENT_S + 0.5)
    assert stack.replies(channel, phone) == ["echo: first", "echo: where is it?", "echo: thanks"]
    assert user_texts(stack, key) == ["first", "my order", "is 48213", "where is it?", "thanks"]  # stored once


def test_latest_drops_a_reply_made_stale_and_answers_the_newest(stack):
    phone, channel = "5513000000031", "wa-latest"
    key = session_key(channel, "dm", phone)
    stack.whatsapp(channel, phone, "my order is 48213")
    lease_held(stack, key)
    stack.whatsapp(channel, phone, "no wait")
    stack.whatsapp(channel, phone, "it is 77120")  # both arrive while the first turn runs
    assert stack.wait_replies(channel, phone, 1) == ["echo: it is 77120"]
    rows = stack.wait_settled(key, 3)
    assert [(m["text"], m["delivery_status"]) for m in rows] == [
        ("my order is 48213", None), ("echo: my order is 48213", "skipped"), ("no wait", None),
        ("it is 77120", None), ("echo: it is 77120", "sent")]
    time.sleep(SLOW_AGENT_S + 0.5)
    assert stack.replies(channel, phone) == ["echo: it is 77120"]


# -- reply routing ----------------------------------------------------------------------------------------------------

def test_a_reply_goes_back_to_the_forum_topic_of_its_message(stack):
    chat = -1_009_000_000_001  # a forum supergroup; threads = false: its topics share the group's session
    sent = []
    for topic, text in ((7, "in topic seven"), (9, "in topic nine")):
        doc = telegram_text(chat, "supergroup", 381_000_001, "Tess", text, stack.next_id(), 950_000_000 +
                            stack.next_id(), title="Forum")
        doc["message"].update(message_thread_id=topic, is_topic_message=True)
        body = encode(doc)
        assert stack.post(f"/webhooks/{TG_ECHO}", body, telegram_headers(SECRETS["IT_TGE_SECRET"])).status_code == 200
        stack.wait_replies(TG_ECHO, chat, len(sent) + 1)
        sent.append(text)
    bodies = [s.body for s in stack.standin.sent if s.prefix == TG_ECHO and s.chat_id == str(chat)]
    assert [(b["message_thread_id"], b["text"]) for b in bodies] == [(7, "echo: in topic seven"),
                                                                     (9, "echo: in topic nine")]
    rows = stack.messages(session_key(TG_ECHO, "group", str(chat)))
    assert [m["thread_id"] for m in rows] == ["7", "7", "9", "9"]



def test_a_per_person_session_answers_on_the_platform_the_user_wrote_from(stack):
    person, phone, telegram_user = PERSON
    key = f"person:{person}:dm"
    stack.whatsapp("wa-person", phone, "my order 63001 is late")
    assert stack.wait_replies("wa-person", phone, 1) == ["echo: my order 63001 is late"]
    stack.telegram("tg-person", int(telegram_user), int(telegram_user), "Ana", "any news?")
    assert stack.wait_replies("tg-person", telegram_user, 1) == ["echo: any news?"]  # not to the WhatsApp chat
    stack.whatsapp("wa-person", phone, "thanks")
    assert stack.wait_replies("wa-person", phone, 2)[-1] == "echo: thanks"
    rows = stack.wait_settled(key, 3)
    assert [(m["channel_id"], m["chat_id"], m["role"]) for m in rows] == [
        ("wa-person", phone, "user"), ("wa-person", phone, "assistant"),
        ("tg-person", telegram_user, "user"), ("tg-person", telegram_user, "assistant"),
        ("wa-person", phone, "user"), ("wa-person", phone, "assistant")]
    assert stack.replies("wa-person", telegram_user) == [] and stack.replies("tg-person", phone) == []

# -- retention --------------------------------------------------------------------------------------------------------

def test_the_beat_task_deletes_a_closed_sessions_messages_after_the_retention(stack):
    phone, channel = "5513000000040", "wa-retain"  # dormant after 1.2 s, retention 4.3 s, beat every second
    key = session_key(channel, "dm", phone)
    stack.whatsapp(channel, phone, "please forget me later")
    stack.wait_replies(channel, phone, 1)
    assert len(stack.wait_settled(key, 1)) == 2
    stack.wait_until(lambda: stack.messages(key) == [] and stack.events(key) == [], 30,
                     f"the retention task to delete {key}'s messages and events")
    assert stack.session(key)["status"] == "dormant"  # the row stays: the next message resumes it, empty
    stack.whatsapp(channel, phone, "hello again")
    assert stack.wait_replies(channel, phone, 2)[-1] == "echo: hello again"
    assert [m["text"] for m in stack.wait_settled(key, 1)] == ["hello again", "echo: hello again"]


# -- WhatsApp's customer-service window --------------------------------------------------------------------------------

def test_a_reply_outside_the_whatsapp_window_is_not_sent_as_free_text(stack):
    phone, channel = "5513000000050", "wa-window"  # window_hours = 1, no template
    key = session_key(channel, "dm", phone)
    body, headers, _ = stack.whatsapp_body(channel, phone, "sent two hours ago", timestamp=time.time() - 7200)
    assert stack.post(f"/webhooks/{channel}", body, headers).status_code == 200
    [reply] = [m for m in stack.wait_settled(key, 1) if m["role"] == "assistant"]
    assert reply["delivery_status"] == "failed" and "customer-service window" in reply["delivery_error"]
    shown = stack.cli("sessions", "show", key)
    assert shown.returncode == 0 and "[failed: outside the 1h customer-service window" in shown.stdout
    stuck = stack.cli("sessions", "stuck", "--older-than", "0", "--json")
    assert key not in stuck.stdout  # nothing for the sweeper to resend
    stack.whatsapp(channel, phone, "and now")
    assert stack.wait_replies(channel, phone, 1) == ["echo: and now"]  # the failed one was never attempted


def test_a_reply_outside_the_window_goes_as_the_configured_template(stack):
    phone, channel = "5513000000051", "wa-template"
    key = session_key(channel, "dm", phone)
    body, headers, _ = stack.whatsapp_body(channel, phone, "an old message", timestamp=time.time() - 7200)
    assert stack.post(f"/webhooks/{channel}", body, headers).status_code == 200
    stack.wait_settled(key, 1)
    [sent] = [s for s in stack.standin.sent if s.prefix == channel and s.chat_id == phone]
    assert sent.body == {"messaging_product": "whatsapp", "recipient_type": "individual", "to": phone,
                         "type": "template", "template": {"name": "support_followup", "language": {"code": "pt_BR"}}}
    assert stack.messages(key)[-1]["delivery_status"] == "sent"
