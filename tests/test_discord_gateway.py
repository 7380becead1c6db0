"""The Discord gateway ingress against the stand-in: identify, heartbeat, publish, resume, retry, fatal close."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cli.standins.discord_gateway import StandInGateway
from ingress.discord_gateway import GatewayClient, GatewayFatal, run
from shared.policies import dm_key, group_key
from shared.channels.discord import DiscordChannel
from shared.config import ChannelConfig, SessionOptions, get_settings
from shared.errors import ConfigError, EnqueueFailed
from shared.messages import InboundMessage

TOKEN = "test-bot-token-not-for-logs"
PUBLIC_KEY = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
GUILD_CHANNEL, DM_CHANNEL = "1290000000000000001", "1290000000000000099"
REPO = Path(__file__).resolve().parents[1]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def channel_config(url: str, token: str = TOKEN) -> ChannelConfig:
    return ChannelConfig(
        id="test-discord",
        platform="discord",
        agent="echo",
        api_base="https://discord.invalid/api/v10",
        secrets={"bot_token": token, "public_key": PUBLIC_KEY},
        options={"gateway_url": url, "application_id": "1270000000000000001"},
        session=SessionOptions(),
    )


def event(n: int, *, bot: bool = False, dm: bool = False) -> dict[str, Any]:
    """A MESSAGE_CREATE `d` shaped like /work/shared/channels/discord/gateway_message_create_*.json."""
    d: dict[str, Any] = {
        "type": 0,
        "id": str(1311000000000000000 + n),
        "channel_id": DM_CHANNEL if dm else GUILD_CHANNEL,
        "content": f"message {n}",
        "timestamp": "2026-11-25T01:10:00.000000+00:00",
        "author": {"id": "402911111111111111", "username": "eve.m", "global_name": "Eve", "discriminator": "0"},
        "attachments": [],
        "mentions": [],
    }
    if bot:
        d["author"] = {"id": "1270000000000000001", "username": "acme-support", "bot": True}
    if not dm:
        d["guild_id"] = "1280000000000000001"
    return d


def mid(n: int) -> str:
    return str(1311000000000000000 + n)


class Recorder:
    """A publish callable that records what it was given; fails the first `failures` calls with EnqueueFailed."""

    def __init__(self, failures: int = 0):
        self.failures = failures
        self.calls = 0
        self.messages: list[InboundMessage] = []
        self._lock = threading.Lock()

    def __call__(self, messages: list[InboundMessage]) -> int:
        with self._lock:
            self.calls += 1
            if self.failures:
                self.failures -= 1
                raise EnqueueFailed("broker unreachable: ConnectionRefusedError")
            self.messages.extend(messages)
            return len(messages)

    def ids(self) -> list[str]:
        with self._lock:
            return [m.platform_message_id for m in self.messages]


class ClientThread:
    """The real GatewayClient on its own event loop in a thread."""

    def __init__(self, client: GatewayClient):
        self.client = client
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="gateway-client", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self.client.run())
        except BaseException as exc:  # inspected by the test
            self.error = exc

    def stop(self) -> None:
        self.client.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "gateway client did not stop"


@pytest.fixture
def gateway():
    with StandInGateway(token=TOKEN, heartbeat_interval_ms=300) as gw:
        yield gw


@pytest.fixture
def start_client(gateway):
    started: list[ClientThread] = []

    def start(publish: Callable[[list[InboundMessage]], int] | None = None, token: str = TOKEN) -> ClientThread:
        config = channel_config(gateway.url, token)
        client = GatewayClient(config, DiscordChannel(config), publish or Recorder())
        client.backoff_base = client.publish_retry_base = 0.05
        client.invalid_session_delay = (0.05, 0.1)
        runner = ClientThread(client)
        started.append(runner)
        runner.thread.start()
        return runner

    yield start
    for runner in started:
        runner.stop()
        assert runner.error is None or isinstance(runner.error, GatewayFatal), runner.error


def test_identifies_with_token_and_message_intents_then_heartbeats(gateway, start_client):
    start_client()
    assert gateway.wait_for_client(5)
    assert gateway.identify_count == 1
    identify = gateway.identifies[0]
    assert identify["token"] == TOKEN
    assert identify["intents"] == (1 << 9) | (1 << 12) | (1 << 15)  # GUILD_MESSAGES | DIRECT_MESSAGES | MESSAGE_CONTENT
    assert set(identify["properties"]) == {"os", "browser", "device"}
    assert gateway.paths[0] == "/?v=10&encoding=json"
    assert wait_until(lambda: gateway.heartbeats >= 3, 5)


def test_heartbeat_request_is_answered_immediately(gateway, start_client):
    gateway.heartbeat_interval_ms = 60_000  # the client's own beats are (almost surely) far away
    start_client()
    assert gateway.wait_for_client(5)
    before = gateway.heartbeats
    gateway.request_heartbeat()
    assert wait_until(lambda: gateway.heartbeats > before, 2)


def test_user_messages_are_published_with_the_channel_session_key(gateway, start_client):
    recorder = Recorder()
    start_client(recorder)
    assert gateway.wait_for_client(5)
    gateway.dispatch_message(event(1))
    gateway.dispatch_message(event(2, dm=True))
    assert wait_until(lambda: len(recorder.ids()) == 2)
    guild, dm = recorder.messages
    assert (guild.channel_id, guild.platform, guild.text) == ("test-discord", "discord", "message 1")
    assert guild.session_key == group_key("test-discord", GUILD_CHANNEL)
    assert dm.session_key == dm_key("test-discord", DM_CHANNEL)
    assert (guild.platform_message_id, dm.platform_message_id) == (mid(1), mid(2))
    assert guild.sender_name == "Eve"


def test_messages_dispatched_before_the_client_connects_are_delivered(gateway, start_client):
    recorder = Recorder()
    gateway.dispatch_message(event(1))
    start_client(recorder)
    assert wait_until(lambda: recorder.ids() == [mid(1)])


def test_bot_authored_messages_are_not_published(gateway, start_client):
    recorder = Recorder()
    start_client(recorder)
    assert gateway.wait_for_client(5)
    gateway.dispatch_message(event(1, bot=True))
    gateway.dispatch_message(event(2))
    assert wait_until(lambda: recorder.ids() == [mid(2)])
    assert recorder.calls == 1


def test_a_malformed_event_is_skipped_without_stopping_the_ingress(gateway, start_client):
    recorder = Recorder()
    start_client(recorder)
    assert gateway.wait_for_client(5)
    gateway.dispatch_message({"id": "1", "content": "no author"})
    gateway.dispatch_message(event(2))
    assert wait_until(lambda: recorder.ids() == [mid(2)])
    assert gateway.identify_count == 1 and gateway.resume_count == 0


def test_dropped_connection_resumes_and_delivers_every_message_once(gateway, start_client):
    recorder = Recorder()
    start_client(recorder)
    assert gateway.wait_for_client(5)
    gateway.dispatch_message(event(1))
    gateway.drop_connection()
    gateway.dispatch_message(event(2))  # while the client is (most likely) away: replayed on RESUME
    gateway.dispatch_message(event(3))
    assert gateway.wait_for_client(5)
    gateway.dispatch_message(event(4))
    assert wait_until(lambda: len(recorder.ids()) >= 4)
    time.sleep(0.2)  # would let a duplicate show up
    assert recorder.ids() == [mid(1), mid(2), mid(3), mid(4)]
    assert gateway.resume_count == 1 and gateway.identify_count == 1
    assert gateway.paths[1] == "/?v=10&encoding=json"  # resume_gateway_url + the initial query


def test_missing_heartbeat_ack_closes_the_zombie_and_resumes(gateway, start_client):
    recorder = Recorder()
    start_client(recorder)
    assert gateway.wait_for_client(5)
    gateway.ack_heartbeats = False
    assert wait_until(lambda: gateway.resume_count >= 1, 5)
    gateway.ack_heartbeats = True
    assert 4000 in gateway.close_codes  # not 1000/1001: the session stays resumable
    assert gateway.wait_for_client(5)
    gateway.dispatch_message(event(1))
    assert wait_until(lambda: recorder.ids() == [mid(1)])
    assert gateway.identify_count == 1


def test_reconnect_opcode_resumes(gateway, start_client):
    start_client()
    assert gateway.wait_for_client(5)
    gateway.request_reconnect()
    assert wait_until(lambda: gateway.resume_count == 1 and gateway.wait_for_client(0), 5)
    assert gateway.identify_count == 1


def test_invalid_session_identifies_afresh(gateway, start_client):
    recorder = Recorder()
    start_client(recorder)
    assert gateway.wait_for_client(5)
    gateway.invalidate_session()
    assert wait_until(lambda: gateway.identify_count == 2 and gateway.wait_for_client(0), 5)
    gateway.dispatch_message(event(1))
    assert wait_until(lambda: recorder.ids() == [mid(1)])


def test_publish_failing_twice_is_retried_in_order_and_delivered(gateway, start_client):
    recorder = Recorder(failures=2)
    start_client(recorder)
    assert gateway.wait_for_client(5)
    gateway.dispatch_message(event(1))
    gateway.dispatch_message(event(2))
    assert wait_until(lambda: len(recorder.ids()) == 2)
    assert recorder.ids() == [mid(1), mid(2)]
    assert recorder.calls == 4  # 2 failures + 2 successes
    assert wait_until(lambda: gateway.heartbeats >= 2)  # the loop kept heartbeating meanwhile


def test_wrong_token_is_fatal(gateway, start_client):
    runner = start_client(token="wrong-token")
    runner.thread.join(5)
    assert not runner.thread.is_alive()
    assert isinstance(runner.error, GatewayFatal) and runner.error.code == 4004
    assert gateway.identify_count == 1  # no reconnect loop


# -- the process entry point ------------------------------------------------------------------------------------------


@pytest.fixture
def process_env(gateway, tmp_path):
    config = tmp_path / "channels.toml"
    config.write_text(
        f"""
