"""The operators' commands (`sessions list|show|new|erase|export|stuck`, `partitions`, `check`, `worker-alive`)
against real databases (SQLite and PostgreSQL), a real Redis broker database and, for `partitions` and the
liveness heartbeat, real `chatsessions worker` processes. Sessions are made by the real turn code."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pytest
import redis
from sqlalchemy import select, update

from cli.main import main
from workers.agents import DemoAgent
from shared.config import get_settings
from shared.db import engine_for, transaction
from shared.messages import DM, GROUP, InboundMessage
from shared.models import ChatSession, DeadLetter, InboxItem, Message
from shared.partitioning import partition_of, queue_name
from workers.store import Store, now
from workers.testing import RecordingChannel
from workers.runner import TurnRunner

REPO = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("OPS_REDIS_URL", "redis://127.0.0.1:6379/12")  # this file's own database
PARTITIONS = 16

SECRETS = {
    "SECRET_KEY": "test-secret-key-0123456789abcdefghijklmnop",
    "OPS_WA_APP_SECRET": "wa-app-secret", "OPS_WA_VERIFY_TOKEN": "wa-verify", "OPS_WA_ACCESS_TOKEN": "wa-access",
    "OPS_TG_BOT_TOKEN": "424242:tg-bot-token", "OPS_TG_SECRET": "tg-secret",
    "OPS_DC_BOT_TOKEN": "dc-bot-token",
    "OPS_DC_PUBLIC_KEY": "de18658095d004b28d2eb7638b14aac7ce85ed7567e7839fe81df237691194e8",
}


def config_toml(api_base: str = "http://127.0.0.1:9") -> str:
    return f"""
partitions = {PARTITIONS}
lease_seconds = 30

[[channels]]
id = "wa"
platform = "whatsapp"
agent = "demo"
api_base = "{api_base}/wa"
secrets = {{ app_secret = "OPS_WA_APP_SECRET", verify_token = "OPS_WA_VERIFY_TOKEN", access_token = "OPS_WA_ACCESS_TOKEN" }}
options = {{ phone_number_id = "100000000000001", api_version = "v21.0" }}

[[channels]]
id = "tg"
platform = "telegram"
agent = "demo"
api_base = "{api_base}/tg"
secrets = {{ bot_token = "OPS_TG_BOT_TOKEN", secret_token = "OPS_TG_SECRET" }}
options = {{ bot_username = "OpsBot" }}

[[channels]]
id = "dc"
platform = "discord"
agent = "demo"
api_base = "{api_base}/dc"
secrets = {{ bot_token = "OPS_DC_BOT_TOKEN", public_key = "OPS_DC_PUBLIC_KEY" }}
options = {{ application_id = "1270000000000000001" }}
"""


# --------------------------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def broker():
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {REDIS_URL} is not reachable (start it, make setup): {exc}")
    yield client
    client.flushdb()
    client.close()


@dataclass
class Env:
    url: str
    vars: dict[str, str]
    config: Path
    redis: redis.Redis

    def settings(self):
        get_settings.cache_clear()
        return get_settings()


def _setenv(monkeypatch, values: dict[str, str]) -> None:
    for name in ("LEASE_SECONDS", "VISIBILITY_TIMEOUT", "PARTITIONS", "WORKER_HEARTBEAT_FILE"):
        monkeypatch.delenv(name, raising=False)
    for k, v in values.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def env(database_url, broker, tmp_path, monkeypatch):
    broker.flushdb()
    config = tmp_path / "channels.toml"
    config.write_text(config_toml())
    values = {**SECRETS, "CHATSESSIONS_CONFIG": str(config), "DATABASE_URL": database_url,
              "BROKER_URL": REDIS_URL, "REDIS_URL": REDIS_URL, "LOG_LEVEL": "WARNING"}
    _setenv(monkeypatch, values)
    get_settings.cache_clear()
    yield Env(database_url, values, config, broker)
    get_settings.cache_clear()


class FailingAgent:
    def reply(self, conversation):
        raise RuntimeError("the model is down")


_pids = itertools.count(1)


class Chats:
    """Real turns through TurnRunner on the configured channels, with per-session ingress numbers."""

    def __init__(self, settings, agents=None):
        store = Store(settings.database_url)
        store.sync_channels(settings.channels.values())
        self.channels = {cid: RecordingChannel(c) for cid, c in settings.channels.items()}
        self.runner = TurnRunner(settings=settings, store=store, channels=self.channels,
                                 agents=agents or {cid: DemoAgent() for cid in settings.channels})
        self.runner.agent_attempts, self.runner.agent_backoff_s = 1, 0.0
        self.seqs: dict[str, int] = {}

    def message(self, channel: str, user: str, text: str, *, chat: str | None = None, kind: str = DM,
                name: str = "Ana") -> InboundMessage:
        chat = chat or user
        key = f"{channel}:{kind}:{chat}"
        self.seqs[key] = self.seqs.get(key, 0) + 1
        platform = {"wa": "whatsapp", "tg": "telegram", "dc": "discord"}[channel]
        return InboundMessage(channel_id=channel, platform=platform, session_key=key, chat_id=chat, chat_kind=kind,
                              sender_id=user, sender_name=name, text=text,
                              platform_message_id=f"{channel}.{next(_pids)}", sent_at=time.time(),
                              seq=self.seqs[key], received_at=time.time())

    def say(self, channel: str, user: str, text: str, **kw) -> str:
        return self.runner.handle(self.message(channel, user, text, **kw))

    def last_reply(self, channel: str) -> str:
        return self.channels[channel].sent[-1][1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """`chatsessions ARGV` in this process; (exit code, stdout, stderr)."""
    get_settings.cache_clear()
    capsys.readouterr()  # what the turns logged before
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str) -> tuple[int, object]:
    code, out, err = run(capsys, *argv, "--json")
    try:
        return code, json.loads(out)
    except ValueError:
        pytest.fail(f"not JSON (rc={code}): {out!r} {err!r}")


def cli_process(env_vars: dict[str, str], *argv: str, stdin=subprocess.DEVNULL, timeout: float = 60):
    """`python -m cli ARGV` as its own process: the exit code scripts see."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("OPS_", "CHATSESSIONS_"))}
    full.update(env_vars)
    return subprocess.run([sys.executable, "-m", "cli", *argv], env=full, cwd=REPO, stdin=stdin,
                          capture_output=True, text=True, timeout=timeout, check=False)


