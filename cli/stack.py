"""A process stack on this machine: a PostgreSQL database, Redis, gunicorn ingress, celery worker pools and beat, each
a real OS process started exactly as production starts it (`chatsessions ingress|worker|beat`). The one start-up
helper of `chatsessions bench`, tests/test_loadgen.py, the integration and browser tests (tests/integration/conftest.py)
and the fault suite (tests/faults/harness.py), with options for where they differ.
No pytest here: failures raise StackError with the tail of every process log.

    with Stack(workdir, env={...secrets...}, config_text=toml) as stack:
        stack.start_ingress()
        stack.start_pool("a", "0-7", concurrency=16)
        stack.start_pool("b", "8-15", concurrency=16)
        stack.wait_ready()
        ...  # POST webhooks to stack.url
    # every process stopped (SIGTERM, then SIGKILL), database dropped, Redis database flushed

The options:
  * the database: created (`db_name` under `pg_admin`) and dropped, or an existing one (`database`) used as it is;
  * Redis: a given `redis_url` (pinged, flushed at setup and teardown) or a private `redis-server` on a free (or
    given, `redis_port`) port, with persistence or without (`redis_persistence`), that can be stopped and started
    again on the same port; the broker is that Redis unless `broker_url` names another (a RabbitMQ vhost);
  * the environment: this process's, less SCRUBBED, plus `env`, plus what setup derives (URLs, PARTITIONS, config);
  * the migration: `chatsessions db upgrade` or, `migrate_in_process`, shared.migrate.upgrade in this process;
  * the pools: the argv `chatsessions worker` execs (cli.main.worker_command) run directly, which takes another
    Celery app and extra flags, or (`worker_cli`) `chatsessions worker ...` itself; `pool` picks threads | gevent;
  * readiness: the ingress's /readyz and celery's "ready." line, watching every process or only the awaited one;
  * ending processes: stop (SIGTERM, SIGKILL after a timeout, untracked), terminate (the same, kept tracked for its
    exit code), kill (SIGKILL), pause/resume (SIGSTOP/SIGCONT); `events` records what was done to them, when.

Every process runs in its own session (process group) and logs to workdir/<name>.log (workdir/<name>.<n>.log for its
n-th start, so a restarted process has a log of its own). Only processes this object started are ever signalled,
by pid (and their process group).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, Self

import redis

from cli.processes import (
    Proc,
    StackError,
    create_database,
    drop_database,
    free_port,
    sqlalchemy_url,
    venv_bin,
)
from shared import redis_keys

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("BENCH_PG_ADMIN") or os.environ.get("IT_PG_ADMIN") or "postgresql://postgres@127.0.0.1:5432/postgres"
START_TIMEOUT = 90.0  # a 2-core machine importing celery/sqlalchemy in several processes at once
# Environment variables of the caller that would change the stack's behaviour (setup sets the URLs, PARTITIONS, ...).
SCRUBBED = ("LEASE_SECONDS", "VISIBILITY_TIMEOUT", "WORKER_CONCURRENCY", "LOG_LEVEL", "BIND")


def worker_argv(partitions: str, concurrency: int, name: str, app: str | None = None,
                extra: tuple[str, ...] = (), maintenance: bool = True, pool: str | None = None,
                env: Mapping[str, str] | None = None) -> list[str]:
    """The exact command `chatsessions worker --partitions P --concurrency C --name N [--pool X]` execs (the same
    function builds it), optionally with another Celery app (`-A`) and extra flags.

    Reads the settings of `env` (default: this process's environment; e.g. Stack.full_env())."""
    from cli.main import worker_command
    from shared.config import load_settings

    argv = worker_command(load_settings(env), partitions, pool=pool, concurrency=concurrency, name=name,
                          maintenance=maintenance)
    exe = shutil.which(argv[0], path=str(venv_bin())) or argv[0]
    argv[0] = exe
    if app:
        argv[argv.index("-A") + 1] = app
    return argv + list(extra)


@dataclass(repr=False)
class Stack:
    """Processes and services of one run. `env` is merged over os.environ (less SCRUBBED) for every process."""

    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    config_text: str | None = None  # written to workdir/channels.toml and named by CHATSESSIONS_CONFIG
    pg_admin: str = PG_ADMIN
    redis_url: str | None = None  # None: start a private redis-server (falls back to db 12 of 127.0.0.1:6379)
    partitions: int = 16
    keep: bool = False  # keep the database (and the private Redis data) after stop, for inspection
    db_name: str = field(default_factory=lambda: f"chatsessions_bench_{uuid.uuid4().hex[:10]}")
    database: str | None = None  # psycopg URL of an existing database: migrated, neither created nor dropped
    broker_url: str | None = None  # default: the Redis (e.g. amqp://.../<vhost>)
    redis_port: int | None = None  # the private redis-server's port (default: a free one); the same after a restart
    redis_persistence: bool = False  # the private redis-server: AOF with appendfsync always; False: no RDB, no AOF
    migrate_in_process: bool = False  # shared.migrate.upgrade here, not `chatsessions db upgrade` in another process
    worker_cli: bool = False  # pools started as `chatsessions worker ...` (no app/extra) rather than its argv
    procs: list[Proc] = field(default_factory=list)  # the tracked processes, one per name
    retired: list[Proc] = field(default_factory=list)  # stopped, or replaced by a restart: kept for their logs
    events: list[tuple[float, str]] = field(default_factory=list)  # (time, what was done), for reports
    url: str = ""  # the ingress, set by start_ingress
    redis_proc: Proc | None = None  # the private redis-server
    db_created: bool = False
    on_failure: Callable[[str], NoReturn] | None = None  # e.g. pytest.fail; default: raise StackError with the tails
    _starts: dict[str, int] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Stack(ingress={self.url}, database={self.db_name}, redis={self.redis_url}, logs={self.workdir})"

    # -- services ------------------------------------------------------------------------------------------------

    @property
    def pg_url(self) -> str:
        """psycopg URL of this run's database."""
        return self.database or f"{self.pg_admin.rsplit('/', 1)[0]}/{self.db_name}"

    @property
    def database_url(self) -> str:
        """SQLAlchemy URL of this run's database."""
        return sqlalchemy_url(self.pg_url)

    @property
    def _redis_proc(self) -> Proc | None:  # the name cli/bench.py reads
        return self.redis_proc

    def setup(self) -> Stack:
        """Create the database, connect (or start) Redis, write the config, migrate. Idempotent per object."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.database is None and not self.db_created:
            create_database(self.pg_admin, self.db_name)
            self.db_created = True
        if self.redis_proc is None:
            self.start_redis()
        if self.config_text is not None:
            config = self.workdir / "channels.toml"
            config.write_text(self.config_text)
            self.env["CHATSESSIONS_CONFIG"] = str(config)
        self.env.update(DATABASE_URL=self.database_url, BROKER_URL=self.broker_url or self.redis_url,
                        REDIS_URL=self.redis_url, PARTITIONS=str(self.partitions), PYTHONUNBUFFERED="1")
        self.env.setdefault("LOG_FORMAT", "json")
        self.env.setdefault("SECRET_KEY", secrets.token_urlsafe(32))
        if self.migrate_in_process:
            from shared.migrate import upgrade  # what `chatsessions db upgrade` runs, without another interpreter

            upgrade(self.database_url)
        else:
            done = self.cli("db", "upgrade", timeout=120)
            if done.returncode != 0:
                raise StackError(f"`chatsessions db upgrade` failed (rc={done.returncode}):\n{done.stdout}\n{done.stderr}")
        return self

    def start_redis(self) -> None:
        """Ping and flush the given Redis, or start the private redis-server (again, on the same port)."""
        if self.redis_url and self.redis_port is None:
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
            return self.start_redis()
        if self.redis_port is None:
            self.redis_port = free_port()
        data = self.workdir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        persistence = (["--appendonly", "yes", "--appendfsync", "always", "--save", ""] if self.redis_persistence
                       else ["--appendonly", "no", "--save", ""])
        if self.redis_proc is not None:
            self.retired.append(self.redis_proc)
        self.redis_proc = self._spawn("redis", [server, "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                                "--dir", str(data), "--daemonize", "no", "--protected-mode", "no",
                                                *persistence], env=os.environ.copy())
        self.note(f"start redis pid {self.redis_proc.pid} persistence={self.redis_persistence}")
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1)
        try:
            self._wait_alive([self.redis_proc], lambda: _pings(client), 30, f"redis-server on port {self.redis_port}")
        finally:
            client.close()

    def stop_redis(self, shutdown: bool = True) -> None:
        """The private redis-server: SHUTDOWN (what a service manager's stop does; AOF is fsynced), then SIGTERM."""
        proc = self.redis_proc
        if proc is None:
            return
        if shutdown and proc.alive():
            client = redis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=2)
            try:
                client.shutdown(nosave=not self.redis_persistence)
            except redis.RedisError:
                pass  # the connection closes as the server goes away
            finally:
                client.close()
        self._end([proc], 15)
        self.note("redis stopped")

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=30)

    def full_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
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

    def note(self, what: str) -> None:
        self.events.append((time.time(), what))

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        n = self._starts[name] = self._starts.get(name, 0) + 1
        log_path = self.workdir / (f"{name}.log" if n == 1 else f"{name}.{n}.log")
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed when the process is ended
        # libpq names the process's connections after it: pg_stat_activity.application_name tells whose they are
        env = {**(env if env is not None else self.full_env()), "PGAPPNAME": name}
        popen = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log_file,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return Proc(name, argv, popen, log_path, log_file)

    def start(self, name: str, argv: list[str]) -> Proc:
        """Start a process (argv[0] "chatsessions" means this venv's console script) and track it; a process of
        that name that has exited is retired (its log kept), one still running is an error."""
        for old in [p for p in self.procs if p.name == name]:
            if old.alive():
                raise StackError(f"{name} is still running (pid {old.pid})")
            self.procs.remove(old)
            self.retired.append(old)
        if argv[0] == "chatsessions":
            argv = [str(venv_bin() / "chatsessions"), *argv[1:]]
        proc = self._spawn(name, argv)
        self.procs.append(proc)
        self.note(f"start {name} pid {proc.pid}")
        return proc

    def start_ingress(self, workers: int = 2, threads: int = 8, port: int | None = None,
                      name: str = "ingress") -> Proc:
        port = port or free_port()
        proc = self.start(name, ["chatsessions", "ingress", "--bind", f"127.0.0.1:{port}", "--workers",
                                 str(workers), "--threads", str(threads)])
        proc.url = self.url = f"http://127.0.0.1:{port}"
        return proc

    def start_pool(self, name: str, partitions: str, concurrency: int = 16, app: str | None = None,
                   extra: tuple[str, ...] = (), maintenance: bool = True, pool: str | None = None,
                   node: str | None = None) -> Proc:
        """A worker pool consuming `partitions`: `pool` is the execution model (threads | gevent; default
        WORKER_POOL), `node` the Celery node name (default <name>@%h). Run as the command `chatsessions worker`
        execs (same flags), so extra Celery flags (e.g. --prefetch-multiplier) and a bench-only app
        (`app="cli.bench_ceiling"`) can be given; with worker_cli, as `chatsessions worker ...` itself."""
        node = node or f"{name}@%h"
        if self.worker_cli:
            if app or extra:
                raise StackError("a pool with another app or extra flags is started without worker_cli")
            argv = ["chatsessions", "worker", "--partitions", partitions, *(["--pool", pool] if pool else []),
                    "--concurrency", str(concurrency), "--name", node, *([] if maintenance else ["--no-maintenance"])]
        else:
            argv = worker_argv(partitions, concurrency, node, app=app, extra=extra, maintenance=maintenance,
                               pool=pool, env=self.full_env())
        proc = self.start(name, argv)
        proc.partitions = partitions
        return proc

    def start_beat(self) -> Proc:
        return self.start("beat", ["chatsessions", "beat", "--schedule", str(self.workdir / "beat-schedule")])

    def _end(self, procs: list[Proc], timeout: float) -> dict[str, float | None]:
        """SIGTERM them all at once (after SIGCONT: a paused process cannot handle it), wait up to `timeout` in all,
        then SIGKILL each one's process group; returns name -> seconds to exit (None: it had to be killed)."""
        started = time.monotonic()
        for p in procs:
            p.stopped = True
            if p.alive():
                p.signal(signal.SIGCONT)
                p.signal(signal.SIGTERM)
        took: dict[str, float | None] = {}
        for p in procs:
            exited = p.wait(max(0.1, timeout - (time.monotonic() - started)))
            took[p.name] = (time.monotonic() - started) if exited else None
            p.kill_group()
            p.popen.wait(timeout=10)
            if not p.log_file.closed:
                p.log_file.close()
        return took

    def end(self, procs: list[Proc] | None = None, timeout: float = 25.0) -> dict[str, float | None]:
        """Stop the given (default: all) tracked processes and retire them; name -> seconds to exit (None: killed)."""
        procs = list(self.procs if procs is None else procs)
        took = self._end(procs, timeout)
        for p in procs:
            if p in self.procs:
                self.procs.remove(p)
                self.retired.append(p)
        return took

    def stop(self, procs: list[Proc] | None = None, timeout: float = 25.0) -> list[str]:
        """SIGTERM the given (default: all) tracked processes, wait, SIGKILL the ones still running; returns those."""
        return [name for name, took in self.end(procs, timeout).items() if took is None]

    def terminate(self, name: str, timeout: float = 60.0, retire: bool = False) -> float | None:
        """SIGTERM one process and wait for its exit; the seconds it took (None: killed after `timeout`). It stays
        tracked (its exit code: proc(name).popen.returncode) unless `retire`."""
        self.note(f"SIGTERM {name}")
        proc = self.proc(name)
        took = (self.end if retire else self._end)([proc], timeout)[name]
        self.note(f"{name} exited after {took}")
        return took

    def kill(self, name: str) -> None:
        """SIGKILL (no chance to clean up), and wait until it is gone."""
        proc = self.proc(name)
        proc.stopped = True
        proc.signal(signal.SIGKILL)
        proc.wait(10)
        proc.kill_group()
        self.note(f"SIGKILL {name}")

    def pause(self, name: str) -> None:
        self.proc(name).signal(signal.SIGSTOP)
        self.note(f"SIGSTOP {name}")

    def resume(self, name: str) -> None:
        self.proc(name).signal(signal.SIGCONT)
        self.note(f"SIGCONT {name}")

    def proc(self, name: str) -> Proc:
        for p in self.procs:
            if p.name == name:
                return p
        raise KeyError(name)

    def pools(self) -> list[Proc]:
        return [p for p in self.procs if p.name.startswith("pool")]

    @property
    def ingress_urls(self) -> list[str]:
        return [p.url for p in self.procs if p.url]

    def unexpected_exits(self) -> list[str]:
        return [f"{p.name} (rc={p.popen.returncode})" for p in self.procs if not p.alive() and not p.stopped]

    def teardown(self) -> list[str]:
        """Stop every process (returns those that had to be killed), the private Redis; drop the database and flush
        the given Redis unless `keep`."""
        killed = self.stop()
        self._end([p for p in self.retired if p.alive()], 5)
        if self.redis_proc is not None:
            self.stop_redis(shutdown=False)
            self.redis_proc = None
        elif self.redis_url and not self.keep:
            try:
                client = self.redis()
                client.flushdb()
                client.close()
            except redis.RedisError:
                pass
        if self.db_created and not self.keep:
            drop_database(self.pg_admin, self.db_name)
            self.db_created = False
        return killed

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
        for p in [*self.retired, *self.procs, *([self.redis_proc] if self.redis_proc else [])]:
            state = "running" if p.alive() else f"EXITED rc={p.popen.returncode}"
            parts.append(f"===== {p.name} pid {p.pid} ({state}) {p.log_path} - last {lines} lines =====\n"
                         f"{p.tail(lines)}")
        return "\n".join(parts)

    def fail(self, message: str) -> NoReturn:
        """A process exited or a wait timed out: on_failure(message), else StackError with every log's tail."""
        if self.on_failure is not None:
            self.on_failure(message)
        raise StackError(f"{message}\n{self.tails()}")

    def assert_alive(self) -> None:
        dead = [p.name for p in self.procs if not p.alive() and not p.stopped]
        if dead:
            self.fail(f"processes exited unexpectedly: {dead}")

    def wait_until(self, predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(interval)

    def _wait_alive(self, watched: list[Proc] | None, predicate: Callable[[], object], timeout: float, what: str,
                    interval: float = 0.2) -> object:
        """wait_until, failing at once when a watched process (None: any tracked one) exits."""
        def check():
            if watched is None:
                self.assert_alive()
            for p in watched or ():
                if not p.alive():
                    self.fail(f"{p.name} exited (rc={p.popen.returncode}) while starting:\n{p.tail(30)}")
            return predicate()
        return self.wait_until(check, timeout, what, interval)

    def _wait_readyz(self, url: str, watched: list[Proc] | None, timeout: float, what: str) -> None:
        import requests

        def ready():
            try:
                return requests.get(url + "/readyz", timeout=2).status_code == 200
            except requests.RequestException:
                return False
        self._wait_alive(watched, ready, timeout, what)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """The ingress answers /readyz (broker and ledger reachable); every process must stay up meanwhile."""
        self._wait_readyz(self.url, None, timeout, "the ingress /readyz")

    def wait_ingress_ready(self, name: str = "ingress", timeout: float = START_TIMEOUT) -> None:
        """This ingress answers /readyz; only it is watched (others may be down on purpose)."""
        proc = self.proc(name)
        self._wait_readyz(proc.url, [proc], timeout, f"{name} /readyz")

    def wait_log(self, proc: Proc, pattern: str, timeout: float = START_TIMEOUT) -> None:
        """Until the process's log matches `pattern` (e.g. celery's "ready." line); every process must stay up."""
        rx = re.compile(pattern)
        self._wait_alive(None, lambda: rx.search(proc.log()), timeout, f"{proc.name} to log {pattern!r}")

    def wait_pool_ready(self, name: str, timeout: float = START_TIMEOUT) -> None:
        """Until celery logs that this pool is ready (consuming its queues); only it is watched."""
        proc = self.proc(name)
        self._wait_alive([proc], lambda: " ready." in proc.log(), timeout, f"worker {name} to be ready")

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
