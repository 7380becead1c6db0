"""A stand-in Discord Gateway for tests and the demo: the documented opcodes, on 127.0.0.1, in its own thread.

HELLO (op 10) -> HEARTBEAT (1) / ACK (11), IDENTIFY (2) -> READY or close 4004, RESUME (6) -> replay + RESUMED or
INVALID_SESSION (9, false). Every method a test calls is thread-safe: it runs on the server's own event loop.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Coroutine

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

DISPATCH, HEARTBEAT, IDENTIFY, RESUME, RECONNECT, INVALID_SESSION, HELLO, HEARTBEAT_ACK = 0, 1, 2, 6, 7, 9, 10, 11


@dataclass
class _Session:
    seq: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # dispatched events, replayed on RESUME

    def event(self, t: str, d: dict[str, Any], keep: bool = True) -> dict[str, Any]:
        self.seq += 1
        payload = {"op": DISPATCH, "t": t, "s": self.seq, "d": d}
        if keep:
            self.history.append(payload)
        return payload


class StandInGateway:
    def __init__(self, token: str = "stand-in-bot-token", heartbeat_interval_ms: int = 1000, port: int = 0):
        self.token = token
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.port = port
        self.ack_heartbeats = True  # set False to simulate a zombied connection
        self.identifies: list[dict[str, Any]] = []  # IDENTIFY payloads (d) as received
        self.resume_count = 0
        self.heartbeats = 0
        self.paths: list[str] = []  # request path + query of every connection
        self.close_codes: list[int | None] = []  # close code each client connection ended with
        self._sessions: dict[str, _Session] = {}
        self._current: str | None = None
        self._live: ServerConnection | None = None  # the identified/resumed connection
        self._open: set[ServerConnection] = set()
        self._pending: list[dict[str, Any]] = []  # dispatched before any session existed
        self._connected = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/?v=10&encoding=json"

    @property
    def resume_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"  # like Discord's: no query; clients must add v and encoding

    @property
    def identify_count(self) -> int:
        return len(self.identifies)

    # -- lifecycle --------------------------------------------------------------------------------------------------

    def start(self) -> StandInGateway:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="standin-discord-gateway", daemon=True)
        self._thread.start()
        if not ready.wait(10) or self._error:
            raise RuntimeError(f"stand-in gateway did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)

    def __enter__(self) -> StandInGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main(ready))
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            ready.set()
        finally:
            self._loop.close()

    async def _main(self, ready: threading.Event) -> None:
        self._lock = asyncio.Lock()  # orders dispatches against READY/replay
        self._stopping = asyncio.Event()
        async with serve(self._handler, "127.0.0.1", self.port) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            ready.set()
            await self._stopping.wait()

    # -- test/demo controls (thread-safe) -----------------------------------------------------------------------------

    def dispatch_message(self, d: dict[str, Any]) -> None:
        """Send MESSAGE_CREATE with the next `s`; recorded for replay, or buffered until a client identifies."""
        self._call(self._dispatch("MESSAGE_CREATE", d))

    def drop_connection(self) -> None:
        """Abruptly close every client socket (no close frame), as a network failure would."""
        self._call(self._drop())

    def request_reconnect(self) -> None:
        self._call(self._send_live({"op": RECONNECT, "d": None}))

    def request_heartbeat(self) -> None:
        self._call(self._send_live({"op": HEARTBEAT, "d": None}))

    def invalidate_session(self) -> None:
        """Forget the session and send INVALID_SESSION (d false): the client must identify afresh."""
        self._call(self._invalidate())

    def wait_for_client(self, timeout: float = 5.0) -> bool:
        """True once a client has identified or resumed and is connected."""
        return self._connected.wait(timeout)

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._loop is None:
            coro.close()
            raise RuntimeError("stand-in gateway is not started")
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- protocol ---------------------------------------------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        self._open.add(ws)
        self.paths.append(ws.request.path if ws.request else "")
        try:
            await ws.send(json.dumps({"op": HELLO, "d": {"heartbeat_interval": self.heartbeat_interval_ms}}))
            async for raw in ws:
                message = json.loads(raw)
                op, d = message.get("op"), message.get("d")
                if op == HEARTBEAT:
                    self.heartbeats += 1
                    if self.ack_heartbeats:
                        await ws.send(json.dumps({"op": HEARTBEAT_ACK}))
                elif op == IDENTIFY:
                    await self._identify(ws, d)
                elif op == RESUME:
                    await self._resume(ws, d)
        except ConnectionClosed:
            pass
        finally:
            self._open.discard(ws)
            if self._live is ws:
                self._live = None
                self._connected.clear()
            self.close_codes.append(ws.close_code)

    async def _identify(self, ws: ServerConnection, d: dict[str, Any]) -> None:
        self.identifies.append(d)
        if d.get("token") != self.token:
            await ws.close(4004, "Authentication failed.")
            return
        session_id = uuid.uuid4().hex
        session = self._sessions[session_id] = _Session()
        async with self._lock:
            self._current = session_id
            ready = {
                "v": 10,
                "session_id": session_id,
                "resume_gateway_url": self.resume_url,
                "user": {"id": "1270000000000000001", "username": "stand-in-bot", "bot": True},
            }
            await ws.send(json.dumps(session.event("READY", ready, keep=False)))
            backlog = [session.event("MESSAGE_CREATE", p) for p in self._pending]
            self._pending.clear()
            for event in backlog:
                await ws.send(json.dumps(event))
            self._live = ws
            self._connected.set()

    async def _resume(self, ws: ServerConnection, d: dict[str, Any]) -> None:
        self.resume_count += 1
        session = self._sessions.get(d.get("session_id", ""))
        if session is None or d.get("token") != self.token:
            await ws.send(json.dumps({"op": INVALID_SESSION, "d": False}))
            return
        async with self._lock:
            self._current = d["session_id"]
            for event in session.history:
                if event["s"] > (d.get("seq") or 0):
                    await ws.send(json.dumps(event))
            await ws.send(json.dumps(session.event("RESUMED", {}, keep=False)))
            self._live = ws
            self._connected.set()

    async def _dispatch(self, t: str, d: dict[str, Any]) -> None:
        async with self._lock:
            session = self._sessions.get(self._current or "")
            if session is None:
                self._pending.append(d)
                return
            event = session.event(t, d)
            if self._live is not None:
                try:
                    await self._live.send(json.dumps(event))
                except ConnectionClosed:
                    pass  # recorded: replayed when the client resumes

    async def _drop(self) -> None:
        async with self._lock:
            self._live = None
            self._connected.clear()
            for ws in list(self._open):
                ws.transport.abort()

    async def _invalidate(self) -> None:
        self._sessions.pop(self._current or "", None)
        self._current = None
        await self._send_live({"op": INVALID_SESSION, "d": False})

    async def _send_live(self, payload: dict[str, Any]) -> None:
        if self._live is not None:
            await self._live.send(json.dumps(payload))


def main() -> None:
    """`python -m cli.standins.discord_gateway [token]`: serve until Ctrl-C (point options.gateway_url at it)."""
    import sys
    import time

    gateway = StandInGateway(token=sys.argv[1] if len(sys.argv) > 1 else "stand-in-bot-token").start()
    print(f"stand-in Discord gateway on {gateway.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        gateway.stop()


if __name__ == "__main__":
    main()