def age(url: str, key: str, **values) -> None:
    """Move a session's times into the past (an hour passes, a lease runs out)."""
    with transaction(url) as s:
        s.execute(update(ChatSession).where(ChatSession.key == key).values(**values))


# --------------------------------------------------------------------------------------------------------------------
# sessions list / show


def test_list_filters_by_channel_status_and_idle_time_with_pages(env, capsys):
    chats = Chats(env.settings())
    chats.say("wa", "5511", "hello")
    chats.say("wa", "5522", "hi there", name="Bruno")
    chats.say("tg", "777", "hey", name="Carla")
    chats.say("wa", "5533", "our order", chat="grp1", kind=GROUP, name="Dan")
    age(env.url, "wa:dm:5522", last_activity_at=now() - timedelta(hours=2), status="dormant")

    code, doc = run_json(capsys, "sessions", "list")
    assert code == 0 and doc["total"] == 4 and len(doc["sessions"]) == 4
    assert doc["sessions"][-1]["key"] == "wa:dm:5522"  # least recently active last
    first = doc["sessions"][0]
    assert first["partition"] == partition_of(first["key"], PARTITIONS)

    assert [s["key"] for s in run_json(capsys, "sessions", "list", "--status", "dormant")[1]["sessions"]] == [
        "wa:dm:5522"]
    assert [s["key"] for s in run_json(capsys, "sessions", "list", "--idle-minutes", "60")[1]["sessions"]] == [
        "wa:dm:5522"]
    assert [s["key"] for s in run_json(capsys, "sessions", "list", "--channel", "tg")[1]["sessions"]] == ["tg:dm:777"]
    assert run_json(capsys, "sessions", "list", "--status", "active", "--channel", "wa")[1]["total"] == 2

    code, page2 = run_json(capsys, "sessions", "list", "--limit", "3", "--page", "2")
    assert code == 0 and page2["pages"] == 2 and page2["total"] == 4 and len(page2["sessions"]) == 1
    _, page1 = run_json(capsys, "sessions", "list", "--limit", "3")
    assert {s["key"] for s in page1["sessions"]} | {s["key"] for s in page2["sessions"]} == {
        "wa:dm:5511", "wa:dm:5522", "tg:dm:777", "wa:group:grp1"}

    code, out, _ = run(capsys, "sessions", "list", "--limit", "3")
    assert code == 0
    assert out.splitlines()[0].split() == ["KEY", "PART", "STATUS", "GEN", "MSGS", "LAST", "ACTIVITY", "(UTC)", "IDLE"]
    assert "page 1 of 2, 4 session(s); next: --page 2" in out

    assert run(capsys, "sessions", "list", "--status", "asleep")[0] == 2  # usage error
    assert run(capsys, "sessions", "list", "--page", "0")[0] == 2


