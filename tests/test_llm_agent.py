"""The OpenAI-compatible Agent against a real local HTTP stand-in: the exact request, retries, the fallback policy."""

from __future__ import annotations

import re
import socket
import sys
import time
import types
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cli.standins.llm import StandInLLM
from workers.agents import Conversation, Utterance, load_agent
from shared.errors import ConfigError
from workers.llm import (
    DEFAULT_FALLBACK_TEXT,
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_TEMPERATURE,
    OpenAIChatAgent,
    failures_total,
)
from workers.testing import run_conversation

KEY = "sk-test-5ecret-key-0123456789"
CANNED = "Your order 48213 left our warehouse yesterday."


@pytest.fixture
def llm():
    with StandInLLM(responder=lambda body: CANNED) as server:
        yield server


@pytest.fixture
def make_agent(llm):
    """Builds Agents pointed at the stand-in (back-off waits recorded, not slept); closes them afterwards."""
    made: list[OpenAIChatAgent] = []

    def make(waits: list[float] | None = None, **options) -> OpenAIChatAgent:
        options.setdefault("base_url", llm.base())
        options.setdefault("model", "acme-support-1")
        options.setdefault("api_key_env", "ACME_LLM_KEY")
        env = {"ACME_LLM_KEY": KEY, **options.pop("env", {})}
        agent = OpenAIChatAgent(env=env, sleep=(waits.append if waits is not None else lambda _s: None), **options)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.close()


def user(text: str, name: str = "Ana", sender_id: str = "5511") -> Utterance:
    return Utterance("user", name, text, sender_id)


def bot(text: str) -> Utterance:
    return Utterance("assistant", "Acme", text)


def dm(message: str, *history: Utterance, key: str = "wa:dm:5511") -> Conversation:
    return Conversation("acme-whatsapp", key, "dm", tuple(history), user(message))


def group(message: Utterance, *history: Utterance) -> Conversation:
    return Conversation("acme-whatsapp", "wa:group:grp1", "group", tuple(history), message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the request -------------------------------------------------------------------------------------------------


def test_dm_request_is_exact(llm, make_agent):
    agent = make_agent(system_prompt="You are Acme's support assistant.", temperature=0.2, max_tokens=300)
    conversation = dm("where is it?", user("my order 48213 has not arrived"), bot("Sorry! I noted order 48213."))
    assert agent.reply(conversation) == CANNED
    [req] = llm.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.headers["content-type"] == "application/json"
    assert req.body == {
        "model": "acme-support-1",
        "temperature": 0.2,
        "max_tokens": 300,
        "messages": [
            {"role": "system", "content": "You are Acme's support assistant."},
            {"role": "user", "content": "my order 48213 has not arrived"},
            {"role": "assistant", "content": "Sorry! I noted order 48213."},
            {"role": "user", "content": "where is it?"},
        ],
    }


def test_group_messages_say_who_said_them(llm, make_agent):
    agent = make_agent(system_prompt="Be brief.")
    conversation = group(
        user("is it on its way?", name="Carla", sender_id="5533"),
        user("our order 55501 is missing", name="Bruno", sender_id="5522"),
        bot("I'm checking order 55501."),
        user("same for 55502", name="Ana Lúcia  Souza", sender_id="5544"),
        user("谢谢", name="李雷", sender_id="5555"),
    )
    agent.reply(conversation)
    assert llm.requests[0].body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "name": "Bruno", "content": "Bruno: our order 55501 is missing"},
        {"role": "assistant", "content": "I'm checking order 55501."},
        {"role": "user", "name": "Ana_Lucia_Souza", "content": "Ana Lúcia Souza: same for 55502"},
        {"role": "user", "content": "李雷: 谢谢"},  # no ASCII left for `name`; the prefix still says who
        {"role": "user", "name": "Carla", "content": "Carla: is it on its way?"},
    ]
    assert "5522" not in repr(llm.requests[0].body)  # phone numbers are not sent to the model


