"""PostgreSQL behind PgBouncer in transaction pooling (docs/scaling.md, deploy/pgbouncer.ini).

psycopg 3 prepares a statement on the server after 5 executions on a connection (`prepare_threshold`). Through a
transaction-pooling PgBouncer older than 1.21 (or without `max_prepared_statements`), the next transaction may run on
another server connection, where the name is unknown or already taken by another client: the statement fails.
`DATABASE_URL=…?prepare_threshold=none` turns them off (shared/db.py gives psycopg the typed value; SQLAlchemy alone
would pass the text "none" and every query would raise TypeError).

The last two tests run a real `pgbouncer` (fails if it is not installed; make setup installs it).
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from sqlalchemy import text

from shared.db import driver_options, engine_for

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
STATEMENT = text("SELECT count(*) FROM sessions WHERE id > :floor")


def test_prepare_threshold_in_the_database_url_reaches_psycopg():
    assert driver_options("postgresql+psycopg://u@db/x") == {}
    assert driver_options("postgresql+psycopg://u@db/x?prepare_threshold=none") == {"prepare_threshold": None}
    assert driver_options("postgresql+psycopg://u@db/x?sslmode=require&prepare_threshold=0") == {"prepare_threshold": 0}
    with pytest.raises(ValueError, match="prepare_threshold must be a whole number or none"):
        driver_options("postgresql+psycopg://u@db/x?prepare_threshold=off")


def _prepared_after_repeats(url: str) -> tuple[object, int]:
    with engine_for(url).connect() as conn:
        for _ in range(8):
            conn.execute(STATEMENT, {"floor": 0})
        threshold = conn.connection.dbapi_connection.prepare_threshold
        return threshold, conn.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar()


def test_psycopg_prepares_repeated_statements_unless_told_not_to(postgres_url):
    threshold, prepared = _prepared_after_repeats(postgres_url)  # psycopg's default: 5
    assert threshold is not None and prepared >= 1  # what PgBouncer < 1.21 breaks on
    assert _prepared_after_repeats(postgres_url + "?prepare_threshold=none") == (None, 0)


def pgbouncer_version() -> tuple[int, ...]:
    if shutil.which("pgbouncer") is None:
        pytest.fail("pgbouncer is not installed (make setup installs it)")
    out = subprocess.run(["pgbouncer", "--version"], capture_output=True, text=True, timeout=10).stdout
    return tuple(int(n) for n in re.search(r"PgBouncer (\d+)\.(\d+)", out).groups())


@contextlib.contextmanager
def run_pgbouncer(postgres_url: str, settings: dict[str, str]) -> Iterator[str]:
    """A real PgBouncer with `settings` in front of the test database; yields the app's DATABASE_URL through it."""
    pgbouncer_version()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = urlsplit(postgres_url)
    # PgBouncer refuses to run as root: as root it switches to the postgres user, who must read and write here.
    workdir = Path(tempfile.mkdtemp(prefix="chatsessions-pgbouncer-"))
    workdir.chmod(0o777)
    (workdir / "userlist.txt").write_text(f'"{db.username}" ""\n')
    settings = {**settings, "listen_addr": "127.0.0.1", "listen_port": str(port), "unix_socket_dir": "",
                "auth_type": "trust", "auth_file": f"{workdir}/userlist.txt", "logfile": f"{workdir}/pgbouncer.log"}
    (workdir / "pgbouncer.ini").write_text(
        f"[databases]\n* = host={db.hostname} port={db.port or 5432}\n[pgbouncer]\n"
        + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    argv = ["pgbouncer", str(workdir / "pgbouncer.ini")] + (["-u", "postgres"] if os.geteuid() == 0 else [])
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"postgresql+psycopg://{db.username}@127.0.0.1:{port}{db.path}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                psycopg.connect(url.replace("+psycopg", ""), connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = workdir / "pgbouncer.log"
                    pytest.fail(f"pgbouncer did not start: {log.read_text() if log.exists() else proc.returncode}")
                time.sleep(0.1)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def _two_clients_take_turns(url: str) -> list[str]:
    """Two pooled connections run the same statement in alternating transactions; with one server connection,
    PgBouncer gives both the same one. Returns the errors."""
    engine = engine_for(url)
    errors = []
    with engine.connect() as a, engine.connect() as b:
        for _ in range(8):
            for conn in (a, b):
                try:
                    conn.execute(STATEMENT, {"floor": 0})
                    conn.commit()
                except Exception as exc:  # noqa: BLE001 - the point is which error, if any
                    conn.rollback()
                    errors.append(f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}")
    engine.dispose()
    return errors


def test_behind_transaction_pooling_pgbouncer_prepared_statements_must_be_off(postgres_url):
    """PgBouncer without prepared-statement support (< 1.21, or max_prepared_statements = 0)."""
    settings = {"pool_mode": "transaction", "default_pool_size": "1", "max_client_conn": "20"}
    if pgbouncer_version() >= (1, 21):
        settings["max_prepared_statements"] = "0"
    with run_pgbouncer(postgres_url, settings) as url:
        errors = _two_clients_take_turns(url)
        assert errors and "prepared statement" in errors[0]  # what the option is for
        assert _two_clients_take_turns(url + "?prepare_threshold=none") == []


def shipped_settings() -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string((DEPLOY / "pgbouncer.ini").read_text())
    return dict(parser["pgbouncer"])


def test_the_shipped_pgbouncer_ini_serves_concurrent_turns(postgres_url):
    """deploy/pgbouncer.ini's pooling settings, many threads over few server connections. On a PgBouncer older than
    1.21 the file's own advice is followed: no max_prepared_statements, ?prepare_threshold=none."""
    settings = shipped_settings()
    assert settings["pool_mode"] == "transaction" and int(settings["max_prepared_statements"]) >= 100
    settings |= {"default_pool_size": "2", "min_pool_size": "0", "reserve_pool_size": "0"}  # force sharing
    option = ""
    if pgbouncer_version() < (1, 21):
        del settings["max_prepared_statements"]
        option = "?prepare_threshold=none"
    with run_pgbouncer(postgres_url, settings) as url:
        engine = engine_for(url + option)
        errors: list[str] = []

        def work() -> None:
            try:
                for _ in range(30):
                    with engine.begin() as conn:
                        conn.execute(STATEMENT, {"floor": 0})
                        conn.execute(text("SELECT max(id) FROM messages WHERE session_id = :s"), {"s": 1})
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}")

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        engine.dispose()
        assert errors == []