def test_show_prints_the_transcript_or_everything_as_json(env, capsys):
    chats = Chats(env.settings())
    chats.say("wa", "5511", "hi, my name is Ana")
    chats.say("wa", "5511", "where is my order?")

    code, doc = run_json(capsys, "sessions", "show", "wa:dm:5511")
    assert code == 0
    assert doc["session"]["key"] == "wa:dm:5511" and doc["session"]["generation"] == 1
    assert doc["session"]["partition"] == partition_of("wa:dm:5511", PARTITIONS)
    assert [m["role"] for m in doc["messages"]] == ["user", "assistant", "user", "assistant"]
    assert doc["messages"][0]["text"] == "hi, my name is Ana" and doc["messages"][0]["seq"] == 1
    assert {m["delivery_status"] for m in doc["messages"] if m["role"] == "assistant"} == {"sent"}
    assert [e["event"] for e in doc["events"]] == ["created"]
    assert doc["inbox"] == [] and doc["dead_letters"] == []

    code, out, _ = run(capsys, "sessions", "show", "wa:dm:5511")
    assert code == 0 and "session wa:dm:5511  [active, generation 1]" in out and "Ana: where is my order?" in out

    code, out, err = run(capsys, "sessions", "show", "wa:dm:nobody")
    assert code == 1 and "no session 'wa:dm:nobody'" in err


def test_show_names_the_session_as_the_logs_do(env, capsys):
    """Logs carry a session's pseudonym, not its key (it holds a phone number): `show` says which it is."""
    from shared.logs import pseudonym

    Chats(env.settings()).say("wa", "5511", "hello")
    expected = pseudonym(SECRETS["SECRET_KEY"], "wa:dm:5511")
    assert len(expected) == 22 and "5511" not in expected
    code, doc = run_json(capsys, "sessions", "show", "wa:dm:5511")
    assert code == 0 and doc["log_pseudonym"] == expected
    code, out, _ = run(capsys, "sessions", "show", "wa:dm:5511")
    assert code == 0 and f"in the logs as {expected}" in out


# --------------------------------------------------------------------------------------------------------------------
# sessions new


def test_new_starts_a_fresh_context_for_the_next_turn(env, capsys):
    chats = Chats(env.settings())
    chats.say("wa", "5511", "my name is Chen")
    chats.say("wa", "5511", "what is my name?")
    assert chats.last_reply("wa") == "Your name is Chen."

    code, out, _ = run(capsys, "sessions", "new", "wa:dm:5511")
    assert code == 0 and "generation 2" in out

    chats.say("wa", "5511", "what is my name?")
    assert chats.last_reply("wa") == "You haven't told me your name yet."
    _, doc = run_json(capsys, "sessions", "show", "wa:dm:5511")
    assert doc["session"]["generation"] == 2 and doc["session"]["lease_until"] is None
    assert [e["event"] for e in doc["events"]] == ["created", "new_session"]
    assert [m["generation"] for m in doc["messages"]] == [1, 1, 1, 1, 2, 2]  # older messages stay stored

    assert run(capsys, "sessions", "new", "wa:dm:nobody")[0] == 1


def test_new_waits_for_a_running_turn_and_gives_up(env, capsys):
    chats = Chats(env.settings())
    chats.say("wa", "5511", "hello")
    age(env.url, "wa:dm:5511", lease_until=now() + timedelta(minutes=5))  # a turn holds the lease
    code, _, err = run(capsys, "sessions", "new", "wa:dm:5511", "--wait", "0.5")
    assert code == 1 and "busy" in err
    _, doc = run_json(capsys, "sessions", "show", "wa:dm:5511")
    assert doc["session"]["generation"] == 1 and [e["event"] for e in doc["events"]] == ["created"]


# --------------------------------------------------------------------------------------------------------------------
# sessions erase / export


def _two_users(env) -> Chats:
    """Ana (5511) in DMs on WhatsApp and Telegram, with a dead letter, and in a group with Bruno (5522)."""
    settings = env.settings()
    chats = Chats(settings)
    chats.say("wa", "5511", "my order 48213 has not arrived")
    chats.say("wa", "5511", "my name is Ana")
    chats.say("tg", "5511", "hello from telegram")
    chats.say("wa", "5522", "my order 77120 is late", name="Bruno")
    chats.say("wa", "5511", "our order 55501 is missing", chat="grp1", kind=GROUP)
    chats.say("wa", "5522", "where is the order?", chat="grp1", kind=GROUP, name="Bruno")
    failing = Chats(settings, agents={cid: FailingAgent() for cid in settings.channels})
    failing.seqs = chats.seqs
    assert failing.say("tg", "5511", "this one fails") == "dead_lettered"
    env.redis.set("seq:wa:dm:5511", 2)
    env.redis.set("seq:tg:dm:5511", 2)
    env.redis.set("seq:wa:dm:5522", 1)
    return chats


