"""A restartable stack for ONE fault at a time: real processes, private Redis, fresh PostgreSQL database.

`FaultStack` starts, from scratch for each fault:
  * a private `redis-server` on a free port in the fault's tmp dir, with persistence (AOF, appendfsync always)
    or without (no RDB, no AOF); it is the broker (unless RabbitMQ is chosen) and always the ingress ledger;
  * optionally a dedicated RabbitMQ vhost (`rabbitmqctl add_vhost`), deleted afterwards, as the broker;
  * a fresh PostgreSQL database (`chatsessions_fault_<hex>`), migrated (shared.migrate.upgrade, what
    `chatsessions db upgrade` runs), dropped afterwards;
  * a StandInPlatforms in this process (every channel's api_base points at it; it records every reply);
  * a TOML config with echo channels on WhatsApp, Telegram and Discord (interactions, Ed25519 key generated per
    run) plus a WhatsApp channel bound to tests.faults.agents:PoisonEcho, outbound rate limits raised;
  * `chatsessions ingress` (gunicorn; one or more, each on its own port), `chatsessions worker` pools and
    `chatsessions beat`, each logging to <tmp>/<name>.log.

Fault injection: signal/stop/kill/pause/resume any process, add or remove pools, restart Redis on the same port
(SHUTDOWN, then start again with the same files), and take the database away.

The database outage is a stand-in for a PostgreSQL restart that leaves the machine's cluster alone:
`ALTER DATABASE <db> WITH ALLOW_CONNECTIONS false` plus `pg_terminate_backend` of every backend of that database
(all open connections die, like a server restart; new ones are refused with a FATAL error, like a server that is
not up yet), then `ALLOW_CONNECTIONS true` after N seconds.

Every process is started in its own process group and ended by its pid (SIGTERM, then SIGKILL of its group).
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
import redis
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg.rows import dict_row

from cli.standins.platforms import StandInPlatforms
from shared.partitioning import partition_of

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
PG_ADMIN = os.environ.get("FAULT_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_BASE = os.environ.get("FAULT_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")
PARTITIONS = 16
LEASE_SECONDS = 4.0
VISIBILITY_TIMEOUT = 8.0
KOMBU_RESTORE_INTERVAL = 10.0  # kombu's Redis transport: seconds between restore_visible sweeps (its default)
START_TIMEOUT = 120.0  # 2-core CI: several Python processes importing celery/sqlalchemy at once
RUN = uuid.uuid4().hex[:6]

# Channels; the channel id is also the stand-in prefix, so a recorded reply says which channel sent it.
WA, TG, DC, POISON = "f-wa", "f-tg", "f-dc", "f-poison"
WA_PHONE_ID, POISON_PHONE_ID = "200000000000001", "200000000000002"
TG_BOT = "FaultEchoBot"
DC_APPLICATION = "1270000000000000009"
POISON_AGENT = "tests.faults.agents:PoisonEcho"
RATE_LIMITS = "rate_limits = { account_per_s = 1000, account_burst = 1000, chat_per_s = 1000, chat_burst = 1000 }"

SECRETS = {
    "SECRET_KEY": "test-secret-key-0123456789abcdefghijklmnop",
    "FAULT_WA_APP_SECRET": "fault-wa-app-secret", "FAULT_WA_VERIFY_TOKEN": "fault-wa-verify",
    "FAULT_WA_ACCESS_TOKEN": "fault-wa-access",
    "FAULT_PO_APP_SECRET": "fault-poison-app-secret", "FAULT_PO_VERIFY_TOKEN": "fault-poison-verify",
    "FAULT_PO_ACCESS_TOKEN": "fault-poison-access",
    "FAULT_TG_BOT_TOKEN": "333333:fault-tg-bot-token", "FAULT_TG_SECRET": "fault-tg-secret-token",
    "FAULT_DC_BOT_TOKEN": "fault-dc-bot-token",
}
# Environment variables of the caller that would change the stack's behaviour.
SCRUBBED = ("LEASE_SECONDS", "VISIBILITY_TIMEOUT", "WORKER_CONCURRENCY", "LOG_LEVEL", "BIND", "BROKER_URL",
            "REDIS_URL", "DATABASE_URL", "CHATSESSIONS_CONFIG", "PARTITIONS", "SWEEP_SECONDS")

_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def free_port() -> int:
    """A TCP port nobody listens on now (and that this process did not hand out before)."""
    with _ports_lock:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _ports_given:
                _ports_given.add(port)
                return port


def session_key(channel_id: str, kind: str, chat_id: str) -> str:
    """Mirror of shared.channels.base.session_key."""
    return f"{channel_id}:{kind}:{chat_id}"


class StackError(AssertionError):
    """The stack could not do what a fault needed (a process did not start, a wait timed out)."""


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------------------------------
# Processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    log_file: IO[bytes]
    started_at: float = field(default_factory=time.time)
    stopped: bool = False  # ended on purpose (by the harness), so not "exited unexpectedly"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 40) -> str:
        noise = ("Sending due task", "chat.mark_dormant", "chat.sweep", "chat.purge_expired")
        text = [line for line in self.log().splitlines() if not any(n in line for n in noise)]
        return "\n".join(text[-lines:])

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> bool:
        try:
            self.popen.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def end(self, timeout: float = 25.0) -> float | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL its process group; returns seconds to exit (None if killed)."""
        self.stopped = True
        started = time.monotonic()
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGCONT)  # a paused process cannot handle SIGTERM
            except ProcessLookupError:
                pass
            self.signal(signal.SIGTERM)
        took: float | None = None
        if self.wait(timeout):
            took = time.monotonic() - started
        self._kill_group()
        self.popen.wait(timeout=10)
        if not self.log_file.closed:
            self.log_file.close()
        return took

    def _kill_group(self) -> None:
        """Whatever is left of the process group we created for it (e.g. gunicorn's workers)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# --------------------------------------------------------------------------------------------------------------------
# The stack


@dataclass
class StackOptions:
    persistence: bool = True  # Redis AOF with appendfsync always; False: no RDB, no AOF
    broker: str = "redis"  # "redis" or "amqp" (a dedicated RabbitMQ vhost)
    ingresses: int = 1  # gunicorn ingress processes, each on its own port
    pools: dict[str, str] = field(default_factory=lambda: {"pool-a": "0-7", "pool-b": "8-15"})
    concurrency: int = 8
    pool: str = "threads"  # the workers' execution model (WORKER_POOL): threads | gevent
    beat: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)


class FaultStack:
    def __init__(self, work: Path, name: str, options: StackOptions | None = None):
        self.work = work
        self.name = name
        self.options = options or StackOptions()
        self.procs: dict[str, Proc] = {}
        self.retired: list[Proc] = []  # processes replaced by a restart, kept for their logs
        self.ingress_urls: list[str] = []
        self.standin: StandInPlatforms | None = None
        self.discord_key = Ed25519PrivateKey.generate()
        self.db_name = f"chatsessions_fault_{uuid.uuid4().hex[:10]}"
        self.pg_url = f"{PG_ADMIN.rsplit('/', 1)[0]}/{self.db_name}"
        self.database_url = self.pg_url.replace("postgresql://", "postgresql+psycopg://", 1)
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.redis_proc: Proc | None = None
        self.vhost: str | None = None
        self.broker_url = self.redis_url
        self.env: dict[str, str] = {}
        self.events: list[tuple[float, str]] = []  # (time, what the harness did), for reports
        self._db_created = False
        self._redis_client: redis.Redis | None = None
        self._gen = itertools.count(1)

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> FaultStack:
        self.work.mkdir(parents=True, exist_ok=True)
        self.start_redis()
        if self.options.broker == "amqp":
            self._add_vhost()
        self._create_database()
        self.standin = StandInPlatforms().start()
        public_key = self.discord_key.public_key().public_bytes_raw().hex()
        config = self.work / "channels.toml"
        config.write_text(config_toml(self.standin))
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        env.update(SECRETS)
        env.update(
            FAULT_DC_PUBLIC_KEY=public_key,
            CHATSESSIONS_CONFIG=str(config),
            DATABASE_URL=self.database_url,
            BROKER_URL=self.broker_url,
            REDIS_URL=self.redis_url,
            PARTITIONS=str(PARTITIONS),
            LEASE_SECONDS=str(LEASE_SECONDS),
            VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT),
            SWEEP_SECONDS="1",
            LOG_FORMAT="json",
            LOG_TASK_LINES="true",  # (b) counts the turns in flight at the pause from Celery's task lines
            PYTHONUNBUFFERED="1",
            PYTHONPATH=str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        env.update(self.options.extra_env)
        self.env = env
        from shared.migrate import upgrade  # what `chatsessions db upgrade` runs, without another interpreter

        upgrade(self.database_url)
        for i in range(self.options.ingresses):
            self.start_ingress(f"ingress-{i + 1}" if self.options.ingresses > 1 else "ingress")
        for pool, partitions in self.options.pools.items():
            self.start_worker(pool, partitions, wait=False)
        if self.options.beat:
            self.start_beat()
        for name in list(self.procs):
            if name.startswith("ingress"):
                self.wait_ingress_ready(name)
        for pool in self.options.pools:
            self.wait_worker_ready(pool)
        self.warm_up()
        return self

    def close(self) -> dict[str, float | None]:
        """End everything this stack started; returns how long each process took to exit on SIGTERM."""
        started = time.monotonic()
        for proc in self.procs.values():  # all at once: they drain in parallel
            proc.stopped = True
            if proc.alive():
                proc.signal(signal.SIGCONT)
                proc.signal(signal.SIGTERM)
        took = {}
        for name, proc in list(self.procs.items()):
            exited = proc.wait(max(0.1, 20 - (time.monotonic() - started)))
            took[name] = (time.monotonic() - started) if exited else None
            proc.end(timeout=0.1)
        for proc in self.retired:
            if proc.alive():
                proc.end(timeout=5)
        errors = []
        for step in (self._stop_standin, self._drop_database, self._delete_vhost,
                     lambda: self.stop_redis(shutdown=False)):
            try:  # every step runs, whatever failed before it
                step()
            except Exception as exc:
                errors.append(f"{exc.__class__.__name__}: {exc}")
        if errors:
            raise StackError(f"cleaning up {self.name}: {errors}")
        return took

    def _stop_standin(self) -> None:
        if self.standin is not None:
            self.standin.stop()
            self.standin = None

    def _drop_database(self) -> None:
        if not self._db_created:
            return
        self.db_allow()  # in case a test failed during an outage
        from shared.db import engine_for

        engine_for(self.database_url).dispose()  # if this process used the store
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        self._db_created = False

    def _delete_vhost(self) -> None:
        if self.vhost:
            subprocess.run(["rabbitmqctl", "delete_vhost", self.vhost], capture_output=True, timeout=60, check=False)
            self.vhost = None

    def note(self, what: str) -> None:
        self.events.append((time.time(), what))

    # -- processes ---------------------------------------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        if name in self.procs:
            old = self.procs.pop(name)
            if old.alive():
                raise StackError(f"{name} is still running (pid {old.pid})")
            self.retired.append(old)
        n = next(self._gen)
        log_path = self.work / f"{name}.{n}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed when the process is ended
        popen = subprocess.Popen(argv, env=env or self.env, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        proc = Proc(name, popen, log_path, log_file)
        self.procs[name] = proc
        self.note(f"start {name} pid {popen.pid}")
        return proc

    def start_ingress(self, name: str = "ingress", port: int | None = None) -> Proc:
        port = port or free_port()
        proc = self.spawn(name, [str(VENV_BIN / "chatsessions"), "ingress", "--bind", f"127.0.0.1:{port}",
                                 "--workers", "2", "--threads", "8"])
        url = f"http://127.0.0.1:{port}"
        proc.url = url  # type: ignore[attr-defined]
        self.ingress_urls = [p.url for n, p in self.procs.items() if n.startswith("ingress")]  # type: ignore
        return proc

    def start_worker(self, name: str, partitions: str, concurrency: int | None = None, wait: bool = True) -> Proc:
        proc = self.spawn(name, [str(VENV_BIN / "chatsessions"), "worker", "--partitions", partitions,
                                 "--pool", self.options.pool, "--concurrency", str(concurrency or self.options.concurrency),
                                 "--name", f"{name}-{RUN}@%h"])
        proc.partitions = partitions  # type: ignore[attr-defined]
        if wait:
            self.wait_worker_ready(name)
        return proc

    def start_beat(self) -> Proc:
        return self.spawn("beat", [str(VENV_BIN / "chatsessions"), "beat", "--schedule",
                                   str(self.work / f"beat-schedule-{next(self._gen)}")])

    def wait_ingress_ready(self, name: str = "ingress", timeout: float = START_TIMEOUT) -> None:
        proc = self.procs[name]

        def ready():
            self._assert_running(proc)
            try:
                return requests.get(proc.url + "/readyz", timeout=2).status_code == 200  # type: ignore[attr-defined]
            except requests.RequestException:
                return False
        wait_until(ready, timeout, f"{name} /readyz", interval=0.2)

    def wait_worker_ready(self, name: str, timeout: float = START_TIMEOUT) -> None:
        """Until celery logs that the worker is ready (consuming its queues)."""
        proc = self.procs[name]

        def ready():
            self._assert_running(proc)
            return " ready." in proc.log()
        wait_until(ready, timeout, f"worker {name} to be ready", interval=0.2)

    def _assert_running(self, proc: Proc) -> None:
        if not proc.alive():
            raise StackError(f"{proc.name} exited (rc={proc.popen.returncode}) while starting:\n{proc.tail(30)}")

    def warm_up(self, timeout: float = START_TIMEOUT) -> None:
        """A real round trip into the partitions of every pool (a WhatsApp echo DM landing in one of them; where
        pools share partitions, either may answer)."""
        from .traffic import post_until_accepted, whatsapp_request

        chats: list[tuple[str, str]] = []
        for pool, proc in self.procs.items():
            if not pool.startswith("pool"):
                continue
            wanted = parse_partitions(proc.partitions)  # type: ignore[attr-defined]
            used = {phone for phone, _ in chats}
            phone = next(p for p in (f"5500{n:08d}" for n in itertools.count())
                         if partition_of(session_key(WA, "dm", p), PARTITIONS) in wanted and p not in used)
            body, headers = whatsapp_request(WA_PHONE_ID, SECRETS["FAULT_WA_APP_SECRET"], phone, "warm-up",
                                             f"wamid.warmup{RUN}{next(self._gen)}")
            status = post_until_accepted(f"{self.ingress_urls[0]}/webhooks/{WA}", body, headers, give_up_s=30)
            if status != "200":
                raise StackError(f"warm-up message for {pool} answered {status}")
            chats.append((phone, pool))
        for phone, pool in chats:
            wait_until(lambda phone=phone: self.standin.replies_to(WA, phone), timeout,
                       f"the warm-up reply through {pool}", interval=0.1)

    def proc(self, name: str) -> Proc:
        return self.procs[name]

    def kill(self, name: str) -> None:
        """SIGKILL (no chance to clean up), and wait until it is gone."""
        proc = self.procs[name]
        proc.stopped = True
        proc.signal(signal.SIGKILL)
        proc.wait(10)
        proc._kill_group()
        self.note(f"SIGKILL {name}")

    def pause(self, name: str) -> None:
        self.procs[name].signal(signal.SIGSTOP)
        self.note(f"SIGSTOP {name}")

    def resume(self, name: str) -> None:
        self.procs[name].signal(signal.SIGCONT)
        self.note(f"SIGCONT {name}")

    def terminate(self, name: str, timeout: float = 60.0) -> float | None:
        """SIGTERM and wait for the exit; returns the seconds it took (None: had to be killed after `timeout`)."""
        self.note(f"SIGTERM {name}")
        took = self.procs[name].end(timeout=timeout)
        self.note(f"{name} exited after {took}")
        return took

    def restart_worker(self, name: str, partitions: str | None = None) -> Proc:
        old = self.procs[name]
        return self.start_worker(name, partitions or old.partitions)  # type: ignore[attr-defined]

    def swap_pools(self, old: str, new: dict[str, str], timeout: float = 60.0) -> float | None:
        """The documented rebalance: stop a pool (SIGTERM, it drains), then start the pools of the new split."""
        took = self.terminate(old, timeout)
        self.retired.append(self.procs.pop(old))
        for name, partitions in new.items():
            self.start_worker(name, partitions, wait=False)
        for name in new:
            self.wait_worker_ready(name)
        return took

    def unexpected_exits(self) -> list[str]:
        return [f"{p.name} (rc={p.popen.returncode})" for p in self.procs.values() if not p.alive() and not p.stopped]

    # -- Redis ---------------------------------------------------------------------------------------------------------

    def start_redis(self) -> None:
        persistence = (["--appendonly", "yes", "--appendfsync", "always", "--save", ""] if self.options.persistence
                       else ["--appendonly", "no", "--save", ""])
        name = "redis"
        argv = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(self.work),
                "--daemonize", "no", "--protected-mode", "no", *persistence]
        if name in self.procs:
            self.retired.append(self.procs.pop(name))
        n = next(self._gen)
        log_path = self.work / f"redis.{n}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115
        popen = subprocess.Popen(argv, cwd=self.work, stdout=log_file, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        self.redis_proc = Proc("redis", popen, log_path, log_file)
        self.note(f"start redis pid {popen.pid} persistence={self.options.persistence}")

        def up():
            if not self.redis_proc.alive():
                raise StackError(f"redis-server exited: {self.redis_proc.tail(20)}")
            try:
                return self.redis().ping()
            except redis.RedisError:
                return False
        wait_until(up, 30, f"redis-server on port {self.redis_port}")

    def stop_redis(self, shutdown: bool = True) -> None:
        """SHUTDOWN (what a service manager's stop does; AOF is fsynced) or, if that fails, SIGTERM."""
        proc = self.redis_proc
        if proc is None:
            return
        if shutdown and proc.alive():
            try:
                self.redis().shutdown(nosave=not self.options.persistence)
            except redis.ConnectionError:
                pass  # the connection closes as the server goes away
            except redis.RedisError:
                pass
        proc.end(timeout=15)
        if self._redis_client is not None:
            self._redis_client.close()
            self._redis_client = None
        self.note("redis stopped")

    def restart_redis(self, down_s: float) -> tuple[float, float]:
        """Stop Redis, keep it down `down_s` seconds, start it on the same port; returns (down at, up at)."""
        self.stop_redis()
        down_at = time.time()
        time.sleep(down_s)
        self.start_redis()
        return down_at, time.time()

    def redis(self) -> redis.Redis:
        """A client of the stack's Redis (it reconnects by itself after a restart)."""
        if self._redis_client is None:
            self._redis_client = redis.Redis(port=self.redis_port, socket_timeout=5, socket_connect_timeout=2)
        return self._redis_client

    # -- RabbitMQ ------------------------------------------------------------------------------------------------------

    def _add_vhost(self) -> None:
        self.vhost = f"chatsessions-faults-{uuid.uuid4().hex[:8]}"
        for argv in (["rabbitmqctl", "add_vhost", self.vhost],
                     ["rabbitmqctl", "set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*"]):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
            if done.returncode != 0:
                raise StackError(f"{' '.join(argv)} failed: {done.stdout}{done.stderr}")
        self.broker_url = f"{AMQP_BASE}/{self.vhost}"
        self.note(f"RabbitMQ vhost {self.vhost}")

    # -- PostgreSQL ----------------------------------------------------------------------------------------------------

    def _create_database(self) -> None:
        try:
            with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'CREATE DATABASE "{self.db_name}"')
        except psycopg.OperationalError as exc:
            raise StackError(f"the fault suite needs PostgreSQL at {PG_ADMIN}: {exc}") from None
        self._db_created = True

    def db_block(self) -> None:
        """The database 'goes down': no new connections, every open one is terminated."""
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{self.db_name}" WITH ALLOW_CONNECTIONS false')
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND pid <> pg_backend_pid()", (self.db_name,))
        self.note("database down")

    def db_allow(self) -> None:
        if not self._db_created:
            return
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{self.db_name}" WITH ALLOW_CONNECTIONS true')
        self.note("database up")

    def db_outage(self, seconds: float) -> tuple[float, float]:
        """The DB-restart stand-in (see the module doc); returns (down at, up at)."""
        self.db_block()
        down_at = time.time()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:  # a restarting server accepts nobody: keep killing what slips in
            time.sleep(0.2)
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = %s AND pid <> pg_backend_pid()", (self.db_name,))
        self.db_allow()
        return down_at, time.time()

    def query(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        with psycopg.connect(self.pg_url, row_factory=dict_row) as conn:
            return conn.execute(sql, params).fetchall()

    # -- CLI and diagnostics -----------------------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "chatsessions"), *args], env=self.env, cwd=REPO, check=False,
                              capture_output=True, text=True, timeout=timeout)

    def logs(self, name: str) -> str:
        """Everything a process of this name logged, across restarts."""
        return "\n".join(p.log() for p in [*self.retired, *self.procs.values()] if p.name == name)

    def grep(self, needle: str, workers_only: bool = True) -> list[str]:
        """Lines containing `needle` in any worker's log (all generations), or in every process's log."""
        out = []
        for p in [*self.retired, *self.procs.values()]:
            if p.name.startswith("pool") or not workers_only:
                out += [f"{p.name}: {line}" for line in p.log().splitlines() if needle in line]
        return out

    def tails(self, lines: int = 40) -> str:
        parts = []
        procs = [*self.retired, *self.procs.values()] + ([self.redis_proc] if self.redis_proc else [])
        for p in procs:
            state = "running" if p.alive() else f"exited rc={p.popen.returncode}"
            parts.append(f"===== {p.name} pid {p.pid} ({state}) {p.log_path} — last {lines} lines =====\n"
                         f"{p.tail(lines)}")
        t0 = self.events[0][0] if self.events else 0
        parts.append("===== harness events =====\n" + "\n".join(f"+{t - t0:7.2f}s {w}" for t, w in self.events))
        return "\n".join(parts)


