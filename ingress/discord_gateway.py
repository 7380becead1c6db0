"""The Discord ingress: one long-running Gateway connection per bot token, feeding the webhooks' publish path.

Start it with `python -m ingress.discord_gateway <channel_id>` (or `run(channel_id)`); SIGTERM/SIGINT stop it
gracefully. Protocol: docs.discord.com/developers/events/gateway (HELLO -> heartbeat -> IDENTIFY or RESUME).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from shared.config import ChannelConfig, get_settings
from shared.errors import ChatSessionsError, ConfigError, EnqueueFailed
from shared.logs import configure_logging
from shared.messages import InboundMessage
from shared.policies import threads_enabled

log = structlog.get_logger(__name__)

DISPATCH, HEARTBEAT, IDENTIFY, RESUME, RECONNECT, INVALID_SESSION, HELLO, HEARTBEAT_ACK = 0, 1, 2, 6, 7, 9, 10, 11
GUILDS, GUILD_MESSAGES, DIRECT_MESSAGES, MESSAGE_CONTENT = 1 << 0, 1 << 9, 1 << 12, 1 << 15
INTENTS = GUILD_MESSAGES | DIRECT_MESSAGES | MESSAGE_CONTENT
OBSERVED = {"READY", "GUILD_CREATE", "THREAD_CREATE", "THREAD_UPDATE", "THREAD_DELETE", "THREAD_LIST_SYNC"}


def intents(config: ChannelConfig) -> int:
    """The message intents; with threads = false also GUILDS, whose thread events name each thread's parent
    (a thread's MESSAGE_CREATE carries only the thread's own channel id)."""
    return INTENTS if threads_enabled(config) else INTENTS | GUILDS
DEFAULT_GATEWAY_URL = "wss://gateway.discord.gg/?v=10&encoding=json"
FATAL_CLOSE_CODES = {
    4004: "authentication failed: the bot token is wrong or was reset",
    4010: "invalid shard",
    4011: "sharding required",
    4012: "invalid API version",
    4013: "invalid intents",
    4014: "disallowed intents: enable the Message Content intent for the bot in the Developer Portal",
}
NEW_SESSION_CLOSE_CODES = {4007, 4009}  # invalid seq / session timed out: reconnect, but identify afresh
RESUMABLE_CLOSE = 4000  # any code but 1000/1001 keeps the session resumable

Publish = Callable[[list[InboundMessage]], int]


class GatewayFatal(ChatSessionsError):
    """Discord closed the connection with a code that forbids reconnecting."""

    def __init__(self, code: int, reason: str):
        super().__init__(f"Discord gateway closed the connection with {code}: {reason}")
        self.code = code


class _Reconnect(Exception):
    def __init__(self, reason: str, resume: bool, delay: float = 0.0):
        super().__init__(reason)
        self.reason, self.resume, self.delay = reason, resume, delay


class GatewayClient:
    """Keeps one Gateway session alive and hands every user message to `publish`, never dropping one."""

    backoff_base, backoff_cap = 0.5, 60.0  # reconnect after a lost connection
    publish_retry_base, publish_retry_cap = 0.2, 30.0  # broker unreachable
    invalid_session_delay = (1.0, 5.0)  # documented wait before re-identifying after op 9 false
    drain_timeout = 10.0  # on stop, how long to keep trying to publish what was already received

    def __init__(self, config: ChannelConfig, channel: Any, publish: Publish):
        self.config, self.channel, self.publish = config, channel, publish
        self.gateway_url: str = config.options.get("gateway_url") or DEFAULT_GATEWAY_URL
        self.session_id: str | None = None
        self.resume_url: str | None = None
        self.seq: int | None = None
        self.log = log.bind(channel=config.id)
        self._ws: ClientConnection | None = None
        self._acked = True
        self._established = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self) -> None:
        """Connect, heartbeat, reconnect and resume until stop(); GatewayFatal on a close code forbidding reconnect."""
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._outbox: asyncio.Queue[list[InboundMessage]] = asyncio.Queue()
        publisher = asyncio.create_task(self._publish_loop())
        failures = 0
        try:
            while not self._stopping:
                delay = 0.0
                try:
                    await self._connection(use_resume_url=failures < 3)
                except _Reconnect as exc:
                    self.log.info("gateway.reconnecting", reason=exc.reason, resume=exc.resume)
                    if not exc.resume:
                        self._forget_session()
                    delay = exc.delay
                except (OSError, WebSocketException, ValueError, KeyError) as exc:  # lost, refused or garbled
                    if self._stopping:
                        break
                    code = exc.rcvd.code if isinstance(exc, ConnectionClosed) and exc.rcvd else None
                    if code in FATAL_CLOSE_CODES:
                        self.log.error("gateway.fatal", code=code, reason=FATAL_CLOSE_CODES[code])
                        raise GatewayFatal(code, FATAL_CLOSE_CODES[code]) from None
                    if code in NEW_SESSION_CLOSE_CODES:
                        self._forget_session()
                    failures = 0 if self._established else failures + 1
                    delay = min(self.backoff_cap, self.backoff_base * 2**failures) * random.uniform(0.5, 1.0)
                    error = exc.__class__.__name__
                    self.log.warning("gateway.disconnected", code=code, error=error, retry_in=round(delay, 2))
                if delay and not self._stopping:
                    try:
                        await asyncio.wait_for(self._stopped.wait(), delay)
                    except TimeoutError:
                        pass
        finally:
            await self._drain(publisher)

    def stop(self) -> None:
        """Close the connection with 1000 and make run() return; safe to call from any thread or a signal handler."""
        self._stopping = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop)

    def _stop(self) -> None:
        self._stopping = True
        self._stopped.set()
        if self._ws is not None:
            asyncio.ensure_future(self._ws.close(1000, "shutting down"))

    async def _connection(self, use_resume_url: bool) -> None:
        resuming = self.session_id is not None and self.seq is not None
        url = self.gateway_url
        if resuming and use_resume_url and self.resume_url:  # after repeated failures, fall back to gateway_url
            url = _with_query(self.resume_url, self.gateway_url)
        self._established = False
        ws = await connect(url, open_timeout=10, close_timeout=2, ping_interval=None, max_size=2**24)
        self._ws, close_code, heartbeat = ws, RESUMABLE_CLOSE, None
        try:
            if self._stopping:
                return
            hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if hello.get("op") != HELLO:
                raise _Reconnect(f"expected HELLO, got op {hello.get('op')}", resume=True, delay=1.0)
            heartbeat = asyncio.create_task(self._heartbeat(ws, hello["d"]["heartbeat_interval"] / 1000))
            token = self.config.secrets["bot_token"]
            if resuming:
                await self._send(ws, RESUME, {"token": token, "session_id": self.session_id, "seq": self.seq})
            else:
                properties = {"os": sys.platform, "browser": "chatsessions", "device": "chatsessions"}
                await self._send(ws, IDENTIFY, {"token": token, "intents": intents(self.config), "properties": properties})
            while True:
                await self._handle(ws, json.loads(await ws.recv()))
        except _Reconnect as exc:
            close_code = RESUMABLE_CLOSE if exc.resume else 1000
            raise
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
            self._ws = None
            await ws.close(1000 if self._stopping else close_code)

    async def _handle(self, ws: ClientConnection, payload: dict[str, Any]) -> None:
        op, d = payload.get("op"), payload.get("d")
        if op == DISPATCH:
            if payload.get("s") is not None:
                self.seq = payload["s"]
            event = payload.get("t")
            if event in OBSERVED:
                self._observe(event, d)
            if event == "READY":
                self.session_id, self.resume_url = d["session_id"], d.get("resume_gateway_url")
                self._established = True
                self.log.info("gateway.connected", session_id=self.session_id)
            elif event == "RESUMED":
                self._established = True
                self.log.info("gateway.resumed", session_id=self.session_id, seq=self.seq)
            elif event == "MESSAGE_CREATE":
                self._accept(d)
        elif op == HEARTBEAT:
            await self._send(ws, HEARTBEAT, self.seq)
        elif op == HEARTBEAT_ACK:
            self._acked = True
        elif op == RECONNECT:
            raise _Reconnect("gateway asked to reconnect", resume=True)
        elif op == INVALID_SESSION:
            if d is True:
                raise _Reconnect("invalid session (resumable)", resume=True)
            raise _Reconnect("invalid session", resume=False, delay=random.uniform(*self.invalid_session_delay))

    def _observe(self, event: str, d: Any) -> None:
        """Hand the parser what it learns from non-message events (our user id, thread parents)."""
        observe = getattr(self.channel, "observe", None)
        if observe is None:
            return
        try:
            observe(event, d)
        except Exception as exc:  # a malformed event must not stop the ingress
            self.log.warning("gateway.malformed", event=event, error=str(exc))

    def _accept(self, d: Any) -> None:
        try:
            messages = self.channel.parse_event(d)
        except Exception as exc:  # one malformed event must not stop the ingress
            message_id = d.get("id") if isinstance(d, dict) else None
            self.log.warning("gateway.malformed", error=str(exc), message_id=message_id)
            return
        for m in messages:
            self.log.info("gateway.message", session_key=m.session_key, platform_message_id=m.platform_message_id)
        if messages:
            self._outbox.put_nowait(messages)

    async def _publish_loop(self) -> None:
        """Publish in arrival order; the gateway cannot redeliver, so retry (bounded sleeps) until accepted."""
        while True:
            messages = await self._outbox.get()
            attempt = 0
            while True:
                try:
                    await asyncio.to_thread(self.publish, messages)
                    break
                except Exception as exc:
                    attempt += 1
                    delay = min(self.publish_retry_cap, self.publish_retry_base * 2 ** (attempt - 1))
                    level = self.log.warning if isinstance(exc, EnqueueFailed) else self.log.error
                    error, pending = f"{exc.__class__.__name__}: {exc}", self._outbox.qsize() + 1
                    level("gateway.publish_retry", attempt=attempt, retry_in=delay, pending=pending, error=error)
                    await asyncio.sleep(delay)
            self._outbox.task_done()

    async def _drain(self, publisher: asyncio.Task) -> None:
        try:
            await asyncio.wait_for(self._outbox.join(), self.drain_timeout)
        except TimeoutError:
            self.log.error("gateway.undelivered", batches=self._outbox.qsize() + 1)
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)

    async def _heartbeat(self, ws: ClientConnection, interval: float) -> None:
        self._acked = True
        await asyncio.sleep(interval * random.random())  # jitter, as documented
        while True:
            if not self._acked:  # no ACK since the last beat: a zombied connection
                self.log.warning("gateway.zombied")
                await ws.close(RESUMABLE_CLOSE, "heartbeat ACK missing")
                return
            self._acked = False
            try:
                await self._send(ws, HEARTBEAT, self.seq)
            except ConnectionClosed:
                return
            await asyncio.sleep(interval)

    @staticmethod
    async def _send(ws: ClientConnection, op: int, d: Any) -> None:
        await ws.send(json.dumps({"op": op, "d": d}))

    def _forget_session(self) -> None:
        self.session_id = self.resume_url = self.seq = None


def _with_query(url: str, like: str) -> str:
    """The resume URL with the same version/encoding query as the initial connection."""
    parts = urlsplit(url)
    if parts.query:
        return url
    return urlunsplit(parts._replace(path=parts.path or "/", query=urlsplit(like).query))


def run(channel_id: str) -> None:
    """Run the Discord gateway ingress for one configured channel until SIGTERM/SIGINT; SystemExit on fatal errors."""
    from ingress.publisher import Publisher
    from shared.channels.discord import DiscordChannel

    settings = get_settings()
    configure_logging(settings)
    config = settings.channel(channel_id)
    if settings.embedded:
        raise ConfigError("BROKER_URL=memory:// works only inside `chatsessions run`; set BROKER_URL=redis://...")
    if config.platform != "discord":
        raise ConfigError(f"channel {channel_id!r} is {config.platform}; the gateway serves discord channels only")
    client = GatewayClient(config, DiscordChannel(config), Publisher(settings).publish)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, client.stop)
        await client.run()

    try:
        asyncio.run(main())
    except GatewayFatal as exc:
        raise SystemExit(f"discord gateway for {channel_id!r} stopped: {exc}") from None
    log.info("gateway.stopped", channel=channel_id)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m ingress.discord_gateway <channel_id>")
    try:
        run(sys.argv[1])
    except ChatSessionsError as exc:
        raise SystemExit(f"discord gateway: {exc}") from None