def test_erase_deletes_everything_of_one_user_and_nothing_else(env, capsys):
    _two_users(env)
    code, dry = run_json(capsys, "sessions", "erase", "--user", "5511", "--dry-run")
    assert code == 0 and dry["erased"] is False and sorted(dry["sessions"]) == ["tg:dm:5511", "wa:dm:5511"]
    with transaction(env.url) as s:
        assert s.scalar(select(Message.id).where(Message.sender_id == "5511").limit(1)) is not None  # untouched

    code, report = run_json(capsys, "sessions", "erase", "--user", "5511", "--yes")
    assert code == 0 and report["erased"] is True
    assert sorted(report["sessions"]) == ["tg:dm:5511", "wa:dm:5511"]
    # wa DM: 2 questions + 2 replies; tg DM: 1 + 1 (the failed one is a dead letter); group: 1 + its reply
    assert report["messages"] == 8 and report["dead_letters"] == 1 and report["events"] == 2
    assert report["group_sessions"] == ["wa:group:grp1"] and report["redis_keys"] == 2
    assert report == {**dry, "erased": True, "redis_keys": 2, "redis_error": None}  # the preview was exact

    with transaction(env.url) as s:
        assert s.scalars(select(Message).where(Message.sender_id == "5511")).all() == []
        assert s.scalars(select(ChatSession.key).where(ChatSession.chat_id == "5511")).all() == []
        assert s.scalars(select(DeadLetter)).all() == []
        bruno = s.scalars(select(Message.text).join(ChatSession).where(ChatSession.key == "wa:dm:5522")).all()
        group = s.scalars(select(Message.sender_name).join(ChatSession)
                          .where(ChatSession.key == "wa:group:grp1")).all()
    assert len(bruno) == 2 and group == ["Bruno", "Agent"]  # Ana's group message went with the reply to it
    assert env.redis.get("seq:wa:dm:5511") is None and env.redis.get("seq:wa:dm:5522") == b"1"

    code, out, _ = run(capsys, "sessions", "erase", "--user", "5511", "--yes")
    assert code == 1 and "nothing stored about user 5511" in out
    code, _, err = run(capsys, "sessions", "export", "--user", "5511")
    assert code == 1 and "nothing stored" in err


def test_erase_shows_progress_and_a_readable_report(env, capsys):
    _two_users(env)
    code, out, err = run(capsys, "sessions", "erase", "--user", "5511", "--channel", "wa", "--yes")
    assert code == 0
    assert "erasing 5511: 3/3 (100%)" in err
    assert "direct-message sessions: 1 (wa:dm:5511)" in out and "dead letters: 0" in out
    _, doc = run_json(capsys, "sessions", "show", "tg:dm:5511")  # another channel: kept
    assert len(doc["dead_letters"]) == 1


def test_erase_without_yes_refuses_when_not_interactive(env):
    _two_users(env)
    done = cli_process(env.vars, "sessions", "erase", "--user", "5511")
    assert done.returncode == 2, done.stderr
    assert "refusing to erase without --yes" in done.stderr and "direct-message sessions: 2" in done.stderr
    with transaction(env.url) as s:
        assert len(s.scalars(select(Message).where(Message.sender_id == "5511")).all()) == 4


def test_export_has_everything_of_the_user_and_nothing_of_others(env, capsys, tmp_path):
    _two_users(env)
    code, out, _ = run(capsys, "sessions", "export", "--user", "5511")
    assert code == 0
    doc = json.loads(out)
    assert doc["user_id"] == "5511"
    sessions = {s["session"]["key"]: s for s in doc["direct_sessions"]}
    assert sorted(sessions) == ["tg:dm:5511", "wa:dm:5511"]
    assert [m["text"] for m in sessions["wa:dm:5511"]["messages"] if m["role"] == "user"] == [
        "my order 48213 has not arrived", "my name is Ana"]
    assert [e["event"] for e in sessions["wa:dm:5511"]["events"]] == ["created"]
    assert [d["message"]["text"] for d in sessions["tg:dm:5511"]["dead_letters"]] == ["this one fails"]
    assert [(m["session_key"], m["text"]) for m in doc["group_messages"]] == [
        ("wa:group:grp1", "our order 55501 is missing")]
    assert "55501" in doc["group_messages"][0]["replies"][0]["text"]
    assert "77120" not in out and "where is the order?" not in out  # Bruno's words are not Ana's data

    target = tmp_path / "export.json"
    code, _, err = run(capsys, "sessions", "export", "--user", "5511", "--output", str(target))
    assert code == 0 and json.loads(target.read_text())["user_id"] == "5511" and "2 session(s)" in err


