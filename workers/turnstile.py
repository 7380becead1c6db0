"""In-process turn-taking per session: a turn waits for the earlier turns of its session running here.

Only the earliest turn of a session in this process asks the store for the lease, so a burst of one
session's messages does not stampede the database. The store (last_seq, lease) still decides; this only
avoids asking it in a loop.
"""

from __future__ import annotations

import threading
from collections import defaultdict


class Turnstile:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inflight: defaultdict[str, list[int]] = defaultdict(list)  # session key -> seqs running here
        self._events: defaultdict[str, int] = defaultdict(int)

    def enter(self, session_key: str, seq: int) -> None:
        with self._cond:
            self._inflight[session_key].append(seq)

    def leave(self, session_key: str, seq: int) -> None:
        with self._cond:
            running = self._inflight[session_key]
            running.remove(seq)
            if not running:
                del self._inflight[session_key]
                self._events.pop(session_key, None)
            else:
                self._events[session_key] += 1
            self._cond.notify_all()

    def nudge(self, session_key: str) -> None:
        """The session's lease was released without finishing a turn: wake its waiters."""
        with self._cond:
            self._events[session_key] += 1
            self._cond.notify_all()

    def wait_earlier(self, session_key: str, seq: int, timeout: float) -> bool:
        """Block until no earlier turn of this session runs here (True), or `timeout` passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: all(s >= seq for s in self._inflight.get(session_key, ())), timeout)

    def pause(self, session_key: str, timeout: float) -> None:
        """Wait until a turn of this session leaves or releases here, or `timeout` passes."""
        with self._cond:
            seen = self._events.get(session_key, 0)
            self._cond.wait_for(lambda: self._events.get(session_key, 0) != seen, timeout)
