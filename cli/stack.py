"""A process stack on this machine: a fresh PostgreSQL database, a Redis database, gunicorn ingress, celery worker
pools and beat, each a real OS process started exactly as production starts it (`chatsessions ingress|worker|beat`).

Used by `chatsessions bench` and tests/test_loadgen.py; written so the integration tests can move onto it later.
No pytest here: failures raise StackError with the tail of every process log.

    with Stack(workdir, env={...secrets...}, config_text=toml) as stack:
        stack.start_ingress()
        stack.start_pool("a", "0-7", concurrency=16)
        stack.start_pool("b", "8-15", concurrency=16)
        stack.wait_ready()
        ...  # POST webhooks to stack.url
    # every process stopped (SIGTERM, then SIGKILL), database dropped, Redis database flushed

Only processes this object started are ever signalled, by pid.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Self

import psycopg
import redis
from shared import redis_keys

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("BENCH_PG_ADMIN") or os.environ.get("IT_PG_ADMIN") or "postgresql://postgres@127.0.0.1:5432/postgres"
START_TIMEOUT = 90.0  # a 2-core machine importing celery/sqlalchemy in several processes at once
NOISE = re.compile(r"Sending due task|chat\.(mark_dormant|sweep_\w+)\[")


class StackError(RuntimeError):
    """A process did not start, exited, or a service is unreachable; the message carries the log tails."""


def venv_bin() -> Path:
    """The directory of the running interpreter's console scripts (the project's .venv/bin under make)."""
    return Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen
    log_path: Path
    log_file: IO[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 40) -> str:
        text = [line for line in self.log().splitlines() if not NOISE.search(line)]
        return "\n".join(text[-lines:])

    def rss_mb(self) -> float:
        """Resident set size of the process (and its children, e.g. gunicorn's workers), in MiB."""
        total = 0
        for pid in [self.pid, *_children(self.pid)]:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def cpu_seconds(self) -> float:
        """User + system CPU seconds used so far by the process and its live children."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in [self.pid, *_children(self.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                pass
        return total


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def worker_argv(partitions: str, concurrency: int, name: str, app: str | None = None,
                extra: tuple[str, ...] = (), maintenance: bool = True, pool: str | None = None) -> list[str]:
    """The exact command `chatsessions worker --partitions P --concurrency C --name N [--pool X]` execs (the same
    function builds it), optionally with another Celery app (`-A`) and extra flags.

    Reads the settings of *this* process: call it with the stack's environment applied (Stack.applied_env)."""
    from cli.main import worker_command
    from shared.config import load_settings

    argv = worker_command(load_settings(), partitions, pool=pool, concurrency=concurrency, name=name,
                          maintenance=maintenance)
    exe = shutil.which(argv[0], path=str(venv_bin())) or argv[0]
    argv[0] = exe
    if app:
        argv[argv.index("-A") + 1] = app
    return argv + list(extra)


@dataclass(repr=False)
class Stack:
    """Processes and services of one run. `env` is merged over os.environ for every process."""

    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    config_text: str | None = None  # written to workdir/channels.toml and named by CHATSESSIONS_CONFIG
    pg_admin: str = PG_ADMIN
    redis_url: str | None = None  # None: start a private redis-server (falls back to db 12 of 127.0.0.1:6379)
    partitions: int = 16
    keep: bool = False  # keep the database (and the private Redis data) after stop, for inspection
    db_name: str = field(default_factory=lambda: f"chatsessions_bench_{uuid.uuid4().hex[:10]}")
    procs: list[Proc] = field(default_factory=list)
    url: str = ""  # the ingress, set by start_ingress
    _redis_proc: Proc | None = None
    _db_created: bool = False

    def __repr__(self) -> str:
        return f"Stack(ingress={self.url}, database={self.db_name}, redis={self.redis_url}, logs={self.workdir})"

    # -- services ------------------------------------------------------------------------------------------------

    @property
    def pg_url(self) -> str:
        """psycopg URL of this run's database."""
        return f"{self.pg_admin.rsplit('/', 1)[0]}/{self.db_name}"

    @property
    def database_url(self) -> str:
        """SQLAlchemy URL of this run's database."""
        return self.pg_url.replace("postgresql://", "postgresql+psycopg://", 1)

    def setup(self) -> Stack:
        """Create the database, connect (or start) Redis, write the config, migrate. Idempotent per object."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            with psycopg.connect(self.pg_admin, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'CREATE DATABASE "{self.db_name}"')
        except psycopg.OperationalError as exc:
            raise StackError(f"PostgreSQL at {self.pg_admin} is not reachable (start it: make setup): {exc}") from None
        self._db_created = True
        self._start_redis()
        if self.config_text is not None:
            config = self.workdir / "channels.toml"
            config.write_text(self.config_text)
            self.env["CHATSESSIONS_CONFIG"] = str(config)
        self.env.update(DATABASE_URL=self.database_url, BROKER_URL=self.redis_url, REDIS_URL=self.redis_url,
                        PARTITIONS=str(self.partitions), PYTHONUNBUFFERED="1")
        self.env.setdefault("LOG_FORMAT", "json")
        self.env.setdefault("SECRET_KEY", secrets.token_urlsafe(32))
        done = self.cli("db", "upgrade", timeout=120)
        if done.returncode != 0:
            raise StackError(f"`chatsessions db upgrade` failed (rc={done.returncode}):\n{done.stdout}\n{done.stderr}")
        return self

    def _start_redis(self) -> None:
        if self.redis_url:
            client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=5)
            try:
                client.ping()
                client.flushdb()
            except redis.RedisError as exc:
                raise StackError(f"Redis at {self.redis_url} is not reachable: {exc}") from None
            finally:
                client.close()
            return
        server = shutil.which("redis-server")
        if server is None:
            self.redis_url = "redis://127.0.0.1:6379/12"
            return self._start_redis()
        port = free_port()
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True)
        self._redis_proc = self._spawn("redis", [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                                 "--appendonly", "no", "--dir", str(data)], env=os.environ.copy())
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1)
        try:
            self.wait_until(lambda: _pings(client), 20, "the private redis-server")
        finally:
            client.close()

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=30)

    def full_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("LEASE_SECONDS", "VISIBILITY_TIMEOUT", "WORKER_CONCURRENCY", "LOG_LEVEL", "BIND")}
        env.update(self.env)
        env["PATH"] = f"{venv_bin()}{os.pathsep}{os.environ.get('PATH', '')}"
        return env

    def applied_env(self) -> _AppliedEnv:
        """`with stack.applied_env():` this process sees the stack's environment (and fresh settings) inside."""
        return _AppliedEnv(self.full_env())

    # -- processes -----------------------------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv_bin() / "chatsessions"), *args], env=self.full_env(), cwd=REPO,
                              check=False, capture_output=True, text=True, timeout=timeout)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.workdir / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in stop(), after the process exits
        # libpq names the process's connections after it: pg_stat_activity.application_name tells whose they are
        env = {**(env if env is not None else self.full_env()), "PGAPPNAME": name}
        popen = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log_file,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return Proc(name, argv, popen, log_path, log_file)

    def start(self, name: str, argv: list[str]) -> Proc:
        """Start a process (argv[0] "chatsessions" means this venv's console script) and track it."""
        if argv[0] == "chatsessions":
            argv = [str(venv_bin() / "chatsessions"), *argv[1:]]
        proc = self._spawn(name, argv)
        self.procs.append(proc)
        return proc

    def start_ingress(self, workers: int = 2, threads: int = 8, port: int | None = None) -> Proc:
        port = port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        return self.start("ingress", ["chatsessions", "ingress", "--bind", f"127.0.0.1:{port}", "--workers",
                                      str(workers), "--threads", str(threads)])

    def start_pool(self, name: str, partitions: str, concurrency: int = 16, app: str | None = None,
                   extra: tuple[str, ...] = (), maintenance: bool = True, pool: str | None = None) -> Proc:
        """A worker pool: the command `chatsessions worker` execs, run directly (same flags), so extra Celery flags
        (e.g. --prefetch-multiplier) and a bench-only app (`app="cli.bench_ceiling"`) can be given; `pool` is
        the execution model (threads | gevent; default WORKER_POOL)."""
        with self.applied_env():
            argv = worker_argv(partitions, concurrency, f"{name}@%h", app=app, extra=extra, maintenance=maintenance,
                               pool=pool)
        return self.start(name, argv)

    def start_beat(self) -> Proc:
        return self.start("beat", ["chatsessions", "beat", "--schedule", str(self.workdir / "beat-schedule")])

    def stop(self, procs: list[Proc] | None = None, timeout: float = 25.0) -> list[str]:
        """SIGTERM the given (default: all) tracked processes, wait, SIGKILL the ones still running; returns those."""
        procs = list(self.procs if procs is None else procs)
        for p in procs:
            if p.alive():
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        killed = []
        for p in procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed.append(p.name)
                p.popen.kill()
                p.popen.wait(timeout=10)
            p.log_file.close()
            if p in self.procs:
                self.procs.remove(p)
        return killed

    def proc(self, name: str) -> Proc:
        for p in self.procs:
            if p.name == name:
                return p
        raise KeyError(name)

    def pools(self) -> list[Proc]:
        return [p for p in self.procs if p.name.startswith("pool")]

    def teardown(self) -> None:
        self.stop()
        if self._redis_proc is not None:
            self.stop([self._redis_proc])
            self._redis_proc = None
        elif self.redis_url and not self.keep:
            try:
                client = self.redis()
                client.flushdb()
                client.close()
            except redis.RedisError:
                pass
        if self._db_created and not self.keep:
            from shared.db import engine_for

            engine_for(self.database_url).dispose()  # if this process used the store on it
            with psycopg.connect(self.pg_admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            self._db_created = False

    def __enter__(self) -> Self:
        try:
            return self.setup()
        except BaseException:
            self.teardown()
            raise

    def __exit__(self, *exc) -> None:
        self.teardown()

    # -- waiting and diagnostics ---------------------------------------------------------------------------------

    def tails(self, lines: int = 40) -> str:
        parts = []
        for p in self.procs:
            state = "running" if p.alive() else f"EXITED rc={p.popen.returncode}"
            parts.append(f"===== {p.name} ({state}) {p.log_path} - last {lines} lines =====\n{p.tail(lines)}")
        return "\n".join(parts)

    def assert_alive(self) -> None:
        dead = [p.name for p in self.procs if not p.alive()]
        if dead:
            raise StackError(f"processes exited unexpectedly: {dead}\n{self.tails()}")

    def wait_until(self, predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise StackError(f"timed out after {timeout}s waiting for {what}\n{self.tails()}")
            time.sleep(interval)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """The ingress answers /readyz (broker and ledger reachable)."""
        import requests

        def ready():
            self.assert_alive()
            try:
                return requests.get(self.url + "/readyz", timeout=2).status_code == 200
            except requests.RequestException:
                return False
        self.wait_until(ready, timeout, "the ingress /readyz", interval=0.2)

    def wait_log(self, proc: Proc, pattern: str, timeout: float = START_TIMEOUT) -> None:
        """Until the process's log matches `pattern` (e.g. celery's "ready." line)."""
        rx = re.compile(pattern)

        def seen():
            self.assert_alive()
            return rx.search(proc.log())
        self.wait_until(seen, timeout, f"{proc.name} to log {pattern!r}", interval=0.2)

    def wait_pools_ready(self, timeout: float = START_TIMEOUT) -> None:
        for p in self.pools():
            self.wait_log(p, r"ready\.", timeout)

    def queue_depth(self, prefix: str = "sessions.") -> int:
        """Messages waiting in the partition queues plus delivered-but-unacked ones (kombu's `unacked` hash)."""
        client = self.redis()
        try:
            pipe = client.pipeline()
            for p in range(self.partitions):
                pipe.llen(f"{prefix}{p}")
            pipe.hlen(redis_keys.UNACKED)
            return sum(pipe.execute())
        finally:
            client.close()

    def purge_queues(self, prefix: str = "sessions.") -> None:
        client = self.redis()
        try:
            client.delete(*[f"{prefix}{p}" for p in range(self.partitions)], redis_keys.UNACKED, redis_keys.UNACKED_INDEX)
        finally:
            client.close()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class _AppliedEnv:
    def __init__(self, env: dict[str, str]):
        self.env = env
        self.saved: dict[str, str] | None = None

    def __enter__(self) -> None:
        from shared.config import get_settings

        self.saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.env)
        get_settings.cache_clear()

    def __exit__(self, *exc) -> None:
        from shared.config import get_settings

        os.environ.clear()
        os.environ.update(self.saved or {})
        get_settings.cache_clear()
