"""What the bench measures besides the load generator's report: where the machine's CPU went during a scenario
(`CpuMeter`, by process, PostgreSQL's backends and the bench process included) and those cores per message or per
request; readings sampled for their peak while a load runs (`Peaks`); the machine itself (`machine_info`) and what
a commit costs on it (`commit_probe`). Figures taken while something else loads the machine are not comparable,
so every scenario records them."""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cli.bench.harness import Bench

LOADGEN = "loadgen+standin (bench process)"  # the bench process's share in `cpu`: load generator and stand-in


class CpuMeter:
    def __init__(self, bench: Bench):
        self.bench = bench

    def _pg_pids(self) -> list[int]:
        import psycopg

        try:
            with psycopg.connect(self.bench.stack.pg_admin, autocommit=True, connect_timeout=3) as conn:
                return [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                                   (self.bench.stack.db_name,)).fetchall()]
        except psycopg.Error:
            return []

    def snapshot(self) -> dict[str, Any]:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(x) for x in fields]
        idle = values[3] + values[4]
        tick = os.sysconf("SC_CLK_TCK")
        stack = self.bench.stack
        procs = {p.name: p.cpu_seconds() for p in stack.procs}
        if stack._redis_proc is not None:
            procs["redis"] = stack._redis_proc.cpu_seconds()
        pg = 0.0
        for pid in self._pg_pids():
            try:
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                pg += (int(f[11]) + int(f[12])) / tick
            except (OSError, IndexError, ValueError):
                pass
        t = os.times()
        return {"at": time.monotonic(), "total": sum(values) / tick, "idle": idle / tick, "procs": procs,
                "pg": pg, "self": t.user + t.system}

    def delta(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        wall = max(1e-6, b["at"] - a["at"])
        busy = ((b["total"] - a["total"]) - (b["idle"] - a["idle"])) / wall
        procs = {k: max(0.0, (b["procs"][k] - a["procs"].get(k, 0.0))) / wall for k in b["procs"]}
        pg = max(0.0, b["pg"] - a["pg"]) / wall  # backends that lived through the scenario
        loadgen = (b["self"] - a["self"]) / wall
        ours = sum(procs.values()) + pg + loadgen
        return {"wall_s": round(wall, 1), "machine_busy_cores": round(busy, 2),
                "cores": {k: round(v, 2) for k, v in sorted(procs.items())} | {
                    "postgres": round(pg, 2), LOADGEN: round(loadgen, 2)},
                "other_processes_cores": round(max(0.0, busy - ours), 2)}


class Peaks:
    """`with Peaks({"rss_mb": proc.rss_mb, ...}, interval) as peaks:` reads each callable on entry, every `interval`
    seconds in a thread, and on exit; `peaks.peak[name]` is the highest reading (a reading that raises or returns
    None is skipped; a name never read is missing)."""

    def __init__(self, readings: dict[str, Callable[[], float | None]], interval: float = 0.25):
        self.readings = readings
        self.interval = interval
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-peaks", daemon=True)

    def sample(self) -> None:
        for name, read in self.readings.items():
            try:
                value = read()
            except Exception:  # noqa: BLE001 - a process gone or a connection lost: that reading is missing
                value = None
            if value is not None:
                self.peak[name] = max(self.peak.get(name, value), value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Peaks:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def cpu_per_msg(cpu: dict[str, Any], messages: int) -> dict[str, float]:
    """CPU milliseconds per message, by process: steadier than msgs/s when other processes share the machine."""
    if not messages:
        return {}
    per = {k: round(v * cpu["wall_s"] / messages * 1000, 2) for k, v in cpu["cores"].items() if v}
    per["total (ours)"] = round(sum(per.values()), 2)
    return per


def cpu_by_role(per: dict[str, float]) -> dict[str, float]:
    """cpu_per_msg's figures by role: the pools together, and `all` = every process of ours (beat and the load
    generator included). A process that used no CPU is missing from `per`: 0 here."""
    if not per:
        return {}
    return {"all": per.get("total (ours)", 0.0), "ingress": per.get("ingress", 0.0),
            "pools": round(sum(v for k, v in per.items() if k.startswith("pool-")), 2),
            "postgres": per.get("postgres", 0.0), "redis": per.get("redis", 0.0), "loadgen": per.get(LOADGEN, 0.0)}


def cpu_per_request(cpu: dict[str, Any], requests: int) -> dict[str, Any]:
    """An ingress scenario's CPU per request: the ingress processes' (gunicorn), and every process's."""
    per = cpu_per_msg(cpu, requests)
    return {"cpu_ms_per_request": per.get("ingress", 0.0) if per else None, "cpu_ms_per_request_by_process": per}


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = None
    try:
        mem = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem, "kernel": platform.release(),
                            "python": platform.python_version(), "loadavg_start": list(os.getloadavg()),
                            "started_at": datetime.now(UTC).isoformat(timespec="seconds")}
    for name, argv in (("postgresql", ["psql", "--version"]), ("redis", ["redis-server", "--version"])):
        try:
            info[name] = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info[name] = None
    info["packages"] = package_versions()
    return info


# The libraries a message's CPU goes through: runs are comparable only with the same versions.
BENCH_PACKAGES = ("celery", "kombu", "redis", "psycopg", "sqlalchemy", "gunicorn", "gevent", "greenlet", "flask",
                  "requests", "urllib3", "structlog")


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in BENCH_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def commit_probe(pg_url: str, n: int = 200) -> float | None:
    """Milliseconds per tiny committed transaction on this machine: the WAL flush a turn pays at every commit."""
    import psycopg

    try:
        with psycopg.connect(pg_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute("CREATE TABLE bench_commit_probe (x int)")
            t0 = time.perf_counter()
            for _ in range(n):
                conn.execute("INSERT INTO bench_commit_probe VALUES (1)")
            elapsed = time.perf_counter() - t0
            conn.execute("DROP TABLE bench_commit_probe")
        return round(elapsed / n * 1000, 3)
    except psycopg.Error:
        return None