def test_each_request_carries_only_its_own_sessions_history(llm, make_agent):
    agent = make_agent()
    ana = dm("and when will it arrive?", user("my order 48213 has not arrived"), bot("Noted order 48213."),
             key="wa:dm:5511")
    bruno = dm("can I change the address?", user("my order 77120 is late", name="Bruno", sender_id="5522"),
               bot("Noted order 77120."), key="wa:dm:5522")
    agent.reply(ana)
    agent.reply(bruno)
    agent.reply(ana)
    sent = [repr(r.body) for r in llm.requests]
    assert "48213" in sent[0] and "arrive" in sent[0] and sent[0] == sent[2]
    assert "77120" in sent[1] and "address" in sent[1]
    for text in ("77120", "address", "late"):
        assert text not in sent[0]
    for text in ("48213", "arrive", "has not arrived"):
        assert text not in sent[1]


def test_earlier_fallback_replies_are_not_given_to_the_model(llm, make_agent):
    agent = make_agent()
    agent.reply(dm("hello again", user("hi"), bot(DEFAULT_FALLBACK_TEXT)))
    assert [m["content"] for m in llm.requests[0].body["messages"][1:]] == ["hi", "hello again"]


def test_defaults_come_from_the_environment(llm):
    env = {"OPENAI_BASE_URL": llm.base(), "OPENAI_API_KEY": KEY, "OPENAI_MODEL": "env-model"}
    agent = OpenAIChatAgent(env=env)
    try:
        assert agent.reply(dm("hi")) == CANNED
    finally:
        agent.close()
    req = llm.requests[0]
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.body == {"model": "env-model", "temperature": DEFAULT_TEMPERATURE,
                        "messages": [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                     {"role": "user", "content": "hi"}]}


def test_loadable_by_name_today_and_keyless_for_a_local_server(llm, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", llm.base())
    monkeypatch.setenv("OPENAI_MODEL", "llama3.1:8b")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    agent = load_agent("workers.llm:OpenAIChatAgent")
    try:
        assert isinstance(agent, OpenAIChatAgent) and agent.reply(dm("hi")) == CANNED
    finally:
        agent.close()
    assert "authorization" not in llm.requests[0].headers
    assert llm.requests[0].body["model"] == "llama3.1:8b"


@pytest.mark.parametrize("options, message", [
    ({"model": ""}, "no model"),
    ({"api_key_env": "UNSET_LLM_KEY"}, "UNSET_LLM_KEY"),
    ({"temperature": 3}, "temperature"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"base_url": "ftp://example.com"}, "base_url"),
])
def test_bad_configuration_stops_at_start(options, message):
    with pytest.raises(ConfigError, match=message):
        OpenAIChatAgent(env={"OPENAI_MODEL": "m"}, **options)


def test_think_preamble_is_removed(llm, make_agent):
    llm.responder = lambda body: "<think>The user wants the order.</think>\n\nIt ships today."
    assert make_agent().reply(dm("hi")) == "It ships today."


# -- retries ---------------------------------------------------------------------------------------------------


def test_500_then_success_is_retried(llm, make_agent):
    waits: list[float] = []
    agent = make_agent(waits)
    llm.fail_next(500, {"error": {"message": "overloaded"}})
    before = failures_total()
    with capture_logs() as logs:
        assert agent.reply(dm("hi")) == CANNED
    assert len(llm.requests) == 2 and llm.requests[0].body == llm.requests[1].body
    assert len(waits) == 1
    assert failures_total() == before and agent.failures.total == 0
    assert [e["event"] for e in logs] == ["outbound.retry", "agent.backend_replied"]


def test_429_waits_as_long_as_retry_after_says(llm, make_agent):
    waits: list[float] = []
    agent = make_agent(waits)
    llm.fail_next(429, {"error": {"message": "rate limited"}}, headers={"Retry-After": "2"})
    assert agent.reply(dm("hi")) == CANNED
    assert waits == [2.0] and len(llm.requests) == 2