def test_a_percent_or_underscore_in_a_user_id_matches_only_itself(env, capsys):
    """The search of dead letters and waiting messages by user id is a LIKE: `%` and `_` are escaped."""
    from shared.privacy import _mentioning

    chats = Chats(env.settings())
    senders = ["55_1", "5591", "55%", "55123"]
    with transaction(env.url) as s:
        for n, sender in enumerate(senders):
            m = chats.message("wa", sender, f"message {n}", chat="grp9", kind=GROUP)
            s.add(DeadLetter(channel_id="wa", session_key=m.session_key, platform_message_id=m.platform_message_id,
                             payload=json.dumps(m.to_dict()), error="boom", attempts=3, created_at=now()))
    with transaction(env.url) as s:
        for user in senders:
            found = s.scalars(select(DeadLetter.payload).where(_mentioning(DeadLetter, [user]))).all()
            assert [json.loads(p)["sender_id"] for p in found] == [user], user
    code, out, _ = run(capsys, "sessions", "export", "--user", "55_1")
    assert code == 0 and [d["message"]["sender_id"] for d in json.loads(out)["group_dead_letters"]] == ["55_1"]


# --------------------------------------------------------------------------------------------------------------------
# sessions stuck


def test_stuck_reports_an_expired_lease_and_an_unsent_reply_and_recovers(env, capsys):
    chats = Chats(env.settings())
    chats.say("wa", "5511", "hello")  # its worker will have died mid-turn
    chats.say("wa", "5522", "hello", name="Bruno")  # its reply was committed, never sent
    chats.say("wa", "5533", "hello", name="Carla")  # healthy
    age(env.url, "wa:dm:5511", lease_until=now() - timedelta(seconds=60))
    with transaction(env.url) as s:
        sid = s.scalar(select(ChatSession.id).where(ChatSession.key == "wa:dm:5522"))
        s.execute(update(Message).where(Message.session_id == sid, Message.role == "assistant")
                  .values(delivery_status="pending", created_at=now() - timedelta(minutes=5)))

    code, doc = run_json(capsys, "sessions", "stuck", "--older-than", "30s")
    assert code == 1 and doc["broker_inspected"] is True and doc["recovery"] is None
    stuck = {e["key"]: e for e in doc["stuck"]}
    assert sorted(stuck) == ["wa:dm:5511", "wa:dm:5522"]
    assert "lease held past its end" in stuck["wa:dm:5511"]["reasons"][0]
    assert stuck["wa:dm:5511"]["age_s"] >= 60
    assert stuck["wa:dm:5522"]["unsent_replies"] == 1 and "committed but not sent" in stuck["wa:dm:5522"]["reasons"][0]
    assert 290 <= stuck["wa:dm:5522"]["age_s"] < 400
    assert doc["stuck"][0]["key"] == "wa:dm:5522"  # oldest first

    code, out, _ = run(capsys, "sessions", "stuck", "--older-than", "2m")
    assert code == 1 and "wa:dm:5522" in out and "wa:dm:5511" not in out and "1 stuck session(s)" in out

    code, doc = run_json(capsys, "sessions", "stuck", "--older-than", "30", "--recover")
    assert code == 0, doc  # everything found was fixable
    assert doc["recovery"]["leases_released"] == ["wa:dm:5511"] and doc["recovery"]["sweep_requested"] is True
    with transaction(env.url) as s:
        assert s.scalar(select(ChatSession.lease_until).where(ChatSession.key == "wa:dm:5511")) is None
    queued = [json.loads(raw)["headers"]["task"] for raw in env.redis.lrange("maintenance", 0, -1)]
    from cli.sessions import sweep_task_name

    assert queued == [sweep_task_name()]

    code, doc = run_json(capsys, "sessions", "stuck", "--older-than", "30")
    assert [e["key"] for e in doc["stuck"]] == ["wa:dm:5522"]  # no sweeper runs in this test


def test_stuck_sees_an_inbox_nobody_serves(env, capsys):
    chats = Chats(env.settings())
    chats.say("wa", "5511", "hello")  # seq 1: done
    chats.seqs["wa:dm:5511"] += 1  # seq 2 never arrives
    assert chats.runner.store.accept(chats.message("wa", "5511", "are you there?")).new  # seq 3, not drained
    env.redis.set("seq:wa:dm:5511", 3)
    with transaction(env.url) as s:
        s.execute(update(InboxItem).values(created_at=now() - timedelta(minutes=2)))

    code, doc = run_json(capsys, "sessions", "stuck", "--older-than", "60")
    assert code == 1 and len(doc["stuck"]) == 1
    e = doc["stuck"][0]
    assert e["key"] == "wa:dm:5511" and e["stalled_inbox"] == 1 and e["lost"] == 0
    assert e["reasons"] == ["1 accepted message(s) waiting in the inbox: nobody holds the lease (the sweeper hands "
                            "it back: is beat running?); its head #3 waits for #2, which never arrived"]
    code, out, _ = run(capsys, "sessions", "show", "wa:dm:5511")
    assert code == 0 and "waiting in inbox: #3" in out
    code, doc = run_json(capsys, "sessions", "stuck", "--older-than", "60", "--recover")
    assert code == 0 and doc["recovery"]["sweep_requested"] is True


