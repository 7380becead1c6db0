"""Broker high availability, by configuration, against real services on this machine (docs/scaling.md):

* RabbitMQ quorum queues (BROKER_QUEUE_TYPE=quorum): a real `chatsessions worker` on a dedicated vhost of the
  machine's RabbitMQ (127.0.0.1:5672, guest; `rabbitmqctl add_vhost`, deleted afterwards). The partition and
  maintenance queues must be declared as quorum queues, and messages must go through end to end — one of them with
  a countdown, which Celery sends through RabbitMQ's native delayed delivery (the path a retried turn takes).
* Redis Sentinel (BROKER_URL=sentinel://…;sentinel://…, REDIS_SENTINEL_MASTER): a private master, a replica and a
  `redis-server --sentinel` in the test's tmp dir. The ledger, the rate limiter and a real `chatsessions worker`
  reach Redis only through the sentinels (the URLs name no Redis port), and keep working after a failover.

Nothing is mocked; a missing binary or service FAILS the test (never skips).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

from cli.standins.platforms import StandInPlatforms
from conftest import fresh_database
from test_ratelimit import assert_a_send_waits_for_a_connection
from ingress.ledger import RedisLedger
from ingress.publisher import Publisher
from shared.config import load_settings
from shared.errors import ConfigError
from shared.messages import DM, InboundMessage
from shared.partitioning import partition_of, queue_name
from shared.queueing import HANDLE_INBOUND, MAINTENANCE_QUEUE, make_celery, task_queues
from shared.ratelimit import Bucket, RedisLimiter
from shared.redis_client import parse_sentinel_url, redis_client, with_master

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
AMQP_BASE = os.environ.get("HA_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")
PARTITIONS = 4
MASTER = "chatsessions-ha"
REPLY_TIMEOUT = 120.0  # a worker starting on a busy 2-core machine

CONFIG = f"""
partitions = {PARTITIONS}
lease_seconds = 30

[[channels]]
id = "tg"
platform = "telegram"
agent = "echo"
api_base = "{{api_base}}"
secrets = {{{{ bot_token = "HA_TG_TOKEN", secret_token = "HA_TG_SECRET" }}}}
options = {{{{ bot_username = "HaBot", rate_limits = {{{{ account_per_s = 1000, account_burst = 1000, chat_per_s = 1000, chat_burst = 1000 }}}} }}}}
"""
SECRETS = {"HA_TG_TOKEN": "111:ha-token", "HA_TG_SECRET": "ha-secret", "SECRET_KEY": "test-secret-key-0123456789abcdefghijklmnop"}


# -- Helpers ---------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        pytest.fail(f"{argv[0]} is not installed: this test needs it (make setup)")
    if done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed: {done.stdout}{done.stderr}")
    return done


class Processes:
    """Processes this test started, each in its own process group, ended by pid."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.tmp,
                                    start_new_session=True)
        except FileNotFoundError:
            pytest.fail(f"{argv[0]} is not installed: this test needs it (make setup)")
        finally:
            log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.stop_all()


@pytest.fixture(scope="module")
def ha_database():
    """A database of this module's own (the workers here store turns; the shared unit-test database stays clean)."""
    with fresh_database("chatsessions_ha") as url:
        yield url


@pytest.fixture
def standin():
    s = StandInPlatforms().start()
    yield s
    s.stop()


def app_env(tmp: Path, standin: StandInPlatforms, database_url: str, **extra: str) -> dict[str, str]:
    config = tmp / "channels.toml"
    config.write_text(CONFIG.format(api_base=standin.base("tg")))
    return {
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        "HOME": str(tmp),
        "CHATSESSIONS_CONFIG": str(config),
        "DATABASE_URL": database_url,
        "WORKER_CONCURRENCY": "4",
        "WORKER_HEARTBEAT_FILE": str(tmp / "worker.alive"),
        "LOG_FORMAT": "console",
        **SECRETS,
        **extra,
    }


def message(chat: str, text: str) -> InboundMessage:
    return InboundMessage(channel_id="tg", platform="telegram", session_key=f"tg:dm:{chat}", chat_id=chat,
                          chat_kind=DM, sender_id=chat, sender_name="Ha", text=text,
                          platform_message_id=uuid.uuid4().hex, sent_at=time.time())


