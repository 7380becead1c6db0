"""A workload: N sessions x M messages in one load shape (closed loop or open loop), and the scheduling that decides
which session sends next."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from cli.loadgen.chats import Msg, Session

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

