"""The integration stack: REAL PostgreSQL, Redis, gunicorn ingress and celery worker processes.

One stack per test session, started by cli/stack.py (the helper the bench and the fault suite start theirs with):
  * a fresh PostgreSQL database (chatsessions_it_<random>), migrated with `chatsessions db upgrade`, dropped at the end;
  * a Redis database (IT_REDIS_URL, default redis://127.0.0.1:6379/11), FLUSHDB at the start and at the end;
  * a StandInPlatforms in this process: every channel's api_base points at it, it records every reply;
  * `chatsessions ingress` (gunicorn, 2 workers), two `chatsessions worker` pools splitting the 16 partitions
    (a: 0-7 on threads, b: 8-15 on gevent) and one `chatsessions beat` (SWEEP_SECONDS=1) for the dormant sweep.

Nothing is mocked. If PostgreSQL or Redis is unreachable the fixtures FAIL (never skip). Each process logs to a
file under the session's tmp dir; a failing test gets the tail of every log appended to its report.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import pytest
import redis
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg.rows import dict_row

from cli.standins.payloads import (
    discord_snowflake,
    encode,
    sign_discord,
    sign_whatsapp,
    telegram_headers,
    telegram_text,
    whatsapp_text,
)
from cli.processes import Proc, StackError, create_database, drop_database
from cli.stack import Stack as Processes
from cli.standins.platforms import StandInPlatforms
from shared.logs import pseudonym
from shared.partitioning import partition_of

PG_ADMIN = os.environ.get("IT_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("IT_REDIS_URL", "redis://127.0.0.1:6379/11")
PARTITIONS = 16
START_TIMEOUT = 90.0  # 2-core CI: four Python processes importing celery/sqlalchemy at once
REPLY_TIMEOUT = 60.0

# Channel ids double as the stand-in prefix, so a recorded reply says which channel sent it.
WA, WA2, WA_ECHO = "wa", "wa2", "wa-echo"
TG, TG_ECHO = "tg", "tg-echo"
DC = "dc"
TG_BOT = "ItSupportBot"
TG_ECHO_BOT = "ItEchoBot"
IDLE_MINUTES = 0.02  # 1.2 s: sessions go dormant quickly, the sweep runs every SWEEP_SECONDS=1

SECRETS = {
    "SECRET_KEY": "test-secret-key-0123456789abcdefghijklmnop",
    "IT_WA_APP_SECRET": "wa-app-secret", "IT_WA_VERIFY_TOKEN": "wa-verify-token", "IT_WA_ACCESS_TOKEN": "wa-access",
    "IT_WA2_APP_SECRET": "wa2-app-secret", "IT_WA2_VERIFY_TOKEN": "wa2-verify-token",
    "IT_WA2_ACCESS_TOKEN": "wa2-access",
    "IT_WAE_APP_SECRET": "wa-echo-app-secret", "IT_WAE_VERIFY_TOKEN": "wa-echo-verify",
    "IT_WAE_ACCESS_TOKEN": "wa-echo-access",
    "IT_TG_BOT_TOKEN": "111111:tg-bot-token", "IT_TG_SECRET": "tg-secret-token",
    "IT_TGE_BOT_TOKEN": "222222:tg-echo-bot-token", "IT_TGE_SECRET": "tg-echo-secret-token",
    "IT_DC_BOT_TOKEN": "dc-bot-token",
}

WHATSAPP = {  # channel id -> (phone_number_id, agent, secret env prefix)
    WA: ("100000000000001", "demo", "IT_WA"),
    WA2: ("100000000000002", "demo", "IT_WA2"),
    WA_ECHO: ("100000000000003", "echo", "IT_WAE"),
}
TELEGRAM = {  # channel id -> (bot username, agent, secret env prefix)
    TG: (TG_BOT, "demo", "IT_TG"),
    TG_ECHO: (TG_ECHO_BOT, "echo", "IT_TGE"),
}

# The session policies' own channels (test_policies.py): WhatsApp channels with [channels.session] options of their
# own; they share the IT_WA secrets. Channel id -> (phone_number_id, agent, session options as a TOML inline table).
SLOW_AGENT = "cli.bench_agents:SlowEcho"  # BENCH_AGENT_DELAY_S below: a turn long enough for a burst to arrive
SLOW_AGENT_S = 1.0
POLICY_WHATSAPP = {
    "wa-mention": ("100000000000101", "demo", f'idle_minutes = {IDLE_MINUTES}, group_reply = "mentioned"'),
    "wa-budget": ("100000000000102", "demo", "history_chars = 60"),
    "wa-reset": ("100000000000103", "demo", f'idle_minutes = {IDLE_MINUTES}, reset = "idle", reset_idle_hours = 0.001'),
    "wa-daily": ("100000000000104", "demo", 'reset = "daily", reset_hour = 4, timezone = "America/Sao_Paulo", '
                                             'reset_notice = "(New day, new conversation.)"'),
    "wa-collect": ("100000000000105", SLOW_AGENT, 'burst = "collect"'),
    "wa-latest": ("100000000000106", SLOW_AGENT, 'burst = "latest"'),
    "wa-retain": ("100000000000107", "echo", f"idle_minutes = {IDLE_MINUTES}, retention_days = 0.00005"),
    "wa-window": ("100000000000108", "echo", "window_hours = 1"),
    "wa-template": ("100000000000109", "echo", 'window_hours = 1, window_template = "support_followup", '
                                               'window_template_language = "pt_BR"'),
    "wa-person": ("100000000000110", "echo", 'scope = "per-person"'),
}
POLICY_TELEGRAM = {  # channel id -> (bot username, agent, session options); they share the IT_TG secrets
    "tg-person": ("ItPersonBot", "echo", 'scope = "per-person"'),
}
PERSON = ("ana-it", "5513000000060", "381000060")  # [[identities]]: a person's WhatsApp number and Telegram user
for _cid, (_phone, _agent, _) in POLICY_WHATSAPP.items():
    WHATSAPP[_cid] = (_phone, _agent, "IT_WA")
for _cid, (_bot, _agent, _) in POLICY_TELEGRAM.items():
    TELEGRAM[_cid] = (_bot, _agent, "IT_TG")

_ids = itertools.count(1)
_RUN = uuid.uuid4().hex[:6]


def next_id() -> int:
    return next(_ids)


def session_key(channel_id: str, kind: str, chat_id: str) -> str:
    """Mirror of shared.channels.base.session_key, spelled out so a change of format shows up here."""
    return f"{channel_id}:{kind}:{chat_id}"


# --------------------------------------------------------------------------------------------------------------------
# The stack and its helpers


@dataclass(repr=False)
class Stack:
    """The running processes (cli.stack.Stack) and what the tests drive them with."""

    processes: Processes
    redis: redis.Redis
    standin: StandInPlatforms
    discord_key: Ed25519PrivateKey
    secrets: dict[str, str] = field(default_factory=lambda: dict(SECRETS))  # env var -> value, as configured
    whatsapp_channels: dict[str, tuple[str, str, str]] = field(default_factory=lambda: dict(WHATSAPP))
    telegram_bot: str = TG_BOT

    @property
    def url(self) -> str:
        """The ingress, http://127.0.0.1:<port>."""
        return self.processes.url

    @property
    def env(self) -> dict[str, str]:
        """The processes' environment."""
        return self.processes.full_env()

    @property
    def database_url(self) -> str:
        """SQLAlchemy URL (postgresql+psycopg://...)."""
        return self.processes.database_url

    @property
    def pg_url(self) -> str:
        """The same database for psycopg."""
        return self.processes.pg_url

    @property
    def procs(self) -> list[Proc]:
        return self.processes.procs

    @property
    def log_dir(self) -> Path:
        return self.processes.workdir

    @staticmethod
    def next_id() -> int:
        """A number unique in this run (message ids, update ids, snowflake increments)."""
        return next_id()

    def __repr__(self) -> str:
        return f"Stack(ingress={self.url}, database={self.pg_url.rsplit('/', 1)[-1]}, logs={self.log_dir})"

    # -- diagnostics ------------------------------------------------------------------------------------------------

    def tails(self, lines: int = 40) -> str:
        return self.processes.tails(lines)

    def fail(self, message: str) -> NoReturn:
        """Fail the test; the report hook below appends every process's log tail."""
        self.processes.fail(message)

    def assert_alive(self) -> None:
        self.processes.assert_alive()

    def wait_until(self, predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
        return self.processes.wait_until(predicate, timeout, what, interval)

    # -- HTTP into the ingress --------------------------------------------------------------------------------------

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> requests.Response:
        return requests.post(self.url + path, data=body, headers=headers, timeout=30)

    def get(self, path: str, **params: str) -> requests.Response:
        return requests.get(self.url + path, params=params, timeout=30)

    def whatsapp(self, channel_id: str, sender: str, text: str, *, name: str | None = None,
                 group_id: str | None = None, msg_id: str | None = None, check: bool = True) -> str:
        """POST one signed WhatsApp text message; returns its wamid."""
        phone_number_id, _, env_prefix = WHATSAPP[channel_id]
        msg_id = msg_id or f"wamid.it{_RUN}{next_id()}"
        body = encode(whatsapp_text(phone_number_id, sender, name or f"User {sender[-4:]}", text, msg_id,
                                    group_id=group_id))
        r = self.post(f"/webhooks/{channel_id}", body, sign_whatsapp(body, SECRETS[f"{env_prefix}_APP_SECRET"]))
        if check and r.status_code != 200:
            self.fail(f"WhatsApp POST to {channel_id} answered {r.status_code}: {r.text!r}")
        return msg_id

    def whatsapp_body(self, channel_id: str, sender: str, text: str, **kw: Any) -> tuple[bytes, dict[str, str], str]:
        """A signed WhatsApp body and headers, for tests that POST it themselves (duplicates, forgeries)."""
        phone_number_id, _, env_prefix = WHATSAPP[channel_id]
        msg_id = kw.pop("msg_id", None) or f"wamid.it{_RUN}{next_id()}"
        body = encode(whatsapp_text(phone_number_id, sender, kw.pop("name", f"User {sender[-4:]}"), text, msg_id,
                                    **kw))
        return body, sign_whatsapp(body, SECRETS[f"{env_prefix}_APP_SECRET"]), msg_id

    def telegram(self, channel_id: str, chat_id: int, user_id: int, first_name: str, text: str, *,
                 chat_type: str = "private", title: str | None = None, check: bool = True) -> str:
        """POST one Telegram Update with a text message; returns its platform message id ("<chat>:<message_id>")."""
        _, _, env_prefix = TELEGRAM[channel_id]
        message_id = next_id()
        body = encode(telegram_text(chat_id, chat_type, user_id, first_name, text, message_id, 900_000_000 + message_id,
                                    title=title))
        r = self.post(f"/webhooks/{channel_id}", body, telegram_headers(SECRETS[f"{env_prefix}_SECRET"]))
        if check and r.status_code != 200:
            self.fail(f"Telegram POST to {channel_id} answered {r.status_code}: {r.text!r}")
        return f"{chat_id}:{message_id}"

    def discord_ask(self, channel: str, user_id: str, name: str, question: str, *, guild_id: str | None = None,
                    command: str = "ask", check: bool = True) -> requests.Response:
        """POST a signed /ask (or /new) application-command interaction to the interactions endpoint."""
        body = encode(discord_interaction(channel, user_id, name, question, guild_id=guild_id, command=command))
        r = self.post(f"/webhooks/{DC}/interactions", body, sign_discord(body, self.discord_key))
        if check and r.status_code != 200:
            self.fail(f"Discord interaction answered {r.status_code}: {r.text!r}")
        return r

    # -- what the platforms received --------------------------------------------------------------------------------

    def replies(self, prefix: str, chat_id: str | int) -> list[str]:
        return self.standin.replies_to(prefix, str(chat_id))

    def wait_replies(self, prefix: str, chat_id: str | int, count: int, timeout: float = REPLY_TIMEOUT) -> list[str]:
        """Block until `count` replies reached this chat; returns them in arrival order."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.replies(prefix, chat_id)
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                self.fail(f"{len(got)} of {count} replies reached {prefix}/{chat_id} within {timeout}s: {got}")
            time.sleep(0.05)

    # -- the database -----------------------------------------------------------------------------------------------

    def query(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        with psycopg.connect(self.pg_url, row_factory=dict_row) as conn:
            return conn.execute(sql, params).fetchall()

    def session(self, key: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM sessions WHERE key = %s", key)
        return rows[0] if rows else None

    def messages(self, key: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT m.* FROM messages m JOIN sessions s ON s.id = m.session_id WHERE s.key = %s ORDER BY m.position",
            key)

    def events(self, key: str) -> list[str]:
        rows = self.query(
            "SELECT e.event FROM session_events e JOIN sessions s ON s.id = e.session_id WHERE s.key = %s "
            "ORDER BY e.id", key)
        return [r["event"] for r in rows]

    def wait_settled(self, key: str, user_messages: int, timeout: float = REPLY_TIMEOUT) -> list[dict[str, Any]]:
        """Wait until the session stored `user_messages` inbound messages and has no reply left to send."""
        def settled():
            rows = self.messages(key)
            users = [m for m in rows if m["role"] == "user"]
            pending = [m for m in rows if m["delivery_status"] == "pending"]
            return rows if len(users) >= user_messages and not pending else None
        return self.wait_until(settled, timeout, f"session {key} to store {user_messages} messages and send replies")

    # -- the CLI ----------------------------------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.processes.cli(*args, timeout=timeout)


def discord_interaction(channel: str, user_id: str, name: str, question: str, *, guild_id: str | None = None,
                        command: str = "ask") -> dict[str, Any]:
    """An APPLICATION_COMMAND interaction shaped like tests/fixtures/discord/interaction_slash_command.json."""
    user = {"id": user_id, "username": name.lower(), "global_name": name, "discriminator": "0", "avatar": None,
            "public_flags": 0}
    data: dict[str, Any] = {"id": "1300000000000000001", "name": command, "type": 1}
    if command == "ask":
        data["options"] = [{"name": "question", "type": 3, "value": question}]
    doc: dict[str, Any] = {
        "type": 2, "id": discord_snowflake(increment=next_id()), "application_id": "1270000000000000001",
        "token": f"interaction-token-{next_id()}", "version": 1, "channel_id": channel, "data": data,
    }
    if guild_id:
        doc["guild_id"] = guild_id
        doc["member"] = {"user": user, "roles": [], "permissions": "0"}
    else:
        doc["user"] = user
    return doc


def config_toml(standin: StandInPlatforms, discord_public_key: str) -> str:
    # group_reply = "always": these channels' group tests expect an answer to every member's message
    # (the policies' own channels, POLICY_CHANNELS, set their options per test: test_policies.py).
    session = f'session = {{ idle_minutes = {IDLE_MINUTES}, history_limit = 50, group_reply = "always" }}'
    out = ["partitions = 16", "lease_seconds = 30", ""]
    for cid, (phone_number_id, agent, p) in WHATSAPP.items():
        own = f"session = {{ {POLICY_WHATSAPP[cid][2]} }}" if cid in POLICY_WHATSAPP else session
        out += ["[[channels]]", f'id = "{cid}"', 'platform = "whatsapp"', f'agent = "{agent}"',
                f'api_base = "{standin.base(cid)}"',
                (f'secrets = {{ app_secret = "{p}_APP_SECRET", verify_token = "{p}_VERIFY_TOKEN", '
                 f'access_token = "{p}_ACCESS_TOKEN" }}'),
                f'options = {{ phone_number_id = "{phone_number_id}", api_version = "v21.0" }}', own, ""]
    for cid, (bot, agent, p) in TELEGRAM.items():
        own = f"session = {{ {POLICY_TELEGRAM[cid][2]} }}" if cid in POLICY_TELEGRAM else session
        out += ["[[channels]]", f'id = "{cid}"', 'platform = "telegram"', f'agent = "{agent}"',
                f'api_base = "{standin.base(cid)}"',
                f'secrets = {{ bot_token = "{p}_BOT_TOKEN", secret_token = "{p}_SECRET" }}',
                f'options = {{ bot_username = "{bot}" }}', own, ""]
    out += ["[[channels]]", f'id = "{DC}"', 'platform = "discord"', 'agent = "demo"',
            f'api_base = "{standin.base(DC)}"',
            'secrets = { bot_token = "IT_DC_BOT_TOKEN", public_key = "IT_DC_PUBLIC_KEY" }',
            'options = { application_id = "1270000000000000001" }', session, ""]
    out += ["[[identities]]", f'person = "{PERSON[0]}"', f'whatsapp = "{PERSON[1]}"', f'telegram = "{PERSON[2]}"', ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------------
# Fixtures

_STACK: Stack | None = None  # for the failure-report hook


@pytest.fixture(scope="session")
def pg_database():
    """A fresh PostgreSQL database for this run; FAILS (never skips) when PostgreSQL is unreachable."""
    name = f"chatsessions_it_{uuid.uuid4().hex[:10]}"
    problem = None
    try:
        url = create_database(PG_ADMIN, name)
    except StackError as exc:
        problem = str(exc)
    if problem:
        pytest.fail(f"integration tests need PostgreSQL at {PG_ADMIN} (trust auth, user postgres); {problem}",
                    pytrace=False)
    yield url
    drop_database(PG_ADMIN, name)


@pytest.fixture(scope="session")
def standin():
    platforms = StandInPlatforms().start()
    yield platforms
    platforms.stop()


@contextlib.contextmanager
def running_stack(work: Path, pg_database: str, standin: StandInPlatforms, *, redis_url: str = REDIS_URL,
                  extra_config: str = "", extra_env: dict[str, str] | None = None,
                  name: str = "integration") -> Iterator[Stack]:
    """The real processes — gunicorn ingress, two worker pools splitting the partitions, beat — on a fresh
    config with the stand-in platforms, migrated, ready and consuming; stopped (SIGTERM, then SIGKILL) at exit.
    The Redis database at `redis_url` is flushed before and after; FAILS (never skips) when it is unreachable.
    The browser tests run the same stack with the web chat channel added (`extra_config`)."""
    global _STACK
    discord_key = Ed25519PrivateKey.generate()
    public_key = discord_key.public_key().public_bytes_raw().hex()
    env = dict(SECRETS, IT_DC_PUBLIC_KEY=public_key, SWEEP_SECONDS="1", BENCH_AGENT_DELAY_S=str(SLOW_AGENT_S),
               LOG_FORMAT="json", **(extra_env or {}))
    processes = Processes(work, env=env, config_text=config_toml(standin, public_key) + (
        "\n" + extra_config if extra_config else ""), database=pg_database, redis_url=redis_url,
        partitions=PARTITIONS, worker_cli=True, on_failure=lambda message: pytest.fail(message, pytrace=False))
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=10)
    stack = Stack(processes, client, standin, discord_key)
    _STACK = stack
    try:
        try:
            processes.setup()
            processes.start_ingress(workers=2, threads=8)
            processes.start_pool("worker-a", "0-7", concurrency=8, node=f"{name}-a@%h")
            # The other execution model: pool-b runs its turns on greenlets (the pool for Agents that wait on an LLM).
            processes.start_pool("worker-b", "8-15", pool="gevent", concurrency=100, node=f"{name}-b@%h")
            processes.start_beat()
            processes.wait_ready(START_TIMEOUT)
        except StackError as exc:
            pytest.fail(f"the {name} stack did not start: {exc}", pytrace=False)
        _wait_consuming(stack)
        yield stack
    finally:
        killed = processes.teardown()
        client.close()
        _STACK = None
        if killed:
            print(f"\n{name}: {killed} ignored SIGTERM for 25 s and were killed; logs in {work}", file=sys.stderr)


@pytest.fixture(scope="session")
def stack(pg_database, standin, tmp_path_factory, request) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("integration")
    with running_stack(work, pg_database, standin) as running:
        yield running
    if request.session.testsfailed:
        print(f"\nintegration process logs: {work}", file=sys.stderr)


def _chat_in(partitions: range, channel_id: str) -> str:
    """A WhatsApp sender whose DM session lands in one of `partitions`."""
    for n in itertools.count():
        phone = f"559900{n:06d}"
        if partition_of(session_key(channel_id, "dm", phone), PARTITIONS) in partitions:
            return phone
    raise AssertionError("unreachable")


def _wait_consuming(stack: Stack) -> None:
    """A real round trip through each pool: one message on a partition of pool a, one on a partition of pool b."""
    phones = {"worker-a": _chat_in(range(8), WA_ECHO), "worker-b": _chat_in(range(8, 16), WA_ECHO)}
    for phone in phones.values():
        stack.whatsapp(WA_ECHO, phone, "warm-up")
    for phone in phones.values():
        stack.wait_replies(WA_ECHO, phone, 1, timeout=START_TIMEOUT)
    # The partition split is real: each pool's log names only the sessions of its own partitions (by the pseudonym
    # of their key, as every log line does at INFO).
    logs = {p.name: p for p in stack.procs}
    for pool, phone in phones.items():
        other = "worker-b" if pool == "worker-a" else "worker-a"
        key = session_key(WA_ECHO, "dm", phone)
        named = pseudonym(SECRETS["SECRET_KEY"], key)
        stack.wait_until(lambda named=named, pool=pool: named in logs[pool].log(), 15,
                         f"{pool}'s log to mention {key} ({named})")
        if named in logs[other].log():
            stack.fail(f"{key} (partition {partition_of(key, PARTITIONS)}) was handled by {other}")


@pytest.fixture(autouse=True)
def _stack_alive(stack):
    """Every integration test starts (and ends) with all processes still running."""
    stack.assert_alive()
    yield
    stack.assert_alive()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _STACK is not None and _STACK.procs:
        report.sections.append(("chatsessions process logs (tails)", _STACK.tails(60)))