def start_worker(procs: Processes, env: dict[str, str], name: str = "worker") -> None:
    procs.start(name, [str(VENV_BIN / "chatsessions"), "worker", "--partitions", "all", "--name", f"ha-{name}@%h"],
                env=env)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([str(VENV_BIN / "chatsessions"), *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, f"chatsessions {' '.join(args)}: rc {done.returncode}\n{done.stdout}{done.stderr}"
    return done


def wait_for_reply(standin: StandInPlatforms, procs: Processes, chat: str, text: str,
                   timeout: float = REPLY_TIMEOUT) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"echo: {text}" in standin.replies_to("tg", chat):
            return time.time()
        for name, proc in procs.procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}:\n{procs.log(name)[-4000:]}")
        time.sleep(0.2)
    logs = "\n".join(f"--- {n}\n{procs.log(n)[-3000:]}" for n in list(procs.procs))
    pytest.fail(f"no reply to {text!r} in chat {chat} within {timeout}s; replies: {standin.sent}\n{logs}")


# -- Configuration (no services) ----------------------------------------------------------------------------------


def settings_env(tmp_path, standin_base: str = "http://127.0.0.1:9/tg", **env: str) -> dict[str, str]:
    config = tmp_path / "channels.toml"
    config.write_text(CONFIG.format(api_base=standin_base))
    return {"CHATSESSIONS_CONFIG": str(config), **SECRETS, **env}


def test_queue_type_is_classic_by_default_and_quorum_only_on_rabbitmq(tmp_path):
    amqp = {"BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//", "REDIS_URL": "redis://127.0.0.1:6379/0"}
    classic = load_settings(settings_env(tmp_path, **amqp))
    assert classic.broker_queue_type == "classic"
    assert all(q.queue_arguments is None for q in task_queues(classic))  # declared exactly as before

    quorum = load_settings(settings_env(tmp_path, **amqp, BROKER_QUEUE_TYPE="quorum"))
    queues = task_queues(quorum)
    assert [q.name for q in queues] == [queue_name(p) for p in range(PARTITIONS)] + [MAINTENANCE_QUEUE]
    assert all(q.queue_arguments == {"x-queue-type": "quorum"} for q in queues)
    assert all(q.exchange.type == "topic" and q.routing_key == q.name for q in queues)  # native delayed delivery
    app = make_celery(quorum)
    assert app.conf.worker_detect_quorum_queues and app.conf.task_default_queue_type == "quorum"
    assert app.conf.broker_transport_options["confirm_publish"] is True  # 200 only once replicated

    with pytest.raises(ConfigError, match="BROKER_QUEUE_TYPE must be classic or quorum"):
        load_settings(settings_env(tmp_path, **amqp, BROKER_QUEUE_TYPE="stream"))
    with pytest.raises(ConfigError, match="needs RabbitMQ"):
        load_settings(settings_env(tmp_path, BROKER_URL="redis://127.0.0.1:6379/0", BROKER_QUEUE_TYPE="quorum"))


def test_sentinel_urls_need_the_master_name_and_carry_it_to_every_redis_client(tmp_path):
    sentinels = "sentinel://:pw@10.0.0.1:26379/2;sentinel://10.0.0.2:26380;sentinel://10.0.0.3"
    with pytest.raises(ConfigError, match="REDIS_SENTINEL_MASTER"):
        load_settings(settings_env(tmp_path, BROKER_URL=sentinels))
    with pytest.raises(ConfigError, match="neither BROKER_URL nor REDIS_URL"):
        load_settings(settings_env(tmp_path, BROKER_URL="redis://r:6379/0", REDIS_SENTINEL_MASTER="m"))
    with pytest.raises(ConfigError, match="not a valid sentinel"):
        load_settings(settings_env(tmp_path, BROKER_URL="sentinel://:26379", REDIS_SENTINEL_MASTER="m"))

    s = load_settings(settings_env(tmp_path, BROKER_URL=sentinels, REDIS_SENTINEL_MASTER="m"))
    assert s.broker_url == sentinels and s.redis_sentinel_master == "m"
    target = parse_sentinel_url(s.redis_url)  # REDIS_URL defaults to the broker's sentinels, with the master
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379))
    assert (target.master_name, target.db, target.password) == ("m", 2, "pw")
    app = make_celery(s)
    assert app.conf.broker_transport == "shared.broker:SentinelTransport"
    assert app.conf.broker_transport_options["master_name"] == "m"

    # REDIS_URL may be its own Sentinel group, naming its master in the URL; the broker stays plain Redis.
    own = "sentinel://10.0.0.9:26379?master_name=ledger"
    s = load_settings(settings_env(tmp_path, BROKER_URL="redis://r:6379/0", REDIS_URL=own))
    assert s.redis_url == own and parse_sentinel_url(s.redis_url).master_name == "ledger"
    assert with_master(own, "other") == own


