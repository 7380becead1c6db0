"""The traffic driver: many sessions on the three platforms, in their real webhook formats, while a fault happens.

Every message text is unique ("<session label>#<i>"), so the echo Agent's reply ("echo: <text>") names the message
it answers. Like the platforms, the driver sends a session's messages one after another (the next one only after
the previous one was accepted or given up) while sessions run in parallel, and it RETRIES a webhook that got no
2xx (503, connection error, timeout) with backoff for up to `give_up_s` (about what Meta and Telegram do in their
first minute). It records, per message, every answer and whether and when it was ACCEPTED (a 200).
"""

from __future__ import annotations

import collections
import itertools
import random
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cli.standins.payloads import (
    DISCORD_EPOCH_MS,
    encode,
    sign_discord,
    sign_whatsapp,
    telegram_headers,
    telegram_text,
    whatsapp_text,
)

from .harness import (
    DC,
    POISON,
    POISON_PHONE_ID,
    RUN,
    SECRETS,
    TG,
    WA,
    WA_PHONE_ID,
    session_key,
)

_ids = itertools.count(1)
KINDS = ("wa-dm", "tg-dm", "dc-guild", "wa-group", "tg-group", "dc-dm")
DISCORD_KINDS = ("dc-guild", "dc-dm")
GUILD = "1280000000000000009"
HTTP_TIMEOUT = 10.0


def next_id() -> int:
    return next(_ids)


# --------------------------------------------------------------------------------------------------------------------
# Requests in the platforms' formats


