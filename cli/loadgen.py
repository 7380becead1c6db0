"""`chatsessions loadgen`: play WhatsApp, Telegram and Discord against a running ingress and check every reply.

Each simulated session is a real chat in the platform's own webhook format, correctly signed:
  * WhatsApp Cloud API `messages` webhooks (X-Hub-Signature-256), DMs and groups (several members);
  * Telegram Bot API Updates (X-Telegram-Bot-Api-Secret-Token), private chats and supergroups;
  * Discord `/ask` application-command interactions on the interactions endpoint (Ed25519-signed), DM channels and
    guild channels. (Not the gateway: interactions need no extra process, and reach the same sessions.)
Replies are received by a StandInPlatforms (the platforms' send APIs, cli/standins/platforms.py) that this command
starts on the host:port of the channels' `api_base`; the first path segment of the api_base is the stand-in prefix.

Every message text starts with a tag `lg-<run>-<session>-<n>`; the Agent must repeat it in its reply (the `echo`
Agent does, as do cli.bench_agents:DemoEcho and SlowEcho). That gives, per message: latency from the webhook's
200 to the reply at the stand-in, and the correctness counts:
  lost        accepted (200) but no reply arrived
  duplicated  replies beyond the first for one message
  reordered   replies that arrived after the reply to a later message of the same session
  misrouted   replies that arrived in another chat than the message's session
A session's messages are POSTed one after the other (the next only after the previous one's 200), as the
platforms deliver a chat's updates, so the order the ingress sees is the order they were written in.

Load shapes: --concurrency C (closed loop: at most C messages awaiting their reply, and --window per session) or
--rate R (open loop: R messages/s offered, sessions round-robin, whatever the replies do). In code, a Workload with
`continues=` an earlier one plays the next messages of that one's sessions (the same chats: waves of a benchmark).

--status-callbacks posts what a WhatsApp deployment gets three of for every reply instead: signed status webhooks
(`statuses[]`: sent, delivered, read of the session's replies, in turn); the ingress answers them 200 and nothing
else, so a status callback is done at its 200.

    chatsessions loadgen --url http://127.0.0.1:8000 --config channels.toml --sessions 300 --messages 10 \
        --concurrency 32 --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import queue
import random
import re
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:  # the heavy imports wait until a load runs: `chatsessions <anything>` builds this parser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cli.standins.platforms import Sent, StandInPlatforms

TAG = re.compile(r"lg-(\d{6})-(\d+)-(\d+)")
KINDS = ("dm", "group")
FILLERS = (
    "hi, my name is {name}",
    "my order {order} has not arrived",
    "where is my order?",
    "what is my name?",
    "thanks, that helps",
    "can I change the delivery address for order {order}?",
)
NAMES = ("Ana", "Bruno", "Carla", "Diego", "Eve", "Farid", "Gita", "Hugo")
DISCORD_GUILD = "1280000000000000001"
ECHOING_AGENTS = ("echo", "cli.bench_agents:DemoEcho", "cli.bench_agents:SlowEcho")


# --------------------------------------------------------------------------------------------------------------------
# Targets: what the load generator needs to know about each channel


@dataclass(frozen=True)
class Target:
    channel_id: str
    platform: str  # whatsapp | telegram | discord
    prefix: str  # the stand-in prefix its replies arrive under
    secrets: Mapping[str, str] = field(repr=False)
    options: Mapping[str, Any]
    agent: str
    discord_key: Ed25519PrivateKey | None = field(default=None, repr=False)


def discord_key_from_seed(seed_hex: str) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex))


def targets_from_settings(settings: Any, discord_key: Ed25519PrivateKey | None = None,
                          channels: Iterable[str] | None = None, platforms: Iterable[str] | None = None,
                          echoing: Iterable[str] = ECHOING_AGENTS,
                          ) -> tuple[list[Target], tuple[str, int] | None, list[str]]:
    """The channels loadgen can drive, the stand-in address their api_base points at, and warnings for the others.

    A channel is usable when its api_base is http://<local host>:<port>/<prefix> (a stand-in: never send load whose
    replies would go to a real platform) and, for Discord, when the signing key matches its public key. A channel
    whose agent is not among `echoing` (the Agents known to repeat the message) gets a warning.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cli.embedded import DEMO_DISCORD_SIGNING_SEED, DEMO_SECRETS

    wanted_channels = set(channels) if channels else None
    wanted_platforms = set(platforms) if platforms else None
    targets: list[Target] = []
    warnings: list[str] = []
    address: tuple[str, int] | None = None
    for cid, c in settings.channels.items():
        if wanted_channels is not None and cid not in wanted_channels:
            continue
        if wanted_platforms is not None and c.platform not in wanted_platforms:
            continue
        parts = urlsplit(c.api_base)
        path = [seg for seg in parts.path.split("/") if seg]
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost") or len(path) != 1:
            warnings.append(f"{cid}: api_base {c.api_base} is not a local stand-in (http://127.0.0.1:PORT/PREFIX); skipped")
            continue
        here = ("127.0.0.1", parts.port or 80)
        if address is not None and here != address:
            warnings.append(f"{cid}: api_base points at {here[0]}:{here[1]}, others at {address[0]}:{address[1]}; skipped")
            continue
        key = None
        if c.platform == "discord":
            key = discord_key
            if key is None and c.secrets["public_key"] == DEMO_SECRETS["ACME_DISCORD_PUBLIC_KEY"]:
                key = Ed25519PrivateKey.from_private_bytes(DEMO_DISCORD_SIGNING_SEED)
            public = key.public_key().public_bytes_raw().hex() if key else None
            if public != c.secrets["public_key"]:
                warnings.append(f"{cid}: no signing key for its public_key (--discord-key SEED_HEX); skipped")
                continue
        if c.agent not in echoing:
            warnings.append(f"{cid}: agent {c.agent!r} may not repeat the message text; replies it does not tag "
                            "count as lost (use agent = \"echo\")")
        address = here
        targets.append(Target(cid, c.platform, path[0], c.secrets, c.options, c.agent, key))
    return targets, address, warnings