def test_read_timeout_is_retried(llm, make_agent):
    agent = make_agent(timeout_s=0.3)
    llm.slow_next(1.0)
    assert agent.reply(dm("hi")) == CANNED
    assert len(llm.requests) == 2


# -- the fallback policy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("status, reason", [(503, "http_5xx"), (429, "http_429")])
def test_backend_still_failing_after_retries_gets_the_fallback(llm, make_agent, status, reason):
    waits: list[float] = []
    agent = make_agent(waits, fallback_text="We're having trouble, back soon!")
    for _ in range(5):
        llm.fail_next(status, {"error": {"message": "busy"}}, headers={"Retry-After": "1"})
    before = failures_total()
    with capture_logs() as logs:
        assert agent.reply(dm("hi")) == "We're having trouble, back soon!"
    assert len(llm.requests) == 5 and waits == [1.0] * 4
    assert failures_total() == before + 1 and agent.failures.by_reason() == {reason: 1}
    [failed] = [e for e in logs if e["event"] == "agent.backend_failed"]
    assert failed["log_level"] == "warning" and failed["status"] == status and failed["reason"] == reason
    assert failed["attempts"] == 5 and failed["channel_id"] == "acme-whatsapp"


def test_connection_refused_gets_the_fallback_and_is_counted(make_agent):
    agent = make_agent(base_url=f"http://127.0.0.1:{free_port()}/v1")
    before = failures_total()
    with capture_logs() as logs:
        assert agent.reply(dm("hi")) == DEFAULT_FALLBACK_TEXT
    assert failures_total() == before + 1 and agent.failures.by_reason() == {"network": 1}
    [failed] = [e for e in logs if e["event"] == "agent.backend_failed"]
    assert failed["status"] is None and failed["error"].startswith("network: ConnectionError")
    assert KEY not in repr(logs)


def test_bad_key_is_logged_as_an_error_and_not_retried(llm, make_agent):
    agent = make_agent()
    llm.fail_next(401, {"error": {"message": f"Incorrect API key provided: {KEY}.", "code": "invalid_api_key"}})
    with capture_logs() as logs:
        assert agent.reply(dm("hi")) == DEFAULT_FALLBACK_TEXT
    assert len(llm.requests) == 1
    [failed] = [e for e in logs if e["event"] == "agent.backend_failed"]
    assert failed["log_level"] == "error" and failed["status"] == 401 and failed["reason"] == "http_4xx"
    assert "invalid_api_key" in failed["error"] and KEY not in repr(logs) and "5ecret" not in repr(logs)
    assert agent.failures.by_reason() == {"http_4xx": 1}


@pytest.mark.parametrize("body", [
    b"<html>502 Bad Gateway</html>",
    {"choices": []},
    {"choices": [{"message": {"role": "assistant", "content": None}, "finish_reason": "content_filter"}]},
    {"object": "error", "message": "model not loaded"},
])
def test_malformed_answer_gets_the_fallback(llm, make_agent, body):
    agent = make_agent()
    llm.fail_next(200, body)
    with capture_logs() as logs:
        assert agent.reply(dm("hi")) == DEFAULT_FALLBACK_TEXT
    assert agent.failures.by_reason() == {"malformed": 1}
    assert [e["reason"] for e in logs if e["event"] == "agent.backend_failed"] == ["malformed"]


def test_slow_backend_is_cut_off_by_the_reply_budget(llm, make_agent):
    agent = make_agent(timeout_s=10, budget_s=0.5)
    for _ in range(5):
        llm.slow_next(2.0)
    started = time.monotonic()
    assert agent.reply(dm("hi")) == DEFAULT_FALLBACK_TEXT
    assert time.monotonic() - started < 1.5
    assert len(llm.requests) == 1  # later attempts are not even sent once the budget is used up
    assert agent.failures.by_reason() == {"network": 1}


def test_empty_fallback_text_means_silence(make_agent):
    agent = make_agent(base_url=f"http://127.0.0.1:{free_port()}/v1", fallback_text="")
    assert agent.reply(dm("hi")) is None
    assert agent.failures.total == 1


