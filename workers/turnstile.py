"""In-process turn-taking per session: wakes a waiting turn as soon as a turn of its session finishes here.

Only an accelerator: the store (last_seq, lease) is what decides; this avoids polling it in a tight loop.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

MAX_KEYS = 100_000  # remembered sessions; older ones fall back to the store's last_seq


class Turnstile:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._finished: OrderedDict[str, int] = OrderedDict()  # session key -> turns finished here

    def done(self, session_key: str) -> None:
        """A turn of this session finished (committed, skipped or failed): wake its waiters."""
        with self._cond:
            self._finished[session_key] = self._finished.get(session_key, 0) + 1
            self._finished.move_to_end(session_key)
            while len(self._finished) > MAX_KEYS:
                self._finished.popitem(last=False)
            self._cond.notify_all()

    def pause(self, session_key: str, timeout: float) -> None:
        """Wait until another turn of this session finishes here, or `timeout` passes."""
        with self._cond:
            seen = self._finished.get(session_key, 0)
            self._cond.wait_for(lambda: self._finished.get(session_key, 0) != seen, timeout)
