"""Test helpers for the channel adapters: fixture payloads, configs, and a local HTTP stand-in for the platforms."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from shared.config import PLATFORMS, ChannelConfig, SessionOptions

FIXTURES = Path(__file__).with_name("fixtures")
# The receive time the fixtures were written for: just after their messages' send times (2025-11-25 01:00-01:11 UTC).
# Parsers refuse a message older than the replay window, so a test that parses them gives the channel this clock.
FIXTURE_NOW = 1764033600.0


def fixture_bytes(platform: str, name: str) -> bytes:
    return (FIXTURES / platform / f"{name}.json").read_bytes()


def fixture(platform: str, name: str) -> Any:
    return json.loads(fixture_bytes(platform, name))


def make_config(
    platform: str, channel_id: str | None = None, api_base: str | None = None, **options: Any
) -> ChannelConfig:
    """A ChannelConfig with test secrets; the secret values are '<name>-value' unless overridden via options."""
    defaults = {"whatsapp": {"phone_number_id": "106540352242922"}, "telegram": {"bot_username": "AcmeSupportBot"}}
    secrets = {name: options.pop(name, f"{name}-value") for name in PLATFORMS[platform]["secrets"]}
    return ChannelConfig(
        id=channel_id or f"{platform}-main",
        platform=platform,
        agent="echo",
        api_base=api_base or PLATFORMS[platform]["api_base"],
        secrets=secrets,
        options={**defaults.get(platform, {}), **options},
        session=SessionOptions(),
    )


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


class StandIn:
    """A real HTTP server on 127.0.0.1 that records requests and answers from a script (then `default`).

    Use as a context manager; `base` is its URL.
    """

    def __init__(self, *replies: Reply, default: Reply | None = None):
        self.script = list(replies)
        self.default = default or Reply()
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with stand_in.lock:
                    stand_in.requests.append(Recorded("POST", self.path, headers, json.loads(raw or b"null")))
                    reply = stand_in.script.pop(0) if stand_in.script else stand_in.default
                data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def no_sleep(sender: Any) -> list[float]:
    """Make an HttpSender record its back-off waits instead of sleeping; returns the list of waits."""
    waits: list[float] = []
    sender.sleep = waits.append
    return waits