def test_stuck_sees_dead_letters_and_messages_nobody_consumes(env, capsys):
    settings = env.settings()
    failing = Chats(settings, agents={cid: FailingAgent() for cid in settings.channels})
    failing.say("tg", "777", "this fails", name="Carla")
    from ingress.publisher import Publisher

    waiting = Chats(settings).message("wa", "5599", "is anyone there?")
    Publisher(settings).publish([waiting])  # no worker consumes its partition in this test
    env.redis.set("seq:wa:dm:5588", 3)  # numbered by an ingress, never published, nothing stored

    code, doc = run_json(capsys, "sessions", "stuck", "--older-than", "0")
    assert code == 1
    stuck = {e["key"]: e for e in doc["stuck"]}
    assert sorted(stuck) == ["tg:dm:777", "wa:dm:5588", "wa:dm:5599"]
    assert stuck["tg:dm:777"]["dead_letters"] and "dead-lettered" in stuck["tg:dm:777"]["reasons"][0]
    part = partition_of("wa:dm:5599", PARTITIONS)
    assert stuck["wa:dm:5599"]["unconsumed"] == 1
    assert f"in {queue_name(part)}, which has no consumer" in stuck["wa:dm:5599"]["reasons"][0]
    assert stuck["wa:dm:5588"]["lost"] == 3

    code, doc = run_json(capsys, "sessions", "stuck", "--older-than", "0", "--recover")
    advice = "\n".join(doc["recovery"]["advice"])
    assert code == 1  # these need an operator
    assert f"chatsessions deadletters replay {stuck['tg:dm:777']['dead_letters'][0]}" in advice
    assert f"start a worker for partition {part}" in advice and "lost before their turn" in advice
    assert env.redis.llen(queue_name(part)) == 1  # nothing was invented or moved

    # A lost message of a session never stored has no known age: it is reported whatever the threshold.
    code, doc = run_json(capsys, "sessions", "stuck", "--older-than", "1h")
    assert code == 1 and [(e["key"], e["age_s"]) for e in doc["stuck"]] == [("wa:dm:5588", None)]
    env.redis.delete("seq:wa:dm:5588")
    assert run_json(capsys, "sessions", "stuck", "--older-than", "1h")[0] == 0


# --------------------------------------------------------------------------------------------------------------------
# check


class PlatformAPI:
    """A stand-in for the three platforms' read endpoints, checking the credentials like the real ones."""

    def __init__(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args):
                pass

            def do_GET(self):
                status, body = api.answer(self.path, self.headers.get("Authorization", ""))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, path: str, auth: str):
        if path.startswith("/wa/v21.0/100000000000001"):
            ok = auth == f"Bearer {SECRETS['OPS_WA_ACCESS_TOKEN']}"
            return (200, {"id": "100000000000001", "display_phone_number": "+55 11 4000-0000"}) if ok else (
                401, {"error": {"message": "Invalid OAuth access token", "code": 190}})
        if path == f"/tg/bot{SECRETS['OPS_TG_BOT_TOKEN']}/getMe":
            return 200, {"ok": True, "result": {"id": 424242, "is_bot": True, "username": "OpsBot"}}
        if path.startswith("/tg/bot"):
            return 401, {"ok": False, "error_code": 401, "description": "Unauthorized"}
        if path == "/dc/users/@me":
            ok = auth == f"Bot {SECRETS['OPS_DC_BOT_TOKEN']}"
            return (200, {"id": "1270000000000000001", "username": "opsbot"}) if ok else (
                401, {"message": "401: Unauthorized", "code": 0})
        return 404, {"error": "no route"}

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def platform_api(env):
    api = PlatformAPI()
    env.config.write_text(config_toml(api.base))
    yield api
    api.stop()


def test_check_passes_with_a_good_config_and_reachable_services(env, capsys, platform_api):
    code, out, _ = run(capsys, "check")
    assert code == 0, out
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["ok", "config"], ["ok", "channel"], ["ok", "channel"], ["ok", "channel"],
        ["ok", "database"], ["ok", "broker"], ["ok", "redis"]]
    assert "3 channel(s), 16 partitions" in lines[0] and "(schema" in out and "Redis " in out

    code, out, _ = run(capsys, "check", "--platforms")
    assert code == 0, out
    assert "ok    platform wa" in out and "+55 11 4000-0000" in out
    assert "ok    platform tg" in out and "bot @OpsBot" in out
    assert "ok    platform dc" in out and "opsbot" in out