# --------------------------------------------------------------------------------------------------------------------
# Sessions and messages


@dataclass(eq=False)
class Session:
    index: int
    target: Target
    kind: str  # dm | group
    chat_id: str  # where its replies must arrive (the stand-in's chat id)
    members: list[tuple[str, str]]  # (platform user id, display name)
    next_k: int = 0
    reserved: int = 0
    outstanding: int = 0
    queued: bool = False
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def label(self) -> str:
        return f"{self.target.platform}:{self.kind}"


@dataclass(eq=False)
class Msg:
    session: Session
    k: int
    platform_message_id: str
    t_sched: float  # when it was due (open loop) or taken (closed loop), epoch seconds
    t_sent: float = 0.0
    t_accepted: float | None = None
    status: int | None = None  # HTTP status of the last attempt; None = transport error
    attempts: int = 0
    receipts: list[tuple[int, float, str, str]] = field(default_factory=list)  # (arrival no., at, prefix, chat)
    event: threading.Event | None = None


def _session(index: int, run_num: int, target: Target, kind: str) -> Session:
    tail = f"{run_num}{index:07d}"
    name = NAMES[index % len(NAMES)]
    if target.platform == "whatsapp":
        if kind == "dm":
            phone = f"1{tail}"
            return Session(index, target, kind, phone, [(phone, f"{name} {index}")])
        members = [(f"2{tail}{m}", NAMES[(index + m) % len(NAMES)]) for m in range(3)]
        return Session(index, target, kind, f"LG{run_num}G{index}", members)
    if target.platform == "telegram":
        if kind == "dm":
            return Session(index, target, kind, tail, [(tail, name)])
        members = [(f"7{tail}{m}", NAMES[(index + m) % len(NAMES)]) for m in range(3)]
        return Session(index, target, kind, f"-100{tail}", members)
    channel = str(1_300_000_000_000_000_000 + run_num * 10_000_000 + index)
    if kind == "dm":
        return Session(index, target, kind, channel, [(str(400_000_000_000_000_000 + int(tail)), name)])
    members = [(str(500_000_000_000_000_000 + int(tail) * 10 + m), NAMES[(index + m) % len(NAMES)]) for m in range(3)]
    return Session(index, target, kind, channel, members)


_update_ids = itertools.count(int(time.time()) % 1_000_000 * 1000)
_snowflake_inc = itertools.count()


def discord_interaction(session: Session, user: tuple[str, str], question: str) -> dict[str, Any]:
    """An APPLICATION_COMMAND `/ask question:<text>` interaction, as Discord POSTs it."""
    from cli.standins import payloads as p

    uid, name = user
    u = {"id": uid, "username": name.lower(), "global_name": name, "discriminator": "0", "avatar": None,
         "public_flags": 0}
    doc: dict[str, Any] = {
        "type": 2, "id": p.discord_snowflake(increment=next(_snowflake_inc)),
        "application_id": str(session.target.options.get("application_id", "1")),
        "token": f"lg-token-{random.getrandbits(64):x}", "version": 1, "channel_id": session.chat_id,
        "data": {"id": "1300000000000000001", "name": "ask", "type": 1,
                 "options": [{"name": "question", "type": 3, "value": question}]},
    }
    if session.kind == "group":
        doc["guild_id"] = DISCORD_GUILD
        doc["member"] = {"user": u, "roles": [], "permissions": "0"}
    else:
        doc["user"] = u
    return doc


