"""A restartable stack for ONE fault at a time: real processes, private Redis, fresh PostgreSQL database.

`FaultStack` starts, from scratch for each fault, with cli/stack.py (the helper the bench and the integration tests
start theirs with):
  * a private `redis-server` on a free port in the fault's tmp dir, with persistence (AOF, appendfsync always)
    or without (no RDB, no AOF); it is the broker (unless RabbitMQ is chosen) and always the ingress ledger;
  * optionally a dedicated RabbitMQ vhost (`rabbitmqctl add_vhost`), deleted afterwards, as the broker;
  * a fresh PostgreSQL database (`chatsessions_fault_<hex>`), migrated (shared.migrate.upgrade, what
    `chatsessions db upgrade` runs), dropped afterwards;
  * a StandInPlatforms in this process (every channel's api_base points at it; it records every reply);
  * a TOML config with echo channels on WhatsApp, Telegram and Discord (interactions, Ed25519 key generated per
    run) plus a WhatsApp channel bound to tests.faults.agents:PoisonEcho, outbound rate limits raised;
  * `chatsessions ingress` (gunicorn; one or more, each on its own port), `chatsessions worker` pools and
    `chatsessions beat`, each logging to <tmp>/<name>.log (<name>.<n>.log for its n-th start).

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
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg.rows import dict_row

from cli.processes import Proc, StackError, free_port
from cli.stack import Stack
from cli.standins.platforms import StandInPlatforms
from shared.partitioning import partition_of

REPO = Path(__file__).resolve().parents[2]
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


def session_key(channel_id: str, kind: str, chat_id: str) -> str:
    """Mirror of shared.channels.base.session_key."""
    return f"{channel_id}:{kind}:{chat_id}"


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
        self.standin: StandInPlatforms | None = None
        self.discord_key = Ed25519PrivateKey.generate()
        self.vhost: str | None = None
        python_path = os.environ.get("PYTHONPATH")
        env = dict(
            SECRETS,
            FAULT_DC_PUBLIC_KEY=self.discord_key.public_key().public_bytes_raw().hex(),
            LEASE_SECONDS=str(LEASE_SECONDS),
            VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT),
            SWEEP_SECONDS="1",
            LOG_FORMAT="json",
            LOG_TASK_LINES="true",  # (b) counts the turns in flight at the pause from Celery's task lines
            PYTHONPATH=str(REPO) + (os.pathsep + python_path if python_path else ""),  # tests.faults.agents
        )
        env.update(self.options.extra_env)
        # The processes: the URLs, PARTITIONS and the config join the environment at start.
        self.processes = Stack(work, env=env, pg_admin=PG_ADMIN, db_name=f"chatsessions_fault_{uuid.uuid4().hex[:10]}",
                               redis_port=free_port(), redis_persistence=self.options.persistence,
                               partitions=PARTITIONS, migrate_in_process=True, worker_cli=True)
        self.redis_port = self.processes.redis_port
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self._redis_client: redis.Redis | None = None
        self._gen = itertools.count(1)

    @property
    def ingress_urls(self) -> list[str]:
        return self.processes.ingress_urls

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> FaultStack:
        self.work.mkdir(parents=True, exist_ok=True)
        if self.options.broker == "amqp":
            self._add_vhost()
        self.standin = StandInPlatforms().start()
        self.processes.config_text = config_toml(self.standin)
        self.processes.setup()  # the database, the private Redis, the config, the environment, the migration
        for i in range(self.options.ingresses):
            self.start_ingress(f"ingress-{i + 1}" if self.options.ingresses > 1 else "ingress")
        for pool, partitions in self.options.pools.items():
            self.start_worker(pool, partitions, wait=False)
        if self.options.beat:
            self.processes.start_beat()
        for proc in list(self.processes.procs):
            if proc.name.startswith("ingress"):
                self.wait_ingress_ready(proc.name)
        for pool in self.options.pools:
            self.wait_worker_ready(pool)
        self.warm_up()
        return self

    def close(self) -> dict[str, float | None]:
        """End everything this stack started; returns how long each process took to exit on SIGTERM."""
        took = self.processes.end(timeout=20)  # all at once: they drain in parallel
        errors = []
        for step in (self._stop_standin, self.db_allow, self.processes.teardown, self._delete_vhost,
                     self._close_redis_client):
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

    def _delete_vhost(self) -> None:
        if self.vhost:
            subprocess.run(["rabbitmqctl", "delete_vhost", self.vhost], capture_output=True, timeout=60, check=False)
            self.vhost = None

    def note(self, what: str) -> None:
        self.processes.note(what)

    # -- processes ---------------------------------------------------------------------------------------------------

    def start_ingress(self, name: str = "ingress", port: int | None = None) -> Proc:
        return self.processes.start_ingress(workers=2, threads=8, port=port, name=name)

    def start_worker(self, name: str, partitions: str, concurrency: int | None = None, wait: bool = True) -> Proc:
        proc = self.processes.start_pool(name, partitions, concurrency or self.options.concurrency,
                                         pool=self.options.pool, node=f"{name}-{RUN}@%h")
        if wait:
            self.wait_worker_ready(name)
        return proc

    def wait_ingress_ready(self, name: str = "ingress", timeout: float = START_TIMEOUT) -> None:
        self.processes.wait_ingress_ready(name, timeout)

    def wait_worker_ready(self, name: str, timeout: float = START_TIMEOUT) -> None:
        """Until celery logs that the worker is ready (consuming its queues)."""
        self.processes.wait_pool_ready(name, timeout)

    def warm_up(self, timeout: float = START_TIMEOUT) -> None:
        """A real round trip into the partitions of every pool (a WhatsApp echo DM landing in one of them; where
        pools share partitions, either may answer)."""
        from .traffic import post_until_accepted, whatsapp_request

        chats: list[tuple[str, str]] = []
        for proc in self.processes.pools():
            wanted = parse_partitions(proc.partitions)
            used = {phone for phone, _ in chats}
            phone = next(p for p in (f"5500{n:08d}" for n in itertools.count())
                         if partition_of(session_key(WA, "dm", p), PARTITIONS) in wanted and p not in used)
            body, headers = whatsapp_request(WA_PHONE_ID, SECRETS["FAULT_WA_APP_SECRET"], phone, "warm-up",
                                             f"wamid.warmup{RUN}{next(self._gen)}")
            status = post_until_accepted(f"{self.ingress_urls[0]}/webhooks/{WA}", body, headers, give_up_s=30)
            if status != "200":
                raise StackError(f"warm-up message for {proc.name} answered {status}")
            chats.append((phone, proc.name))
        for phone, pool in chats:
            self.processes.wait_until(lambda phone=phone: self.standin.replies_to(WA, phone), timeout,
                                      f"the warm-up reply through {pool}", interval=0.1)

    def proc(self, name: str) -> Proc:
        return self.processes.proc(name)

    def kill(self, name: str) -> None:
        """SIGKILL (no chance to clean up), and wait until it is gone."""
        self.processes.kill(name)

    def pause(self, name: str) -> None:
        self.processes.pause(name)

    def resume(self, name: str) -> None:
        self.processes.resume(name)

    def terminate(self, name: str, timeout: float = 60.0) -> float | None:
        """SIGTERM and wait for the exit; returns the seconds it took (None: had to be killed after `timeout`)."""
        return self.processes.terminate(name, timeout)

    def restart_worker(self, name: str, partitions: str | None = None) -> Proc:
        return self.start_worker(name, partitions or self.proc(name).partitions)

    def swap_pools(self, old: str, new: dict[str, str], timeout: float = 60.0) -> float | None:
        """The documented rebalance: stop a pool (SIGTERM, it drains), then start the pools of the new split."""
        took = self.processes.terminate(old, timeout, retire=True)
        for name, partitions in new.items():
            self.start_worker(name, partitions, wait=False)
        for name in new:
            self.wait_worker_ready(name)
        return took

    def unexpected_exits(self) -> list[str]:
        return self.processes.unexpected_exits()

    # -- Redis ---------------------------------------------------------------------------------------------------------

    def start_redis(self) -> None:
        self.processes.start_redis()

    def stop_redis(self, shutdown: bool = True) -> None:
        """SHUTDOWN (what a service manager's stop does; AOF is fsynced) or, if that fails, SIGTERM."""
        self.processes.stop_redis(shutdown)
        self._close_redis_client()

    def _close_redis_client(self) -> None:
        if self._redis_client is not None:
            self._redis_client.close()
            self._redis_client = None

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
        self.processes.broker_url = f"{AMQP_BASE}/{self.vhost}"
        self.note(f"RabbitMQ vhost {self.vhost}")

    # -- PostgreSQL ----------------------------------------------------------------------------------------------------

    def db_block(self) -> None:
        """The database 'goes down': no new connections, every open one is terminated."""
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{self.processes.db_name}" WITH ALLOW_CONNECTIONS false')
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND pid <> pg_backend_pid()", (self.processes.db_name,))
        self.note("database down")

    def db_allow(self) -> None:
        if not self.processes.db_created:
            return
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{self.processes.db_name}" WITH ALLOW_CONNECTIONS true')
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
                             "WHERE datname = %s AND pid <> pg_backend_pid()", (self.processes.db_name,))
        self.db_allow()
        return down_at, time.time()

    def query(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        with psycopg.connect(self.processes.pg_url, row_factory=dict_row) as conn:
            return conn.execute(sql, params).fetchall()

    # -- CLI and diagnostics -----------------------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.processes.cli(*args, timeout=timeout)

    def _all_procs(self) -> list[Proc]:
        """Every generation of every process but Redis."""
        return [p for p in [*self.processes.retired, *self.processes.procs] if p.name != "redis"]

    def logs(self, name: str) -> str:
        """Everything a process of this name logged, across restarts."""
        return "\n".join(p.log() for p in self._all_procs() if p.name == name)

    def grep(self, needle: str, workers_only: bool = True) -> list[str]:
        """Lines containing `needle` in any worker's log (all generations), or in every process's log."""
        out = []
        for p in self._all_procs():
            if p.name.startswith("pool") or not workers_only:
                out += [f"{p.name}: {line}" for line in p.log().splitlines() if needle in line]
        return out

    def tails(self, lines: int = 40) -> str:
        events = self.processes.events  # (time, what the harness did)
        t0 = events[0][0] if events else 0
        return (self.processes.tails(lines) + "\n===== harness events =====\n"
                + "\n".join(f"+{t - t0:7.2f}s {w}" for t, w in events))


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