def test_check_fails_on_refused_credentials_without_printing_them(env, capsys, platform_api, monkeypatch):
    monkeypatch.setenv("OPS_TG_BOT_TOKEN", "999:revoked-token")
    monkeypatch.setenv("OPS_WA_ACCESS_TOKEN", "expired-access-token")
    code, doc = run_json(capsys, "check", "--platforms")
    assert code == 1 and doc["ok"] is False
    checks = {c["name"]: c for c in doc["checks"]}
    assert not checks["platform tg"]["ok"] and "credentials were refused" in checks["platform tg"]["detail"]
    assert not checks["platform wa"]["ok"] and "HTTP 401" in checks["platform wa"]["detail"]
    # ... in the platform's own words
    assert checks["platform tg"]["detail"].endswith("(Unauthorized)")
    assert checks["platform wa"]["detail"].endswith("(Invalid OAuth access token)")
    assert checks["platform dc"]["ok"] and checks["database"]["ok"]
    assert "revoked-token" not in json.dumps(doc) and "expired-access-token" not in json.dumps(doc)


def test_check_fails_when_redis_or_the_database_is_unreachable(env, capsys, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # port 1: nothing listens
    code, out, _ = run(capsys, "check", "--timeout", "2")
    assert code == 1
    assert out.count("FAIL") == 1 and "FAIL  redis" in out and "ConnectionError" in out
    assert "ok    broker" in out and "ok    database" in out

    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    code, out, _ = run(capsys, "check", "--timeout", "2")
    assert code == 1 and "FAIL  database" in out and "FAIL  redis" in out


def test_check_reports_a_missing_secret_as_a_config_error(env):
    values = {k: v for k, v in env.vars.items() if k != "OPS_TG_SECRET"}
    done = cli_process(values, "check")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.startswith("FAIL  config")
    assert "environment variable OPS_TG_SECRET (secrets.secret_token) is not set" in done.stdout

    done = cli_process({**env.vars, "PARTITIONS": "many"}, "check")
    assert done.returncode == 2 and "PARTITIONS='many' is not a number" in done.stdout


# --------------------------------------------------------------------------------------------------------------------
# worker liveness and partitions, with real worker processes


def test_worker_alive_reads_the_heartbeat_file(tmp_path, capsys, monkeypatch):
    beat = tmp_path / "worker.alive"
    monkeypatch.setenv("WORKER_HEARTBEAT_FILE", str(beat))
    code, out, _ = run(capsys, "worker-alive")
    assert code == 1 and "no heartbeat file" in out
    beat.write_text("{}")
    assert run(capsys, "worker-alive", "--max-age", "60")[0] == 0
    os.utime(beat, (time.time() - 120, time.time() - 120))
    code, out, _ = run(capsys, "worker-alive", "--max-age", "60")
    assert code == 1 and "last heartbeat 120s ago" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_worker(values: dict[str, str], log: Path, *argv: str) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("OPS_", "CHATSESSIONS_"))}
    full.update(values)
    full["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{full.get('PATH', '')}"
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "cli", "worker", *argv], env=full, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait_for(predicate, timeout: float, what: str, procs=(), logs=()):
    deadline = time.monotonic() + timeout
    while not predicate():
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}" for log in logs)
            pytest.fail(f"{'a worker exited' if dead else 'timed out'} waiting for {what}\n{tails}")
        time.sleep(0.2)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def test_partitions_and_liveness_with_real_workers(postgres_url, broker, tmp_path, capsys, monkeypatch):
    broker.flushdb()
    config = tmp_path / "channels.toml"
    config.write_text(config_toml())
    values = {**SECRETS, "CHATSESSIONS_CONFIG": str(config), "DATABASE_URL": postgres_url,
              "BROKER_URL": REDIS_URL, "REDIS_URL": REDIS_URL, "LOG_LEVEL": "WARNING", "LOG_FORMAT": "json"}
    _setenv(monkeypatch, values)
    beats = {"a": tmp_path / "a.alive", "b": tmp_path / "b.alive"}
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [
        _start_worker({**values, "WORKER_HEARTBEAT_FILE": str(beats["a"]), "WORKER_HEARTBEAT_SECONDS": "1"},
                      logs[0], "--partitions", "0-7", "--concurrency", "2", "--name", "ops-a@%h"),
        _start_worker({**values, "WORKER_HEARTBEAT_FILE": str(beats["b"]), "WORKER_HEARTBEAT_SECONDS": "1"},
                      logs[1], "--partitions", "7-8", "--concurrency", "2", "--name", "ops-b@%h",
                      "--no-maintenance"),
    ]
    try:
        _wait_for(lambda: all(b.exists() for b in beats.values()), 90, "both heartbeat files", procs, logs)
        first = beats["a"].stat().st_mtime
        _wait_for(lambda: beats["a"].stat().st_mtime > first, 10, "the heartbeat to be renewed", procs, logs)
        assert json.loads(beats["a"].read_text())["pid"] == procs[0].pid

        # One message waits in a partition nobody consumes.
        settings = Env(postgres_url, values, config, broker).settings()
        chat = next(f"55{n:04d}" for n in itertools.count() if partition_of(f"wa:dm:55{n:04d}", PARTITIONS) == 12)
        from ingress.publisher import Publisher

        Publisher(settings).publish([Chats(settings).message("wa", chat, "anyone?")])

        code, doc = run_json(capsys, "partitions", "--timeout", "2")
        assert code == 1 and doc["workers_answered"] is True
        queues = {q["queue"]: q for q in doc["queues"]}
        host = socket.gethostname()
        assert all(queues[f"sessions.{p}"]["consumers"] == [f"ops-a@{host}"] for p in range(7))
        assert queues["sessions.7"]["consumers"] == [f"ops-a@{host}", f"ops-b@{host}"]
        assert queues["sessions.7"]["warnings"] == [f"2 consumers: ops-a@{host}, ops-b@{host}"]
        assert queues["sessions.8"]["consumers"] == [f"ops-b@{host}"] and not queues["sessions.8"]["warnings"]
        assert queues["sessions.12"]["depth"] == 1 and queues["sessions.12"]["warnings"] == [
            "no consumer: 1 message(s) wait"]
        assert 0 <= queues["sessions.12"]["oldest_age_s"] < 60
        assert all(queues[f"sessions.{p}"]["warnings"] == ["no consumer"] for p in (9, 10, 11, 13, 14, 15))
        assert queues["maintenance"]["consumers"] == [f"ops-a@{host}"] and not queues["maintenance"]["warnings"]

        code, out, _ = run(capsys, "partitions", "--timeout", "2")
        assert code == 1 and "warning: sessions.12: no consumer: 1 message(s) wait" in out
        assert "warning: sessions.7: 2 consumers" in out

        alive = cli_process({"WORKER_HEARTBEAT_FILE": str(beats["a"])}, "worker-alive", "--max-age", "30")
        assert alive.returncode == 0 and alive.stdout.startswith("alive"), alive.stdout
    finally:
        _stop(procs)
        with engine_for(postgres_url).begin() as conn:
            conn.exec_driver_sql("TRUNCATE dead_letters, session_events, messages, sessions, channels CASCADE")
        get_settings.cache_clear()
    assert not beats["a"].exists()  # removed at shutdown: a stopped worker is not alive
    dead = cli_process({"WORKER_HEARTBEAT_FILE": str(beats["a"])}, "worker-alive")
    assert dead.returncode == 1 and dead.stdout.startswith("dead")