def build_status_request(session: Session, k: int, run_num: int) -> tuple[str, bytes, dict[str, str], str]:
    """(path, body, headers, message id) of status callback `k` of a WhatsApp DM session, signed now: the statuses
    of our replies to it in the order Meta posts them, sent, delivered, read for reply k // 3, then the next."""
    from cli.standins import payloads as p

    t = session.target
    msg_id = f"wamid.LGS{run_num}.{session.index}.{k // len(p.WHATSAPP_STATUSES)}"
    status = p.WHATSAPP_STATUSES[k % len(p.WHATSAPP_STATUSES)]
    body = p.encode(p.whatsapp_status(str(t.options["phone_number_id"]), session.chat_id, msg_id, status))
    return f"/webhooks/{t.channel_id}", body, p.sign_whatsapp(body, t.secrets["app_secret"]), msg_id


def build_request(session: Session, k: int, text: str, run_num: int) -> tuple[str, bytes, dict[str, str], str]:
    """(path, body, headers, platform message id) of message `k` of the session, signed now."""
    from cli.standins import payloads as p

    t = session.target
    user = session.members[k % len(session.members)]
    if t.platform == "whatsapp":
        msg_id = f"wamid.LG{run_num}.{session.index}.{k}"
        body = p.encode(p.whatsapp_text(str(t.options["phone_number_id"]), user[0], user[1], text, msg_id,
                                        group_id=session.chat_id if session.kind == "group" else None))
        return f"/webhooks/{t.channel_id}", body, p.sign_whatsapp(body, t.secrets["app_secret"]), msg_id
    if t.platform == "telegram":
        chat_type = "private" if session.kind == "dm" else "supergroup"
        body = p.encode(p.telegram_text(int(session.chat_id), chat_type, int(user[0]), user[1], text, k + 1,
                                        next(_update_ids), title=f"Load group {session.index}"))
        return (f"/webhooks/{t.channel_id}", body, p.telegram_headers(t.secrets["secret_token"]),
                f"{session.chat_id}:{k + 1}")
    doc = discord_interaction(session, user, text)
    body = p.encode(doc)
    assert t.discord_key is not None
    return f"/webhooks/{t.channel_id}/interactions", body, p.sign_discord(body, t.discord_key), f"interaction:{doc['id']}"


# --------------------------------------------------------------------------------------------------------------------
# A workload: sessions x messages, in one load shape


WEBHOOKS = ("message", "status")  # what a workload POSTs: user messages, or WhatsApp status callbacks


@dataclass(eq=False)
class Workload:
    """N sessions x M messages, closed loop (`concurrency`) or open loop (`rate`).

    `webhook="status"` POSTs WhatsApp status callbacks (sent, delivered, read of our replies) to the WhatsApp DM
    sessions of `kinds` instead of user messages: nothing answers them, so such a workload expects no replies.

    `continues=wl` (a workload this LoadGen has run) plays the next `messages` of the first `sessions` sessions of
    `wl` instead of new sessions: the same chats and members, each session's messages numbered on from where it
    stopped, so a second wave lands on sessions that exist, with their history. `kinds` does not apply then.
    """

    name: str
    sessions: int
    messages: int
    rate: float | None = None  # open loop: messages/s offered
    concurrency: int | None = None  # closed loop: messages awaiting a reply (or a 200 without replies)
    window: int = 1  # closed loop: messages of one session awaiting a reply at once (0 = no limit)
    expect_replies: bool = True  # False: ingress only, a message is done at its 200
    senders: int = 32  # open loop: HTTP client threads
    kinds: tuple[str, ...] | None = None  # e.g. ("whatsapp:dm",); default every platform:kind of the targets
    limit: int | None = None  # stop after this many messages in all (sessions round robin), if fewer than N x M
    duration_s: float | None = None  # stop sending after this long (whatever is left of N x M is not sent)
    webhook: str = "message"  # one of WEBHOOKS
    continues: Workload | None = None  # play on the sessions of this earlier workload (see above)
    # filled in by LoadGen.run
    run_num: int = 0
    plan: list[Session] = field(default_factory=list)
    msgs: dict[tuple[int, int], Msg] = field(default_factory=dict)
    replied: int = 0  # messages with at least one reply (counted by the collector thread alone)
    sent: int = 0
    accepted: int = 0
    t_start: float = 0.0
    t_sent_all: float = 0.0
    finished: bool = False
    _ready: deque = field(default_factory=deque)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _live_latency: list[float] = field(default_factory=list)
    _errors: Counter = field(default_factory=Counter)
    _count_lock: threading.Lock = field(default_factory=threading.Lock)
    _reserved: int = 0

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("a workload has either a rate (open loop) or a concurrency (closed loop)")
        if self.sessions < 1 or self.messages < 1:
            raise ValueError("sessions and messages must be at least 1")
        if self.webhook not in WEBHOOKS:
            raise ValueError(f"webhook must be one of {WEBHOOKS}, not {self.webhook!r}")
        if self.webhook == "status" and self.expect_replies:
            raise ValueError("status callbacks get no replies: expect_replies=False")
        if self.continues is not None and self.continues.webhook != self.webhook:
            raise ValueError(f"workload {self.name} continues {self.continues.name}, which posts other webhooks")

    @property
    def total(self) -> int:
        return self.sessions * self.messages if self.limit is None else min(self.limit, self.sessions * self.messages)

    # -- scheduling: which session sends next ---------------------------------------------------------------------

    def _limit(self) -> int:
        return 0 if self.rate is not None else self.window

    def take(self, block: bool = True) -> Session | None:
        """Reserve the next message of the next ready session (round robin); None when every message is reserved."""
        with self._cond:
            while True:
                if self._reserved >= self.total or self.expired():
                    return None
                if self._ready:
                    self._reserved += 1
                    s = self._ready.popleft()
                    s.queued = False
                    s.reserved += 1
                    s.outstanding += 1
                    limit = self._limit()
                    if s.reserved < self.messages and (limit == 0 or s.outstanding < limit):
                        self._ready.append(s)
                        s.queued = True
                    return s
                if not block:
                    return None
                self._cond.wait(0.1)  # every ready session is waiting for replies (closed loop window)

    def expired(self) -> bool:
        return self.duration_s is not None and self.t_start > 0 and time.time() - self.t_start >= self.duration_s

    def done(self, s: Session) -> None:
        """A message of `s` got its reply (or gave up waiting): the session may send again."""
        with self._cond:
            s.outstanding -= 1
            if not s.queued and s.reserved < self.messages:
                self._ready.append(s)
                s.queued = True
                self._cond.notify()