def test_kombu_keeps_the_hardened_sentinel_transport_when_it_moves_to_the_next_sentinel(tmp_path):
    s = load_settings(settings_env(tmp_path, BROKER_URL="sentinel://127.0.0.1:1;sentinel://127.0.0.1:2",
                                   REDIS_SENTINEL_MASTER="m"))
    conn = make_celery(s).connection_for_write()
    assert conn.get_transport_cls().__module__ == "shared.broker"
    conn.maybe_switch_next()  # what a failed reconnect does; it takes the transport from the URL's scheme again
    assert conn.get_transport_cls().__name__ == "SentinelTransport"
    assert conn.get_transport_cls().__module__ == "shared.broker"


# -- RabbitMQ quorum queues ----------------------------------------------------------------------------------------


@pytest.fixture
def rabbit_vhost():
    vhost = f"chatsessions-ha-{uuid.uuid4().hex[:8]}"
    run(["rabbitmqctl", "add_vhost", vhost])
    try:
        run(["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"])
        yield vhost
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60, check=False)


@pytest.fixture
def private_redis(procs, tmp_path):
    """A private redis-server for the ledger and rate limits (REDIS_URL), so the test touches no shared Redis."""
    port = free_port()
    procs.start("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(tmp_path)])
    wait_redis(port)
    return port


def wait_redis(port: int, timeout: float = 20) -> redis.Redis:
    client = redis.Redis(port=port, socket_timeout=5, decode_responses=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return client
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                pytest.fail(f"redis-server on port {port} did not start")
            time.sleep(0.05)


def queue_types(vhost: str) -> dict[str, str]:
    out = run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "type"]).stdout
    rows = [line.split("\t") for line in out.splitlines() if "\t" in line]
    return {name: kind for name, kind in rows if name != "name"}


def test_rabbitmq_quorum_queues_end_to_end(procs, standin, rabbit_vhost, private_redis, ha_database, tmp_path):
    env = app_env(tmp_path, standin, ha_database, BROKER_URL=f"{AMQP_BASE}/{rabbit_vhost}",
                  REDIS_URL=f"redis://127.0.0.1:{private_redis}/0", BROKER_QUEUE_TYPE="quorum")
    settings = load_settings(env)
    publisher = Publisher(settings)
    first = message("5001", "over quorum queues")
    assert publisher.publish([first]) == 1  # published before any worker ran: the ingress declares the queue
    start_worker(procs, env)
    wait_for_reply(standin, procs, "5001", "over quorum queues")

    # A countdown (what a turn's retry after a database error uses) goes through native delayed delivery.
    delayed = message("5002", "delayed on a quorum queue")
    stamped = delayed.with_ingress(publisher.ledger.next_seq(delayed.session_key), time.time())
    sent_at = time.time()
    publisher.app.send_task(HANDLE_INBOUND, args=[stamped.to_dict()], countdown=2,
                            queue=queue_name(partition_of(delayed.session_key, PARTITIONS)))
    answered = wait_for_reply(standin, procs, "5002", "delayed on a quorum queue")
    assert answered - sent_at >= 1.9

    types = queue_types(rabbit_vhost)
    ours = [queue_name(p) for p in range(PARTITIONS)] + [MAINTENANCE_QUEUE]
    assert {name: types.get(name) for name in ours} == {name: "quorum" for name in ours}
    log = procs.log("worker")
    assert "Global QoS is disabled" in log  # per-consumer prefetch: quorum queues refuse global QoS
    assert "direct exchange" not in log  # every queue can take delayed messages


# -- Redis Sentinel ----------------------------------------------------------------------------------------------------