[[channels]]
id = "proc-discord"
platform = "discord"
agent = "echo"
secrets = {{ bot_token = "TEST_GW_BOT_TOKEN", public_key = "TEST_GW_PUBLIC_KEY" }}
options = {{ application_id = "1270000000000000001", gateway_url = "{gateway.url}" }}

[[channels]]
id = "proc-telegram"
platform = "telegram"
agent = "echo"
secrets = {{ bot_token = "TEST_GW_BOT_TOKEN", secret_token = "TEST_GW_BOT_TOKEN" }}
options = {{ bot_username = "TestBot" }}
"""
    )
    env = {k: v for k, v in os.environ.items() if k not in ("BROKER_URL", "REDIS_URL")}
    # A real broker: the gateway process refuses the in-process one (nothing would consume it).
    env.update(CHATSESSIONS_CONFIG=str(config), TEST_GW_BOT_TOKEN=TOKEN, TEST_GW_PUBLIC_KEY=PUBLIC_KEY,
               BROKER_URL="redis://127.0.0.1:6379/14", SECRET_KEY="test-secret-key-0123456789abcdefghijklmnop")
    return env


def spawn(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ingress.discord_gateway", "proc-discord"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_process_stops_gracefully_on_sigterm(gateway, process_env):
    proc = spawn(process_env)
    try:
        assert gateway.wait_for_client(30), proc.stderr.read() if proc.poll() is not None else "no client"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert wait_until(lambda: 1000 in gateway.close_codes)
    assert "gateway.connected" in out + err
    assert TOKEN not in out + err


def test_process_exits_non_zero_on_wrong_token(gateway, process_env):
    proc = spawn({**process_env, "TEST_GW_BOT_TOKEN": "wrong-token-secret"})
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "4004" in err and "authentication failed" in err
    assert "wrong-token-secret" not in out + err


def test_process_refuses_the_in_process_broker(gateway, process_env):
    proc = spawn({**process_env, "BROKER_URL": "memory://localhost/"})
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "memory://" in err


def test_run_refuses_a_non_discord_channel(process_env, monkeypatch):
    for key, value in process_env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match="discord"):
            run("proc-telegram")
    finally:
        get_settings.cache_clear()
