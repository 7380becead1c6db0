"""The all-in-one process: ingress, workers and beat in one process over an in-process broker.

For trying the system on a laptop (SQLite file, kombu memory://). Production runs the same code as
separate processes from the Procfile.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass

import structlog
from werkzeug.serving import BaseWSGIServer, make_server

from shared.config import DEFAULT_CONFIG, Settings, get_settings
from shared.migrate import upgrade
from shared.partitioning import queue_name
from shared.queueing import MAINTENANCE_QUEUE

log = structlog.get_logger(__name__)

DEMO_SECRETS = {
    "ACME_WA_APP_SECRET": "demo-app-secret",
    "ACME_WA_VERIFY_TOKEN": "demo-verify-token",
    "ACME_WA_ACCESS_TOKEN": "demo-access-token",
    "ACME_TG_BOT_TOKEN": "123456:demo-bot-token",
    "ACME_TG_SECRET_TOKEN": "demo-secret-token",
    "ACME_DISCORD_BOT_TOKEN": "demo-discord-token",
    # Public half of DEMO_DISCORD_SIGNING_SEED's Ed25519 key, so local tools can sign interactions.
    "ACME_DISCORD_PUBLIC_KEY": "de18658095d004b28d2eb7638b14aac7ce85ed7567e7839fe81df237691194e8",
}

# sha256(b"chatsessions-demo"): a published, demo-only Ed25519 seed. Never use it for a real application.
DEMO_DISCORD_SIGNING_SEED = bytes.fromhex("52f908c56e5f2e5b49954c61a1901f3011d27112051eb12d90bcaa1990f3b3db")


def use_embedded_defaults() -> list[str]:
    """With the shipped config, fill unset secrets with demo values; returns the names filled in."""
    filled = []
    if not os.environ.get("CHATSESSIONS_CONFIG") or os.environ["CHATSESSIONS_CONFIG"] == str(DEFAULT_CONFIG):
        for name, value in DEMO_SECRETS.items():
            if not os.environ.get(name):
                os.environ[name] = value
                filled.append(name)
    os.environ.setdefault("BROKER_URL", "memory://localhost/")
    return filled


@dataclass
class Embedded:
    """Running ingress + worker (+ beat) threads; `stop()` ends them."""

    settings: Settings
    server: BaseWSGIServer
    worker: object
    publisher: object  # the one ledger (sequence numbers, dedupe) every in-process feed must share
    threads: list[threading.Thread]

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.worker.stop(in_sighandler=False)
        for t in self.threads:
            t.join(timeout=10)


def start(host: str = "127.0.0.1", port: int = 8000, concurrency: int = 8, beat: bool = True) -> Embedded:
    settings = get_settings()
    upgrade(settings.database_url)
    from ingress.app import create_app
    from ingress.publisher import Publisher
    from workers.app import app as celery_app
    from workers.runtime import runner

    runner()
    queues = ",".join([queue_name(p) for p in range(settings.partitions)] + [MAINTENANCE_QUEUE])
    schedule = os.path.join(tempfile.gettempdir(), f"chatsessions-beat-{os.getpid()}")
    worker = celery_app.WorkController(pool_cls="threads", concurrency=concurrency, queues=queues,
                                       beat=beat, schedule_filename=schedule,
                                       without_mingle=True, without_gossip=True, loglevel="WARNING")
    worker_thread = threading.Thread(target=worker.start, name="worker", daemon=True)
    worker_thread.start()
    publisher = Publisher(settings, app=celery_app)
    wsgi = create_app(settings, publisher)
    server = make_server(host, port, wsgi, threaded=True)
    server_thread = threading.Thread(target=server.serve_forever, name="ingress", daemon=True)
    server_thread.start()
    log.info("embedded.started", url=f"http://{server.host}:{server.port}", database=settings.database_url,
             broker=settings.broker_url, partitions=settings.partitions)
    return Embedded(settings, server, worker, publisher, [server_thread, worker_thread])
