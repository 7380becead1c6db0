"""Fixtures shared by the unit tests: real SQLite and PostgreSQL databases, migrated with alembic."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from shared.db import engine_for
from shared.migrate import upgrade

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


@contextlib.contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """A new, migrated PostgreSQL database, dropped afterwards; fails (never skips) when PostgreSQL is down."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is not reachable (start it, make setup): {exc}")
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    upgrade(url)
    yield url
    engine_for(url).dispose()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh PostgreSQL database for this test run."""
    with fresh_database("chatsessions_unit") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """Each store test runs on both backends: the embedded SQLite file and the production PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/store.db"
        upgrade(url)
        yield url
        engine_for(url).dispose()
    else:
        yield request.getfixturevalue("clean_postgres_url")


@pytest.fixture
def clean_postgres_url(postgres_url):
    """The run's PostgreSQL database, emptied after the test (the next test's sessions start from nothing)."""
    yield postgres_url
    with engine_for(postgres_url).begin() as conn:
        conn.exec_driver_sql("TRUNCATE dead_letters, session_events, messages, sessions, channels CASCADE")