# --------------------------------------------------------------------------------------------------------------------
# The stand-in tap: every reply the stand-in records comes to us as it arrives


class _Tap(list):
    """Replaces StandInPlatforms.sent: the stand-in appends under its lock; we hand each record to the collector.
    With keep=False records are not kept (a long run would hold every reply's headers and body)."""

    def __init__(self, callback: Callable[[Sent], None], initial: Iterable[Sent] = (), keep: bool = False):
        super().__init__(initial)
        self.callback = callback
        self.keep = keep

    def append(self, item: Sent) -> None:  # type: ignore[override]
        self.callback(item)
        if self.keep:
            super().append(item)


class _Client:
    """One keep-alive HTTP/1.1 connection to the ingress (one per sender thread)."""

    def __init__(self, url: str, timeout: float = 30.0):
        import http.client

        self.http = http.client
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.base = parts.path.rstrip("/")
        self.timeout = timeout
        self.conn: Any = None

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        for attempt in (1, 2):  # a keep-alive connection the server closed while idle: reconnect once
            if self.conn is None:
                self.conn = self.http.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request("POST", self.base + path, body=body, headers=headers)
                response = self.conn.getresponse()
                response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.close()
                return response.status
            except (self.http.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                    self.http.CannotSendRequest, self.http.ResponseNotReady):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# --------------------------------------------------------------------------------------------------------------------
# The load generator