def parse_partitions(spec: str) -> set[int]:
    from shared.partitioning import parse_partitions as parse

    return set(parse(spec, PARTITIONS))


ANSWER_ALL = 'session = { group_reply = "always" }'  # every group message of the traffic expects its reply


def config_toml(standin: StandInPlatforms) -> str:
    """Echo channels on the three platforms and a WhatsApp channel with the poison Agent; pacing out of the way."""
    out = ["partitions = 16", f"lease_seconds = {LEASE_SECONDS}", ""]
    for cid, phone_id, agent, p in ((WA, WA_PHONE_ID, "echo", "FAULT_WA"), (POISON, POISON_PHONE_ID, POISON_AGENT,
                                                                            "FAULT_PO")):
        out += ["[[channels]]", f'id = "{cid}"', 'platform = "whatsapp"', f'agent = "{agent}"',
                f'api_base = "{standin.base(cid)}"',
                (f'secrets = {{ app_secret = "{p}_APP_SECRET", verify_token = "{p}_VERIFY_TOKEN", '
                 f'access_token = "{p}_ACCESS_TOKEN" }}'),
                f'options = {{ phone_number_id = "{phone_id}", api_version = "v21.0", {RATE_LIMITS} }}', ANSWER_ALL, ""]
    out += ["[[channels]]", f'id = "{TG}"', 'platform = "telegram"', 'agent = "echo"',
            f'api_base = "{standin.base(TG)}"',
            'secrets = { bot_token = "FAULT_TG_BOT_TOKEN", secret_token = "FAULT_TG_SECRET" }',
            f'options = {{ bot_username = "{TG_BOT}", {RATE_LIMITS} }}', ANSWER_ALL, ""]
    out += ["[[channels]]", f'id = "{DC}"', 'platform = "discord"', 'agent = "echo"',
            f'api_base = "{standin.base(DC)}"',
            'secrets = { bot_token = "FAULT_DC_BOT_TOKEN", public_key = "FAULT_DC_PUBLIC_KEY" }',
            f'options = {{ application_id = "{DC_APPLICATION}", {RATE_LIMITS} }}', ANSWER_ALL, ""]
    return "\n".join(out)