def whatsapp_request(phone_number_id: str, app_secret: str, sender: str, text: str, msg_id: str, *,
                     name: str | None = None, group_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    body = encode(whatsapp_text(phone_number_id, sender, name or f"User {sender[-4:]}", text, msg_id,
                                group_id=group_id))
    return body, sign_whatsapp(body, app_secret)


def discord_snowflake(n: int) -> str:
    """A snowflake for now whose low 22 bits are `n`: unique per message, its time still readable by the ingress."""
    ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
    return str((ms << 22) | (n & 0x3FFFFF))


def discord_interaction(channel: str, user_id: str, name: str, question: str, interaction_id: str,
                        guild_id: str | None) -> dict[str, Any]:
    """An /ask APPLICATION_COMMAND interaction (tests/fixtures/discord/interaction_slash_command.json's shape)."""
    user = {"id": user_id, "username": name.lower(), "global_name": name, "discriminator": "0", "avatar": None,
            "public_flags": 0}
    doc: dict[str, Any] = {
        "type": 2, "id": interaction_id, "application_id": "1270000000000000009",
        "token": f"interaction-token-{interaction_id}", "version": 1, "channel_id": channel,
        "data": {"id": "1300000000000000009", "name": "ask", "type": 1,
                 "options": [{"name": "question", "type": 3, "value": question}]},
    }
    if guild_id:
        doc["guild_id"] = guild_id
        doc["member"] = {"user": user, "roles": [], "permissions": "0"}
    else:
        doc["user"] = user
    return doc


# --------------------------------------------------------------------------------------------------------------------
# Sessions and messages


@dataclass(eq=False)
class Session:
    label: str  # unique in the run; the first part of every message text
    kind: str  # one of KINDS, or "pz-dm" / "sl-dm" (DMs on the poison channel)
    channel: str  # channel id (= stand-in prefix)
    chat_id: str  # where its replies must go
    key: str  # the session key the product should derive
    members: list[tuple[str, str]]  # (platform user id, display name); groups alternate between them
    count: int
    poison: frozenset[int] = frozenset()  # indices of messages the poison Agent raises for
    slow: bool = False  # every message makes the poison channel's Agent think for a second
    tg_chat_type: str = "private"

    def text(self, i: int) -> str:
        return f"{self.label}#{i}" + (" poison" if i in self.poison else "") + (" slow" if self.slow else "")

    def request(self, i: int, discord_key: Ed25519PrivateKey) -> tuple[str, bytes, dict[str, str], str]:
        """(path, body, headers, platform message id) of message i; built once, re-sent as is on retries."""
        user_id, name = self.members[i % len(self.members)]
        text = self.text(i)
        if self.channel in (WA, POISON):
            phone_id, prefix = (WA_PHONE_ID, "FAULT_WA") if self.channel == WA else (POISON_PHONE_ID, "FAULT_PO")
            msg_id = f"wamid.fault{RUN}{next_id()}"
            body, headers = whatsapp_request(phone_id, SECRETS[f"{prefix}_APP_SECRET"], user_id, text, msg_id,
                                             name=name, group_id=self.chat_id if self.kind.endswith("group") else None)
            return f"/webhooks/{self.channel}", body, headers, msg_id
        if self.channel == TG:
            message_id = next_id()
            body = encode(telegram_text(int(self.chat_id), self.tg_chat_type, int(user_id), name, text, message_id,
                                        700_000_000 + message_id, title=f"Group {self.chat_id}"))
            return f"/webhooks/{TG}", body, telegram_headers(SECRETS["FAULT_TG_SECRET"]), f"{self.chat_id}:{message_id}"
        interaction_id = discord_snowflake(next_id())
        body = encode(discord_interaction(self.chat_id, user_id, name, text, interaction_id,
                                          GUILD if self.kind == "dc-guild" else None))
        return f"/webhooks/{DC}/interactions", body, sign_discord(body, discord_key), f"interaction:{interaction_id}"


@dataclass(eq=False)
class Sent:
    """One message of the traffic and what happened to it at the ingress."""

    session: Session
    index: int
    text: str
    platform_message_id: str = ""
    first_at: float = 0.0
    accepted_at: float | None = None
    attempts: int = 0
    answers: list[str] = field(default_factory=list)  # "200", "503", "conn", "timeout", "401", ...

    @property
    def accepted(self) -> bool:
        return self.accepted_at is not None

    @property
    def poison(self) -> bool:
        return self.index in self.session.poison


def make_sessions(count: int, messages: int, *, poison_sessions: int = 0, poison_every: int = 4,
                  slow_sessions: int = 0, kinds: tuple[str, ...] = KINDS) -> list[Session]:
    """`count` echo sessions cycling through `kinds` (WhatsApp/Telegram/Discord DMs and groups), plus
    `poison_sessions` WhatsApp DMs on the poison channel where every `poison_every`-th message (from the 2nd on) is
    poison, plus `slow_sessions` DMs on that channel whose every turn takes the Agent a second."""
    sessions = []
    for n in range(count):
        kind = kinds[n % len(kinds)]
        label = f"{kind}-{n:04d}"
        if kind == "wa-dm":
            phone = f"5519{n:08d}"
            s = Session(label, kind, WA, phone, session_key(WA, "dm", phone), [(phone, f"Wa {n}")], messages)
        elif kind == "wa-group":
            group = f"1203630{n:08d}@g.us"
            members = [(f"5529{n:06d}{m:02d}", f"Wm{m} {n}") for m in range(3)]
            s = Session(label, kind, WA, group, session_key(WA, "group", group), members, messages)
        elif kind == "tg-dm":
            chat = str(810_000_000 + n)
            s = Session(label, kind, TG, chat, session_key(TG, "dm", chat), [(chat, f"Tg{n}")], messages)
        elif kind == "tg-group":
            chat = str(-(5_000_000_000 + n))
            members = [(str(820_000_000 + 3 * n + m), f"Tm{m}x{n}") for m in range(3)]
            s = Session(label, kind, TG, chat, session_key(TG, "group", chat), members, messages,
                        tg_chat_type="supergroup" if n % 2 else "group")
        elif kind == "dc-dm":
            channel = str(1295000000000000000 + n)
            s = Session(label, kind, DC, channel, session_key(DC, "dm", channel),
                        [(str(406000000000000000 + n), f"Dc{n}")], messages)
        else:  # dc-guild
            channel = str(1296000000000000000 + n)
            members = [(str(407000000000000000 + 3 * n + m), f"Dm{m}x{n}") for m in range(3)]
            s = Session(label, kind, DC, channel, session_key(DC, "group", channel), members, messages)
        sessions.append(s)
    for n in range(poison_sessions):
        phone = f"5539{n:08d}"
        poison = frozenset(range(1, messages, poison_every))
        # (the label must not contain the word itself: it is part of every message text)
        sessions.append(Session(f"pz-dm-{n:04d}", "pz-dm", POISON, phone, session_key(POISON, "dm", phone),
                                [(phone, f"Po {n}")], messages, poison))
    for n in range(slow_sessions):
        phone = f"5549{n:08d}"
        sessions.append(Session(f"sl-dm-{n:04d}", "sl-dm", POISON, phone, session_key(POISON, "dm", phone),
                                [(phone, f"Sl {n}")], messages, slow=True))
    return sessions


# --------------------------------------------------------------------------------------------------------------------
# Posting


_local = threading.local()


def _http() -> requests.Session:
    s = getattr(_local, "session", None)
    if s is None:
        s = _local.session = requests.Session()
    return s


def post_once(url: str, body: bytes, headers: dict[str, str]) -> str:
    """One POST; the answer as a short string: the status code, "conn" or "timeout"."""
    try:
        r = _http().post(url, data=body, headers=headers, timeout=HTTP_TIMEOUT)
    except requests.Timeout:
        return "timeout"
    except requests.RequestException:
        _http().close()  # start again with fresh connections
        _local.session = None
        return "conn"
    return str(r.status_code)


def retryable(answer: str) -> bool:
    """What the platforms retry: no answer at all, 429 and 5xx."""
    return answer in ("conn", "timeout", "429") or answer.startswith("5")


def backoff(attempt: int) -> float:
    return min(0.25 * 2 ** (attempt - 1), 2.0) * (0.75 + random.random() / 2)


def post_until_accepted(url: str, body: bytes, headers: dict[str, str], give_up_s: float = 60.0) -> str:
    """POST until a non-retryable answer or `give_up_s`; returns the last answer ("200" when accepted)."""
    deadline = time.monotonic() + give_up_s
    attempt = 0
    while True:
        attempt += 1
        answer = post_once(url, body, headers)
        if not retryable(answer) or time.monotonic() > deadline:
            return answer
        time.sleep(backoff(attempt))


class Traffic:
    """Drives `sessions` against the ingress URLs from a pool of threads; see the module doc.

    rate: first attempts per second across all sessions (None: as fast as the threads go), so a fault can be
    injected while traffic still flows. duplicate: every message is POSTed twice at the same moment, to two
    ingress processes (urls[0] and urls[1]) — a platform retrying after a timeout while the first copy is still
    being handled.
    """

    def __init__(self, sessions: list[Session], urls: list[str], discord_key: Ed25519PrivateKey, *,
                 rate: float | None = None, threads: int = 24, duplicate: bool = False, give_up_s: float = 60.0):
        self.sessions = sessions
        self.urls = urls
        self.discord_key = discord_key
        self.rate = rate
        self.threads = min(threads, len(sessions))
        self.duplicate = duplicate
        self.give_up_s = give_up_s
        self.sent: list[Sent] = []
        self.by_session: dict[str, list[Sent]] = {s.label: [] for s in sessions}
        self.answers: collections.Counter[str] = collections.Counter()
        self.started_at = 0.0
        self.finished_at: float | None = None
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._ready: collections.deque[Session] = collections.deque(sessions)
        self._next = {s.label: 0 for s in sessions}
        self._slot = 0.0
        self._threads: list[threading.Thread] = []
        self._copies = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="dup") if duplicate else None
        self.done = threading.Event()

    @property
    def total(self) -> int:
        return sum(s.count for s in self.sessions)

    # -- running -------------------------------------------------------------------------------------------------------

    def start(self) -> Traffic:
        self.started_at = time.time()
        self._slot = time.monotonic()
        for n in range(self.threads):
            t = threading.Thread(target=self._run, name=f"traffic-{n}", daemon=True)
            t.start()
            self._threads.append(t)
        threading.Thread(target=self._watch, name="traffic-watch", daemon=True).start()
        return self

    def _watch(self) -> None:
        for t in self._threads:
            t.join()
        self.finished_at = time.time()
        if self._copies is not None:
            self._copies.shutdown(wait=False)
        self.done.set()

    def join(self, timeout: float) -> bool:
        return self.done.wait(timeout)

    def _take(self) -> tuple[Session, int] | None:
        with self._lock:
            if not self._ready:
                return None
            session = self._ready.popleft()
            i = self._next[session.label]
            self._next[session.label] = i + 1
            return session, i

    def _give_back(self, session: Session) -> None:
        with self._lock:
            if self._next[session.label] < session.count:
                self._ready.append(session)

    def _pace(self) -> None:
        if not self.rate:
            return
        with self._lock:
            slot = self._slot = max(self._slot + 1 / self.rate, time.monotonic())
        delay = slot - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _run(self) -> None:
        try:
            while (item := self._take()) is not None:
                session, i = item
                self._pace()
                self._send(session, i)
                self._give_back(session)
        except Exception as exc:  # a driver bug must not look like a lost message
            self.errors.append(f"{exc.__class__.__name__}: {exc}")
            raise

    def _send(self, session: Session, i: int) -> None:
        path, body, headers, msg_id = session.request(i, self.discord_key)
        sent = Sent(session, i, session.text(i), msg_id, first_at=time.time())
        with self._lock:
            self.sent.append(sent)
            self.by_session[session.label].append(sent)
        deadline = time.monotonic() + self.give_up_s
        while True:
            sent.attempts += 1
            answers = self._post(path, body, headers)
            with self._lock:
                sent.answers.extend(answers)
                self.answers.update(answers)
            if "200" in answers:
                sent.accepted_at = time.time()
                return
            if not all(retryable(a) for a in answers) or time.monotonic() > deadline:
                return  # refused (4xx) or given up: the platform drops it
            time.sleep(backoff(sent.attempts))

    def _post(self, path: str, body: bytes, headers: dict[str, str]) -> list[str]:
        if not self.duplicate:
            return [post_once(self.urls[0] + path, body, headers)]
        barrier = threading.Barrier(2, timeout=30)

        def copy(url: str) -> str:
            barrier.wait()
            return post_once(url + path, body, headers)
        other = self._copies.submit(copy, self.urls[1 % len(self.urls)])
        return [copy(self.urls[0]), other.result()]

    # -- views ---------------------------------------------------------------------------------------------------------

    def accepted(self) -> list[Sent]:
        with self._lock:
            return [s for s in self.sent if s.accepted]

    def accepted_count(self) -> int:
        with self._lock:
            return sum(1 for s in self.sent if s.accepted)

    def wait_accepted(self, count: int, timeout: float) -> None:
        """Until `count` messages were accepted (the moment to inject a fault into flowing traffic)."""
        deadline = time.monotonic() + timeout
        while self.accepted_count() < count:
            if self.done.is_set() or time.monotonic() > deadline:
                raise AssertionError(f"only {self.accepted_count()} of {count} messages accepted "
                                     f"within {timeout}s (answers so far: {dict(self.answers)})")
            time.sleep(0.05)

    def summary(self) -> str:
        took = (self.finished_at or time.time()) - self.started_at
        return (f"{len(self.sessions)} sessions, {len(self.sent)} messages posted in {took:.1f}s, "
                f"{self.accepted_count()} accepted; answers {dict(self.answers)}")


def texts(sent: Iterable[Sent]) -> set[str]:
    return {s.text for s in sent}