class LoadGen:
    """Drives workloads against an ingress and matches the replies a StandInPlatforms records.

    One LoadGen may run several workloads, one after the other or at once (`run(a, b)`), on the same stand-in.
    """

    def __init__(self, url: str, targets: list[Target], standin: StandInPlatforms, *, reply_timeout: float = 60.0,
                 drain_timeout: float = 30.0, progress: bool | None = None, retries: int = 3):
        if not targets:
            raise ValueError("no usable channels")
        self.url = url.rstrip("/")
        self.targets = targets
        self.standin = standin
        self.reply_timeout = reply_timeout
        self.drain_timeout = drain_timeout
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.retries = retries
        self.unmatched = 0  # replies without a tag of a workload of ours
        self._arrivals = itertools.count(1)
        self._runs: dict[int, list[Workload]] = {}  # tag run number -> its workloads (several: continued)
        self._inbox: queue.SimpleQueue[Sent | None] = queue.SimpleQueue()
        self._last_receipt = time.time()
        standin.sent = _Tap(self._inbox.put, standin.sent)
        # The stand-in writes a reply's headers and body in two sends: with Nagle on, the body waits for the
        # worker's delayed ACK (~40 ms a reply), which would be charged to the system under test.
        standin.server.RequestHandlerClass.disable_nagle_algorithm = True
        self._collector = threading.Thread(target=self._collect, name="loadgen-collector", daemon=True)
        self._collector.start()

    def close(self) -> None:
        self._inbox.put(None)
        self._collector.join(timeout=5)

    # -- receiving ------------------------------------------------------------------------------------------------

    def _collect(self) -> None:
        while (sent := self._inbox.get()) is not None:
            self._last_receipt = time.time()
            m = TAG.search(sent.text)
            key = (int(m.group(2)), int(m.group(3))) if m else None
            wl = next((w for w in self._runs.get(int(m.group(1)), ()) if key in w.msgs), None) if m else None
            msg = wl.msgs[key] if wl is not None else None
            if wl is None or msg is None:
                self.unmatched += 1
                continue
            msg.receipts.append((next(self._arrivals), sent.at, sent.prefix, sent.chat_id))
            if len(msg.receipts) == 1:
                wl.replied += 1
                if msg.t_accepted is not None and len(wl._live_latency) < 200_000:
                    wl._live_latency.append(max(0.0, sent.at - msg.t_accepted))
                if msg.event is not None:
                    msg.event.set()

    # -- sending --------------------------------------------------------------------------------------------------

    def _send(self, wl: Workload, client: _Client, s: Session, t_sched: float) -> Msg:
        """POST the session's next message (the session's sends are serialized, numbered in POST order)."""
        with s.send_lock:
            k = s.next_k
            s.next_k += 1
            if wl.webhook == "status":
                path, body, headers, msg_id = build_status_request(s, k, wl.run_num)
            else:
                filler = FILLERS[k % len(FILLERS)].format(name=s.members[0][1].split()[0], order=48000 + s.index)
                text = f"lg-{wl.run_num:06d}-{s.index}-{k} {filler}"
                path, body, headers, msg_id = build_request(s, k, text, wl.run_num)
            msg = Msg(s, k, msg_id, t_sched, event=threading.Event() if wl.concurrency and wl.expect_replies else None)
            wl.msgs[(s.index, k)] = msg
            msg.t_sent = time.time()
            for attempt in range(1, self.retries + 2):
                msg.attempts = attempt
                try:
                    msg.status = client.post(path, body, headers)
                except OSError as exc:
                    msg.status = None
                    with wl._count_lock:
                        wl._errors[f"transport: {exc.__class__.__name__}"] += 1
                if msg.status == 200:
                    msg.t_accepted = time.time()
                    with wl._count_lock:
                        wl.accepted += 1
                    break
                if msg.status is not None:
                    with wl._count_lock:
                        wl._errors[f"http {msg.status}"] += 1
                if msg.status not in (None, 429, 500, 502, 503, 504) or attempt > self.retries:
                    break
                if s.target.platform == "discord":  # a fresh signature timestamp, as Discord would
                    from cli.standins.payloads import sign_discord

                    headers = sign_discord(body, s.target.discord_key)
                time.sleep(0.2 * attempt)  # the platforms retry a 5xx later, with the same message id
            with wl._count_lock:
                wl.sent += 1
            return msg

    def _closed_loop_thread(self, wl: Workload) -> None:
        client = _Client(self.url)
        try:
            while (s := wl.take()) is not None:
                msg = self._send(wl, client, s, time.time())
                if msg.event is not None and msg.t_accepted is not None:
                    msg.event.wait(self.reply_timeout)
                wl.done(s)
        finally:
            client.close()

    def _open_loop(self, wl: Workload) -> list[threading.Thread]:
        work: queue.Queue[tuple[Session, float] | None] = queue.Queue()

        def sender() -> None:
            client = _Client(self.url)
            try:
                while (item := work.get()) is not None:
                    self._send(wl, client, *item)
            finally:
                client.close()

        def dispatcher() -> None:
            t0_mono, t0_wall = time.monotonic(), time.time()
            for n in itertools.count():
                s = wl.take()
                if s is None:
                    break
                due = n / wl.rate
                delay = t0_mono + due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                work.put((s, t0_wall + due))
            for _ in senders:
                work.put(None)

        senders = [threading.Thread(target=sender, name=f"loadgen-{wl.name}-send{i}", daemon=True)
                   for i in range(max(1, wl.senders))]
        return [*senders, threading.Thread(target=dispatcher, name=f"loadgen-{wl.name}-dispatch", daemon=True)]

    # -- running --------------------------------------------------------------------------------------------------

    def prepare(self, wl: Workload) -> None:
        if wl.continues is not None:
            self._continue(wl)
            return
        wl.run_num = random.randrange(100_000, 1_000_000)
        while wl.run_num in self._runs:
            wl.run_num = random.randrange(100_000, 1_000_000)
        slots = [(t, kind) for t in self.targets for kind in KINDS
                 if (wl.kinds is None or f"{t.platform}:{kind}" in wl.kinds or t.channel_id in wl.kinds)
                 and (wl.webhook == "message" or (t.platform, kind) == ("whatsapp", "dm"))]
        if not slots:
            raise ValueError(f"workload {wl.name}: no channel offers the kinds {wl.kinds}"
                             + (" as WhatsApp DMs (status callbacks)" if wl.webhook == "status" else ""))
        wl.plan = [_session(i, wl.run_num, *slots[i % len(slots)]) for i in range(wl.sessions)]
        self._enlist(wl)

    def _continue(self, wl: Workload) -> None:
        prev = wl.continues
        assert prev is not None
        if not prev.finished or prev not in self._runs.get(prev.run_num, ()):
            raise ValueError(f"workload {wl.name}: {prev.name} must have run on this load generator first")
        if wl.sessions > len(prev.plan):
            raise ValueError(f"workload {wl.name}: {prev.name} has {len(prev.plan)} sessions, not {wl.sessions}")
        wl.run_num = prev.run_num
        wl.plan = prev.plan[: wl.sessions]
        for s in wl.plan:
            with s.send_lock:  # a late sender of the earlier workload is done with it
                s.reserved = s.outstanding = 0
        self._enlist(wl)

    def _enlist(self, wl: Workload) -> None:
        for s in wl.plan:
            wl._ready.append(s)
            s.queued = True
        self._runs.setdefault(wl.run_num, []).append(wl)

    def run(self, *workloads: Workload, deadline_s: float | None = None) -> list[dict[str, Any]]:
        """Run the workloads at once; returns one report per workload (see `report`)."""
        for wl in workloads:
            self.prepare(wl)
        threads: list[threading.Thread] = []
        for wl in workloads:
            wl.t_start = time.time()
            if wl.rate is not None:
                wl_threads = self._open_loop(wl)
            else:
                wl_threads = [threading.Thread(target=self._closed_loop_thread, args=(wl,), daemon=True,
                                               name=f"loadgen-{wl.name}-{i}") for i in range(wl.concurrency)]
            threads += wl_threads
            for t in wl_threads:
                t.start()
        stop_progress = threading.Event()
        progress = threading.Thread(target=self._progress, args=(workloads, stop_progress), daemon=True)
        progress.start()
        hard_deadline = time.monotonic() + deadline_s if deadline_s else None
        try:
            for t in threads:
                t.join(None if hard_deadline is None else max(0.1, hard_deadline - time.monotonic()))
            for wl in workloads:
                wl.t_sent_all = time.time()
            self._drain(workloads, hard_deadline)
        finally:
            stop_progress.set()
            progress.join()
        return [self.report(wl) for wl in workloads]

    def _drain(self, workloads: Iterable[Workload], hard_deadline: float | None) -> None:
        """Wait until every accepted message has a reply, or no reply came for drain_timeout s; then settle."""
        waiting = [wl for wl in workloads if wl.expect_replies]

        def missing() -> int:
            if sum(wl.accepted - wl.replied for wl in waiting) > 0:  # cheap; exact check below
                return 1
            return sum(sum(1 for m in list(wl.msgs.values()) if m.t_accepted is not None and not m.receipts)
                       for wl in waiting)
        while missing():
            idle = time.time() - self._last_receipt
            if idle > self.drain_timeout or (hard_deadline and time.monotonic() > hard_deadline):
                break
            time.sleep(0.05)
        if any(wl.expect_replies for wl in workloads):
            time.sleep(0.5)  # a duplicate sent right behind its original still counts
        for wl in workloads:
            wl.finished = True

    def _progress(self, workloads: tuple[Workload, ...], stop: threading.Event) -> None:
        if not self.progress:
            stop.wait()
            return
        tty = sys.stderr.isatty()
        last_print = 0.0
        while not stop.wait(0.5):
            now = time.monotonic()
            if not tty and now - last_print < 5:
                continue
            last_print = now
            total = sum(wl.total for wl in workloads)
            sent = sum(wl.sent for wl in workloads)
            replies = [wl for wl in workloads if wl.expect_replies]
            done = sum(wl.replied for wl in replies) + sum(wl.sent for wl in workloads if not wl.expect_replies)
            frac = done / total if total else 1.0
            timed = [wl for wl in workloads if wl.duration_s]
            if timed:
                frac = max(frac, min(1.0, min((time.time() - wl.t_start) / wl.duration_s for wl in timed)))
            bar = "#" * int(frac * 24) + "." * (24 - int(frac * 24))
            elapsed = max(1e-6, time.time() - min(wl.t_start for wl in workloads))
            lat = sorted(x for wl in replies for x in wl._live_latency[-2000:])
            lat_text = (f" p50 {_pct(lat, 50) * 1000:.0f}ms p99 {_pct(lat, 99) * 1000:.0f}ms" if lat else "")
            errors = sum(sum(wl._errors.values()) for wl in workloads)
            line = (f"loadgen [{bar}] {frac * 100:5.1f}% sent {sent}/{total} done {done} "
                    f"{done / elapsed:7.1f}/s{lat_text} errors {errors} {elapsed:6.1f}s")
            sys.stderr.write(("\r" + line + "\x1b[K") if tty else (line + "\n"))
            sys.stderr.flush()
        if tty:
            sys.stderr.write("\n")

    # -- the report -----------------------------------------------------------------------------------------------

    def report(self, wl: Workload) -> dict[str, Any]:
        msgs = list(wl.msgs.values())
        accepted = [m for m in msgs if m.t_accepted is not None]
        replied = [m for m in accepted if m.receipts]
        duplicated = sum(len(m.receipts) - 1 for m in msgs if m.receipts)
        misrouted = sum(1 for m in msgs for (_, _, prefix, chat) in m.receipts
                        if (prefix, chat) != (m.session.target.prefix, m.session.chat_id))
        reordered = 0
        by_session: dict[int, list[tuple[int, int]]] = {}
        for m in msgs:
            if m.receipts:
                by_session.setdefault(m.session.index, []).append((m.receipts[0][0], m.k))
        for arrivals in by_session.values():
            highest = -1
            for _, k in sorted(arrivals):
                if k < highest:
                    reordered += 1
                highest = max(highest, k)
        latencies = [max(0.0, m.receipts[0][1] - m.t_accepted) for m in replied]
        accept = [m.t_accepted - (m.t_sched if wl.rate is not None else m.t_sent) for m in accepted]
        first = min((m.t_sent for m in msgs), default=wl.t_start)
        if wl.expect_replies:
            last = max((m.receipts[0][1] for m in replied), default=first)
            done = len(replied)
        else:
            last = max((m.t_accepted for m in accepted), default=first)
            done = len(accepted)
        duration = max(1e-9, last - first)
        send_span = max(1e-9, max((m.t_sent for m in msgs), default=first) - first)
        kinds: dict[str, dict[str, Any]] = {}
        for label in sorted({s.label for s in wl.plan}):
            mine = [m for m in accepted if m.session.label == label]
            lat = [max(0.0, m.receipts[0][1] - m.t_accepted) for m in mine if m.receipts]
            kinds[label] = {"sessions": sum(1 for s in wl.plan if s.label == label), "accepted": len(mine),
                            "replied": len(lat), "latency_ms": _percentiles(lat)}
        return {
            "workload": wl.name,
            "mode": "open" if wl.rate is not None else "closed",
            "rate": wl.rate,
            "concurrency": wl.concurrency,
            "window": wl.window if wl.rate is None else None,
            "sessions": wl.sessions,
            "messages_per_session": wl.messages,
            "messages": wl.total,
            "sent": len(msgs),
            "accepted": len(accepted),
            "rejected": len(msgs) - len(accepted),
            "retried": sum(1 for m in msgs if m.attempts > 1),
            "errors": dict(wl._errors),
            "replied": len(replied) if wl.expect_replies else None,
            "duration_s": round(duration, 3),
            "msgs_per_s": round(done / duration, 2),
            "send_rate": round(len(msgs) / send_span, 2) if len(msgs) > 1 else None,
            "latency_ms": _percentiles(latencies) if wl.expect_replies else None,
            "accept_latency_ms": _percentiles(accept),
            "lost": len(accepted) - len(replied) if wl.expect_replies else 0,
            "duplicated": duplicated,
            "reordered": reordered,
            "misrouted": misrouted,
            "unmatched_replies": self.unmatched,
            "by_kind": kinds,
        }


