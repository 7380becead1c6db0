"""Handing a conversation to a person, end to end: webhooks through gunicorn, the partition queues and the worker
pools to the platforms' send APIs (the stand-ins), with the operators' commands run as the real CLI. An operator's
reply travels the session's own partition, so it lands after every message before it and is sent once."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration

WA_ECHO, TG_ECHO = "wa-echo", "tg-echo"  # echo Agents (conftest.config_toml)
NOTICE = "A person will answer shortly."


def ok(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_whatsapp_user_asks_for_a_person_an_operator_answers_and_hands_back(stack):
    phone = f"55119{stack.next_id():07d}"
    key = f"{WA_ECHO}:dm:{phone}"
    stack.whatsapp(WA_ECHO, phone, "hello")
    stack.whatsapp(WA_ECHO, phone, "/human")
    assert stack.wait_replies(WA_ECHO, phone, 2) == ["echo: hello", NOTICE]
    waiting = json.loads(ok(stack.cli("sessions", "waiting", "--json")))["sessions"]
    assert key in [s["key"] for s in waiting]

    assert "Maria has" in ok(stack.cli("sessions", "takeover", key, "--operator", "Maria"))
    lost = stack.cli("sessions", "takeover", key, "--operator", "Joao")
    assert lost.returncode == 1 and "taken by Maria" in lost.stderr  # one owner, and the other is told who

    stack.whatsapp(WA_ECHO, phone, "is anyone there?")  # stored for Maria: no Agent, no second notice
    stack.wait_settled(key, user_messages=3)
    ok(stack.cli("sessions", "reply", key, "Hi, Maria here. Your parcel ships today.", "--operator", "Maria"))
    assert stack.wait_replies(WA_ECHO, phone, 3)[2] == "Hi, Maria here. Your parcel ships today."
    stack.whatsapp(WA_ECHO, phone, "thanks!")
    stack.wait_settled(key, user_messages=4)

    ok(stack.cli("sessions", "handback", key, "--operator", "Maria"))
    stack.whatsapp(WA_ECHO, phone, "bye")
    assert stack.wait_replies(WA_ECHO, phone, 4)[3] == "echo: bye"
    assert stack.replies(WA_ECHO, phone) == ["echo: hello", NOTICE, "Hi, Maria here. Your parcel ships today.",
                                             "echo: bye"]  # each sent once, in the session's order
    rows = stack.messages(key)
    assert [(m["role"], m["sender_name"], m["text"]) for m in rows if m["role"] == "assistant"][2] == (
        "assistant", "Maria", "Hi, Maria here. Your parcel ships today.")
    assert all(m["delivery_status"] in (None, "sent") for m in rows)
    handoff_events = ("handoff_requested", "taken_over", "returned")  # besides dormancy, at this config's short idle
    assert [e for e in stack.events(key) if e in handoff_events] == list(handoff_events)
    assert stack.session(key)["mode"] == "agent"


def test_telegram_operator_takes_a_session_from_the_agent(stack):
    chat = 730_000_000 + stack.next_id()
    key = f"{TG_ECHO}:dm:{chat}"
    stack.telegram(TG_ECHO, chat, chat, "Ana", "where is my order?")
    assert stack.wait_replies(TG_ECHO, chat, 1) == ["echo: where is my order?"]
    ok(stack.cli("sessions", "takeover", key, "--operator", "Maria"))
    stack.telegram(TG_ECHO, chat, chat, "Ana", "hello?")  # taken straight from the Agent: told once, now
    assert stack.wait_replies(TG_ECHO, chat, 2)[1] == NOTICE
    ok(stack.cli("sessions", "reply", key, "Maria here, checking your order.", "--operator", "Maria"))
    assert stack.wait_replies(TG_ECHO, chat, 3)[2] == "Maria here, checking your order."
    shown = ok(stack.cli("sessions", "show", key))
    assert "taken_over by Maria" in shown and "Maria: Maria here, checking your order." in shown
    ok(stack.cli("sessions", "handback", key))
    stack.telegram(TG_ECHO, chat, chat, "Ana", "thanks")
    assert stack.wait_replies(TG_ECHO, chat, 4)[3] == "echo: thanks"
