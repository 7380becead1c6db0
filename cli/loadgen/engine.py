"""The load generator: sends the workloads' webhooks to the ingress over keep-alive connections, in either load
shape, and matches each reply the stand-in records to the message it answers (by the tag in its text)."""

from __future__ import annotations

import gc
import itertools
import queue
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cli.loadgen.chats import KINDS, Msg, Session, _session, build_request, build_status_request
from cli.loadgen.report import _pct, workload_report
from cli.loadgen.targets import Target
from cli.loadgen.workload import Workload

if TYPE_CHECKING:  # the heavy imports wait until a load runs: `chatsessions <anything>` builds the parser
    from cli.standins.platforms import Sent, StandInPlatforms

TAG = re.compile(r"lg-(\d{6})-(\d+)-(\d+)")
FILLERS = (
    "hi, my name is {name}",
    "my order {order} has not arrived",
    "where is my order?",
    "what is my name?",
    "thanks, that helps",
    "can I change the delivery address for order {order}?",
)


# --------------------------------------------------------------------------------------------------------------------
# The stand-in tap: every reply the stand-in records comes to us as it arrives


class _Tap(list):
    """Replaces StandInPlatforms.sent: the stand-in appends under its lock; we hand each record to the collector.
    New records are not kept (a long run would hold every reply's headers and body)."""

    def __init__(self, callback: Callable[[Sent], None], initial: Iterable[Sent] = ()):
        super().__init__(initial)
        self.callback = callback

    def append(self, item: Sent) -> None:  # type: ignore[override]
        self.callback(item)


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

    def connect(self) -> None:
        """Open the connection now (an open loop's senders, before its clock starts); a failure is left to `post`."""
        try:
            self.conn = self.http.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.conn.connect()
        except OSError:
            self.close()

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

        # The senders' connections are open before the clock starts, as a platform's are in steady state: otherwise
        # the first requests' latencies would hold the load generator's own start (threads, connects).
        connected = threading.Barrier(max(1, wl.senders) + 1)

        def sender() -> None:
            client = _Client(self.url)
            try:
                client.connect()
            finally:
                connected.wait()
            try:
                while (item := work.get()) is not None:
                    self._send(wl, client, *item)
            finally:
                client.close()

        def dispatcher() -> None:
            connected.wait()
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
        # The load generator's own pauses must not count as the server's latency: a full collection of this
        # process's heap (the bench's earlier results, the stand-in, every module) took 80 ms mid-run, 1 % of a
        # 1,000/s run's requests. What exists now is left out of collections until the run is over.
        gc.freeze()
        try:
            return self._run(workloads, deadline_s)
        finally:
            gc.unfreeze()

    def _run(self, workloads: tuple[Workload, ...], deadline_s: float | None) -> list[dict[str, Any]]:
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
        """The workload's report (report.workload_report), counting the replies no workload of ours matched."""
        return workload_report(wl, self.unmatched)