def replied_within(wl: Workload, seconds: float) -> int:
    """Messages of the workload whose first reply reached the stand-in at most `seconds` after the webhook's 200."""
    return sum(1 for m in wl.msgs.values()
               if m.t_accepted is not None and m.receipts and m.receipts[0][1] - m.t_accepted <= seconds)


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return sorted_values[min(rank, len(sorted_values) - 1)]


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    s = sorted(values)
    return {"p50": round(_pct(s, 50) * 1000, 2), "p95": round(_pct(s, 95) * 1000, 2),
            "p99": round(_pct(s, 99) * 1000, 2), "max": round(s[-1] * 1000, 2),
            "mean": round(sum(s) / len(s) * 1000, 2)}


def correct(report: Mapping[str, Any]) -> bool:
    return not (report["lost"] or report["duplicated"] or report["reordered"] or report["misrouted"])


def summary(report: Mapping[str, Any]) -> str:
    lat = report.get("latency_ms") or {}
    acc = report.get("accept_latency_ms") or {}
    shape = (f"open loop {report['rate']:g} msg/s" if report["mode"] == "open"
             else f"closed loop, concurrency {report['concurrency']}, window {report['window']}")
    lines = [
        f"{report['workload']}: {report['sessions']} sessions x {report['messages_per_session']} messages, {shape}",
        f"  accepted {report['accepted']}/{report['sent']} (rejected {report['rejected']}, retried {report['retried']})"
        + (f", errors {report['errors']}" if report["errors"] else ""),
        f"  throughput {report['msgs_per_s']:.1f} msg/s over {report['duration_s']:.1f}s",
        f"  webhook 200 in  p50 {acc.get('p50')} ms  p95 {acc.get('p95')} ms  p99 {acc.get('p99')} ms",
    ]
    if report.get("latency_ms") is not None:
        lines.append(f"  200 -> reply    p50 {lat.get('p50')} ms  p95 {lat.get('p95')} ms  p99 {lat.get('p99')} ms  "
                     f"max {lat.get('max')} ms")
        lines.append(f"  lost {report['lost']}  duplicated {report['duplicated']}  reordered {report['reordered']}  "
                     f"misrouted {report['misrouted']}  (unmatched replies {report['unmatched_replies']})")
        for label, k in report["by_kind"].items():
            lines.append(f"    {label:18} {k['sessions']:6} sessions  {k['replied']:7}/{k['accepted']:<7} replied  "
                         f"p50 {k['latency_ms']['p50']} ms  p99 {k['latency_ms']['p99']} ms")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("LOADGEN_URL", "http://127.0.0.1:8000"),
                        help="the ingress (default http://127.0.0.1:8000)")
    parser.add_argument("--config", default=os.environ.get("CHATSESSIONS_CONFIG"),
                        help="the deployment's channels TOML (secrets from the environment it names); "
                             "default CHATSESSIONS_CONFIG")
    parser.add_argument("--sessions", type=int, default=60)
    parser.add_argument("--messages", type=int, default=5, help="messages per session")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--rate", type=float, help="open loop: messages per second offered")
    shape.add_argument("--concurrency", type=int, help="closed loop: messages awaiting their reply (default 16)")
    parser.add_argument("--window", type=int, default=1,
                        help="closed loop: messages of one session awaiting a reply at once (0 = no limit)")
    parser.add_argument("--senders", type=int, default=32, help="open loop: HTTP client threads")
    parser.add_argument("--duration", type=float, help="stop sending after this many seconds")
    parser.add_argument("--channels", help="comma-separated channel ids (default: every usable channel)")
    parser.add_argument("--platforms", help="comma-separated platforms (whatsapp,telegram,discord)")
    parser.add_argument("--discord-key", default=os.environ.get("LOADGEN_DISCORD_KEY"),
                        help="hex Ed25519 seed whose public key the Discord channel has (env LOADGEN_DISCORD_KEY)")
    parser.add_argument("--no-replies", action="store_true", help="ingress only: a message is done at its 200")
    parser.add_argument("--status-callbacks", action="store_true",
                        help="POST WhatsApp status callbacks (sent, delivered, read) to the WhatsApp channels' DM "
                             "sessions instead of messages; implies --no-replies")
    parser.add_argument("--reply-timeout", type=float, default=60.0)
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="after the last send, give up when no reply came for this long")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def main(args: argparse.Namespace) -> int:
    from cli.standins.platforms import StandInPlatforms
    from shared.config import load_settings
    from shared.errors import ConfigError

    env = dict(os.environ)
    if args.config:
        env["CHATSESSIONS_CONFIG"] = args.config
    settings = load_settings(env)
    key = discord_key_from_seed(args.discord_key) if args.discord_key else None
    platforms = args.platforms.split(",") if args.platforms else None
    if args.status_callbacks:
        if platforms and "whatsapp" not in platforms:
            raise ConfigError("--status-callbacks: status callbacks are WhatsApp's (--platforms whatsapp)")
        platforms = ["whatsapp"]
    targets, address, warnings = targets_from_settings(
        settings, key, args.channels.split(",") if args.channels else None, platforms)
    for w in warnings:
        print(f"loadgen: {w}", file=sys.stderr)
    if not targets or address is None:
        raise ConfigError(f"{settings.config_path}: no channel loadgen can drive (it needs api_base pointing at a "
                          "local stand-in, http://127.0.0.1:PORT/PREFIX)")
    try:
        standin = StandInPlatforms(address[0], address[1]).start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address[0]}:{address[1]} for the replies (api_base): {exc}") from None
    concurrency = None if args.rate else (args.concurrency or 16)
    wl = Workload("loadgen", args.sessions, args.messages, rate=args.rate, concurrency=concurrency,
                  window=args.window, expect_replies=not (args.no_replies or args.status_callbacks),
                  senders=args.senders, duration_s=args.duration,
                  webhook="status" if args.status_callbacks else "message")
    gen = LoadGen(args.url, targets, standin, reply_timeout=args.reply_timeout, drain_timeout=args.drain_timeout,
                  progress=False if args.quiet else None)
    if not args.quiet and not sys.stderr.isatty():
        gen.progress = True
    try:
        report = gen.run(wl)[0]
    finally:
        gen.close()
        standin.stop()
    report["channels"] = [t.channel_id for t in targets]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(summary(report))
    return 0 if correct(report) and not report["rejected"] else 1
