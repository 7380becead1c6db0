"""BENCH_PROFILE=1: py-spy records the worker pools and an ingress worker while a scenario runs, and each
recording (raw collapsed stacks in BENCH_PROFILE_DIR) is summarized into the results: busy samples by category
(Agent, logging, SQLAlchemy + psycopg, Celery, ...), the waits, the top frames."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from cli.bench.knobs import log


class PySpyProfiling:
    """py-spy around a scenario's load (start_profile, finish_profile): methods of Bench (cli/bench/harness.py)."""

    def start_profile(self, label: str, pools: bool = True) -> dict[str, Any] | None:
        import shutil

        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if spy is None:
            log("BENCH_PROFILE=1 but py-spy is not installed (.venv/bin/pip install py-spy); no profile")
            return None
        outdir = Path(self.k.str("BENCH_PROFILE_DIR"))
        outdir.mkdir(parents=True, exist_ok=True)
        targets = {p.name: p.pid for p in self.stack.pools()} if pools else {}
        from cli.processes import _children

        for i, pid in enumerate(_children(self.stack.proc("ingress").pid)[: 1 if pools else None]):
            targets[f"ingress-worker-{i}"] = pid
        seconds = self.k.int("BENCH_PROFILE_SECONDS")
        procs = {}
        for name, pid in targets.items():
            path = outdir / f"{label}-{name}.txt"
            mode = ["--gil"] if self.k.str("BENCH_PROFILE_MODE") == "gil" else []
            procs[name] = (subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "100",
                                             "--nonblocking", *mode, "-f", "raw", "-o", str(path)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), path)
        return procs

    def finish_profile(self, procs: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for name, (popen, path) in procs.items():
            try:
                popen.wait(timeout=120)
            except subprocess.TimeoutExpired:
                popen.kill()
            out[name] = summarize_profile(path) if path.exists() else {"error": "py-spy wrote nothing (ptrace?)"}
        return out


IDLE_LEAVES = ("concurrent/futures/thread.py", "Condition.wait", "Event.wait", "_epoll.poll", "select (",
               "poll (", "sleep (", "Semaphore.acquire", "Queue.get", "accept (", "_poll (")
WAITS = {"psycopg/connection.py": "waiting on PostgreSQL", "redis/_parsers": "waiting on Redis",
         "redis/connection.py": "waiting on Redis", "socket.py": "socket I/O (HTTP)", "ssl.py": "socket I/O (HTTP)"}
CATEGORIES = (  # first match on any frame of the stack, from the leaf up
    ("Agent", ("bench_agents.py", "workers/agents.py")),
    ("structlog/logging", ("structlog/", "logging/__init__.py", "shared/logs.py")),
    ("outbound HTTP (requests)", ("requests/", "urllib3/", "http/client.py", "shared/outbound.py")),
    ("rate limiter", ("shared/ratelimit.py",)),
    ("SQLAlchemy + psycopg", ("sqlalchemy/", "psycopg/")),
    ("Celery/kombu/redis", ("celery/", "kombu/", "redis/", "billiard/", "vine/")),
    ("JSON", ("json/",)),
    ("flask/werkzeug/gunicorn", ("flask/", "werkzeug/", "gunicorn/")),
    ("ingress code", ("ingress/", "shared/channels/")),
    ("turn/store code", ("workers/", "shared/db.py")),
)


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    from collections import Counter

    total = idle = 0
    waits: Counter = Counter()
    cats: Counter = Counter()
    leaves: Counter = Counter()
    app_frames: Counter = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        leaf = frames[-1]
        total += n
        if any(marker in leaf for marker in IDLE_LEAVES):
            idle += n
            continue
        wait = next((label for marker, label in WAITS.items() if marker in leaf), None)
        if wait:
            waits[wait] += n
        leaves[leaf] += n
        for label, markers in CATEGORIES:
            if any(m in f for f in reversed(frames) for m in markers):
                cats[label] += n
                break
        else:
            cats["other"] += n
        for f in set(frames):
            if any(m in f for m in ("workers/", "shared/", "ingress/")):
                app_frames[f] += n
    busy = max(1, total - idle)

    def pct(n: int) -> float:
        return round(100 * n / busy, 1)
    return {
        "samples": total, "idle_samples": idle,
        "busy_by_category_pct": {k: pct(v) for k, v in cats.most_common()},
        "waiting_pct": {k: pct(v) for k, v in waits.most_common()},
        "top_leaf_frames_pct": [(f, pct(n)) for f, n in leaves.most_common(top)],
        "top_app_frames_inclusive_pct": [(f, pct(n)) for f, n in app_frames.most_common(top)],
        "note": "percent of non-idle samples; a thread blocked in a C call (psycopg/redis socket wait) counts as busy",
    }