def test_export_and_erase_by_person_cover_every_linked_id(env, capsys):
    env.config.write_text(config_toml() + '\n[[identities]]\nperson = "ana"\nwhatsapp = "5511"\ntelegram = "7788"\n')
    settings = env.settings()
    chats = Chats(settings)
    chats.say("wa", "5511", "my order 48213 has not arrived")
    chats.say("tg", "7788", "it is Ana again, on telegram")
    chats.say("wa", "5522", "my order 77120 is late", name="Bruno")
    code, out, _ = run(capsys, "sessions", "export", "--user", "ana")
    assert code == 0
    keys = sorted(s["session"]["key"] for s in json.loads(out)["direct_sessions"])
    assert keys == ["tg:dm:7788", "wa:dm:5511"]
    code, report = run_json(capsys, "sessions", "erase", "--user", "7788", "--yes")  # any linked id names her
    assert code == 0 and sorted(report["sessions"]) == ["tg:dm:7788", "wa:dm:5511"]
    with transaction(env.url) as s:
        assert s.scalars(select(ChatSession.key)).all() == ["wa:dm:5522"]


def test_erase_also_deletes_a_web_chat_visitors_reply_box(env, capsys):
    from shared.replybox import box_key

    _two_users(env)
    env.redis.xadd(box_key("wa", "5511"), {"text": "echo: my order 48213 has not arrived"})
    code, report = run_json(capsys, "sessions", "erase", "--user", "5511", "--yes")
    assert code == 0 and report["redis_keys"] == 3  # two counters and the reply box
    assert not env.redis.exists(box_key("wa", "5511"))