def start_sentinel_group(procs: Processes, tmp: Path) -> tuple[redis.Redis, redis.Redis, redis.Redis, int]:
    """A master, its replica and one sentinel monitoring them; returns the three clients and the sentinel's port."""
    master_port, replica_port, sentinel_port = free_port(), free_port(), free_port()
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    (tmp / "master").mkdir()
    (tmp / "replica").mkdir()
    procs.start("redis-master", ["redis-server", "--port", str(master_port), "--dir", str(tmp / "master"), *common])
    master = wait_redis(master_port)
    procs.start("redis-replica", ["redis-server", "--port", str(replica_port), "--dir", str(tmp / "replica"),
                                  "--replicaof", "127.0.0.1", str(master_port), *common])
    replica = wait_redis(replica_port)
    conf = tmp / "sentinel.conf"  # the sentinel rewrites its own config file: a private, writable copy
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp}\n"
                    f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 1\n"
                    f"sentinel down-after-milliseconds {MASTER} 2000\n"
                    f"sentinel failover-timeout {MASTER} 10000\n")
    procs.start("sentinel", ["redis-server", str(conf), "--sentinel"])
    sentinel = wait_redis(sentinel_port)
    eventually(lambda: replica.info("replication")["master_link_status"] == "up", "the replica syncs")
    eventually(lambda: any(r["port"] == replica_port for r in sentinel.sentinel_slaves(MASTER)),
               "the sentinel knows the replica")
    return master, replica, sentinel, sentinel_port


def eventually(check, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.1)


def test_redis_sentinel_ledger_limiter_and_worker_follow_a_failover(procs, standin, ha_database, tmp_path, request):
    master, replica, sentinel, sentinel_port = start_sentinel_group(procs, tmp_path)
    # The first sentinel in the list is down (a port bound but not listening: connections are refused, and no other
    # process can take it meanwhile): clients must go on to the next.
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    request.addfinalizer(dead.close)
    nobody = dead.getsockname()[1]
    env = app_env(tmp_path, standin, ha_database, REDIS_SENTINEL_MASTER=MASTER,
                  BROKER_URL=f"sentinel://127.0.0.1:{nobody};sentinel://127.0.0.1:{sentinel_port}")
    settings = load_settings(env)  # REDIS_URL unset: the ledger and limiter use the broker's sentinels
    assert str(master.connection_pool.connection_kwargs["port"]) not in settings.redis_url

    ledger = RedisLedger(settings.redis_url)
    limiter = RedisLimiter(settings.redis_url)
    assert ledger.claim("tg", "m-1") is True and ledger.next_seq("tg:dm:ha") == 1
    assert limiter.try_take([Bucket("rl:ha", 1, 5)]) == 0
    assert master.get("seq:tg:dm:ha") == "1" and master.exists("rl:ha")  # on the master, found via the sentinel

    publisher = Publisher(settings)
    start_worker(procs, env)
    assert publisher.publish([message("6001", "through sentinel")]) == 1
    wait_for_reply(standin, procs, "6001", "through sentinel")  # the worker's rate limiter went through it too

    # The operators' commands reach the broker, the ledger and the workers through the sentinels as well.
    check = cli(env, "check", "--json")
    results = {c["name"]: c for c in json.loads(check.stdout)["checks"]}
    assert results["broker"]["ok"] and results["redis"]["ok"], check.stdout
    partitions = json.loads(cli(env, "partitions", "--json").stdout)  # rc 0: one consumer per partition
    assert partitions["workers_answered"], partitions
    consumers = {q["queue"]: q["consumers"] for q in partitions["queues"]}
    assert set(consumers) == {queue_name(p) for p in range(PARTITIONS)} | {MAINTENANCE_QUEUE}
    assert all(len(c) == 1 and c[0].startswith("ha-worker@") for c in consumers.values()), consumers

    # Failover: the replica becomes the master, the old master its replica.
    new_port = replica.connection_pool.connection_kwargs["port"]
    sentinel.execute_command("SENTINEL", "FAILOVER", MASTER)
    eventually(lambda: int(sentinel.sentinel_get_master_addr_by_name(MASTER)[1]) == new_port, "the failover")
    eventually(lambda: replica.info("replication")["role"] == "master", "the replica is promoted")
    eventually(lambda: master.info("replication")["role"] == "slave", "the old master is demoted")

    assert ledger.next_seq("tg:dm:ha") == 2  # the same client objects, now writing to the new master
    assert replica.get("seq:tg:dm:ha") == "2"
    assert limiter.try_take([Bucket("rl:ha2", 1, 5)]) == 0 and replica.exists("rl:ha2")
    client = redis_client(settings.redis_url, socket_timeout=2)
    assert client.info("server")["tcp_port"] == new_port
    assert_a_send_waits_for_a_connection(limiter)  # through the sentinels too

    assert publisher.publish([message("6002", "after the failover")]) == 1
    wait_for_reply(standin, procs, "6002", "after the failover")
    assert procs.procs["worker"].poll() is None  # the worker reconnected rather than exiting