# -- through the real turn (TurnRunner + SQLite) -------------------------------------------------------------------


def test_a_multi_turn_session_sends_its_growing_history(llm, make_agent):
    llm.responder = lambda body: f"reply {len(llm.requests)}"
    agent = make_agent(system_prompt="S")
    replies = run_conversation(agent, ["my order 48213 is late", "can you check it?", "/new", "hello"])
    assert replies == ["reply 1", "reply 2", "Started a new conversation. Earlier messages won't be used from now on.",
                       "reply 3"]
    assert [r.body["messages"] for r in llm.requests] == [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "my order 48213 is late"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "my order 48213 is late"},
         {"role": "assistant", "content": "reply 1"}, {"role": "user", "content": "can you check it?"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "hello"}],  # /new: a fresh context
    ]


def test_a_group_session_through_the_turn_names_its_members(llm, make_agent):
    llm.responder = lambda body: "ok"
    agent = make_agent(system_prompt="S")
    run_conversation(agent, [("Bruno", "our order 55501 is missing"), ("Carla", "any news?")])
    assert llm.requests[-1].body["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "name": "Bruno", "content": "Bruno: our order 55501 is missing"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "name": "Carla", "content": "Carla: any news?"},
    ]


# -- the documentation's examples run as written ---------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "agents.md"


def test_the_docs_examples_work(monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.DOTALL)
    [source] = [b for b in blocks if b.startswith("# myagents.py")]
    module = types.ModuleType("myagents")
    exec(compile(source, f"{DOCS}:myagents.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "myagents", module)
    ran = []
    for block in blocks:
        if block.startswith(("# myagents.py", "class Agent(")) or "OpenAIChatAgent):" in block:
            continue  # the module itself, the subclass example (needs a key), the protocol
        namespace: dict = {"OrderDesk": module.OrderDesk}
        exec(compile(block, f"{DOCS}:example", "exec"), namespace)
        for name, fn in namespace.items():
            if name.startswith("test_") and callable(fn):
                fn()
                ran.append(name)
    assert len(ran) == 4


def test_run_conversation_takes_functions_and_raises_the_agents_error():
    seen: list[Conversation] = []
    assert run_conversation(lambda c: f"{len(c.history)}", ["a", "b"], seen=seen) == ["0", "2"]
    assert [c.message.text for c in seen] == ["a", "b"] and seen[1].chat_kind == "dm"

    def broken(conversation):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_conversation(broken, ["hi"])


# -- handing over to a person ------------------------------------------------------------------------------------


def tool_call(arguments: str) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "hand_over_to_person", "arguments": arguments}}]}


def test_the_handoff_tool_is_offered_only_when_enabled(llm, make_agent):
    make_agent().reply(dm("hi"))
    make_agent(handoff_tool=True).reply(dm("hi"))
    without, offered = llm.requests
    assert "tools" not in without.body
    assert [t["function"]["name"] for t in offered.body["tools"]] == ["hand_over_to_person"]
    assert offered.body["tools"][0]["function"]["parameters"]["required"] == ["reason"]


def test_the_models_handoff_call_becomes_a_handoff(llm, make_agent):
    from workers.agents import Handoff

    llm.responder = lambda body: tool_call('{"reason": "refund above the limit", "message": "A colleague will help."}')
    assert make_agent(handoff_tool=True).reply(dm("I want my money back")) == Handoff(
        "refund above the limit", "A colleague will help.")
    llm.responder = lambda body: tool_call("not json")  # arguments it got wrong still hand over
    assert make_agent(handoff_tool=True).reply(dm("a person please")) == Handoff("the model asked for a person")


def test_a_handoff_through_the_turn_puts_the_session_in_the_waiting_queue(llm, make_agent):
    llm.responder = lambda body: tool_call('{"reason": "angry customer"}')
    replies = run_conversation(make_agent(handoff_tool=True), ["this is the third time I write!", "hello?"])
    assert replies == ["A person will answer shortly.", None]  # told once; the second message waits for a person
    assert len(llm.requests) == 1  # the model was not asked again
