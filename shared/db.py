"""Engine and transactions. PostgreSQL (psycopg 3) in production, a SQLite file embedded.

No `pool_pre_ping`: a `SELECT 1` before every checkout was a tenth of a turn's CPU. A pooled connection is
pinged only after it sat idle in the pool for IDLE_PING_S (under load: never), and `run_transaction` runs its
work again on a fresh connection when the one it got turns out dead (the database restarted since it was last
used): nothing of that attempt was applied. SQLAlchemy invalidates the whole pool on the first disconnect it
sees, so the other connections of the dead server are replaced at their next checkout.
"""

from __future__ import annotations

import contextlib
import functools
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Sequence, TypeVar

import structlog
from sqlalchemy import Connection, Engine, Executable, create_engine, event
from sqlalchemy.exc import (
    DBAPIError,
    InterfaceError,
    InvalidatePoolError,
    MultipleResultsFound,
    NoResultFound,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from shared.greenlets import GreenConnection, on_greenlets

# The database is down, the connection died, or every pooled connection stayed busy past the pool's timeout (many
# turns at once on greenlets): transient, worth retrying (a failed transaction left nothing).
DB_UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeout)

log = structlog.get_logger(__name__)

T = TypeVar("T")

IDLE_PING_S = 5.0  # a connection idle in the pool this long is pinged at checkout
RECYCLE_S = 1800  # connections older than this are replaced at checkout (idle timeouts of proxies, firewalls)
# A process's connections at most, opened as its threads or greenlets first need them and then kept: none is an
# "overflow" closed at checkin, since a new backend costs PostgreSQL a fork and every cached plan again (with 20 kept
# + 20 overflow, a pool of 64 threads opened new backends all the time: two thirds of a core went to them).
POOL_CONNECTIONS = 40
STALE_RETRIES = 2  # fresh connections run_transaction tries after finding the one it got dead


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones in the session's zone. (Not cached:
    every stored message has its own time, so a cache would grow with the conversations a worker has read.)"""
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def iso(value: datetime | None) -> str | None:
    value = as_utc(value)
    return value.isoformat() if value else None


def epoch(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, timezone.utc) if value else None


def batches(items: list, size: int) -> Iterator[list]:
    """`items` in lists of at most `size` (an IN list per statement)."""
    for i in range(0, len(items), size):
        yield items[i:i + size]


@functools.cache
def engine_for(url: str) -> Engine:
    """One pooled engine per URL per process."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=20,
                               hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # SQLAlchemy's "begin" event below issues BEGIN itself
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            # Take the write lock up front so concurrent writers queue instead of deadlocking.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # LIFO: a busy process keeps reusing its few warm connections; the rest stay idle (pinged when next used).
    # hide_parameters: an error's text (logged by Celery with its traceback) must not quote message text or keys.
    engine = create_engine(url, pool_size=POOL_CONNECTIONS, max_overflow=0, pool_recycle=RECYCLE_S, pool_use_lifo=True,
                           connect_args=driver_options(url), hide_parameters=True)
    _ping_when_idle(engine)
    if on_greenlets():
        @event.listens_for(engine, "do_connect")
        def _green_connection(_dialect, _record, cargs, cparams):
            return GreenConnection.connect(*cargs, **cparams)
    return engine


def driver_options(url: str) -> dict:
    """psycopg's own options in DATABASE_URL's query, typed: SQLAlchemy hands query values to psycopg.connect as
    text, and `prepare_threshold` must be a number or None. `?prepare_threshold=none` turns server-side prepared
    statements off, for PgBouncer < 1.21 in transaction pooling (docs/scaling.md); ValueError if not a number."""
    from urllib.parse import parse_qs, urlsplit

    values = parse_qs(urlsplit(url).query).get("prepare_threshold")
    if not values:
        return {}
    raw = values[-1].strip().lower()
    if raw in ("none", "null", ""):
        return {"prepare_threshold": None}
    if not raw.isdigit():
        raise ValueError(f"DATABASE_URL: prepare_threshold must be a whole number or none, got {values[-1]!r}")
    return {"prepare_threshold": int(raw)}


def _ping_when_idle(engine: Engine) -> None:
    @event.listens_for(engine.pool, "checkin")
    def _idle_from(_dbapi_conn, record) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine.pool, "checkout")
    def _ping_if_idle(dbapi_conn, record, _proxy) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since < IDLE_PING_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the pool replaces it (and every connection older) and checks out again
            raise InvalidatePoolError(f"pooled connection is dead: {exc}") from exc


def run_transaction(url: str, work: Callable[[Connection], T]) -> T:
    """Run `work(connection)` as one transaction: committed when it returns, rolled back if it raises.

    If the connection turns out dead while `work` runs (SQLAlchemy flags the error `connection_invalidated`),
    nothing was applied, so `work` runs again on a fresh connection, up to STALE_RETRIES times; a database that
    is still down fails the reconnect, and that error goes to the caller (a turn's task retries with backoff).
    An error at COMMIT is never retried here: whether the commit happened is unknown. `work` must do nothing
    but database statements.
    """
    engine = engine_for(url)
    attempt = 0
    while True:
        attempt += 1
        with engine.connect() as conn:
            trans = conn.begin()
            try:
                result = work(conn)
            except DBAPIError as exc:
                trans.rollback()
                if exc.connection_invalidated and attempt <= STALE_RETRIES:
                    log.warning("db.stale_connection", attempt=attempt, error=str(exc.orig)[:200])
                    continue
                raise
            except BaseException:
                trans.rollback()
                raise
            trans.commit()
            return result


def run_statement(url: str, statement: Executable, params: dict) -> int:
    """Run one statement as its own transaction and return its rowcount. On PostgreSQL it runs in autocommit
    mode: the statement commits itself, without a transaction's BEGIN and COMMIT round trips. A dead pooled
    connection is replaced as in `run_transaction` (the statement did not run: its connection was gone)."""
    if engine_for(url).dialect.name != "postgresql":
        return run_transaction(url, lambda c: c.execute(statement, params).rowcount)
    return run_call(url, statement, params).rowcount


def run_call(url: str, statement: Executable, params: dict) -> Rows:
    """PostgreSQL: run one statement in autocommit mode and return its rows — a call of one of the turn's functions
    (migration 0007) is a whole transaction in one round trip. The pooled connection is switched to autocommit
    for the statement on psycopg itself (SQLAlchemy's AUTOCOMMIT execution option costs ~40 µs of isolation
    settings per checkout). A dead pooled connection is replaced as in `run_transaction`."""
    attempt = 0
    while True:
        attempt += 1
        with engine_for(url).connect() as conn:
            raw = conn.connection.dbapi_connection
            raw.autocommit = True
            try:
                return execute(conn, statement, params)
            except DBAPIError as exc:
                if exc.connection_invalidated and attempt <= STALE_RETRIES:
                    log.warning("db.stale_connection", attempt=attempt, error=str(exc.orig)[:200])
                    continue
                raise
            finally:
                _end_autocommit(conn, raw)


def _end_autocommit(conn: Connection, raw: Any) -> None:
    """Give the connection back to the pool as it came (not in autocommit); one left mid-statement (an interrupt,
    a greenlet killed) or broken is invalidated instead. Never raises over the statement's own outcome."""
    from psycopg.pq import TransactionStatus

    try:
        if not raw.closed and raw.info.transaction_status == TransactionStatus.IDLE:
            raw.autocommit = False
            return
    except Exception:  # noqa: BLE001 - invalidated below
        pass
    conn.invalidate()


def autocommit(c: Connection) -> bool:
    """Whether a statement on `c` is its own transaction (run by `run_call`)."""
    return getattr(c.connection.dbapi_connection, "autocommit", False) is True


@functools.cache
def _sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url), expire_on_commit=False)


@contextlib.contextmanager
def transaction(url: str) -> Iterator[Session]:
    """One ORM unit of work (operators' commands, tests): committed when the block ends, rolled back if it
    raises. The turn's hot path uses `run_transaction` with Core statements instead."""
    with _sessionmaker(url).begin() as session:
        yield session


# -- the turn's statements, straight on psycopg -------------------------------------------------------------------------

# Called with (connection, SQL, parameters) for each statement `execute` sends straight on psycopg (bench, tests).
STATEMENT_LISTENERS: list[Callable[[Connection, str, dict], None]] = []
_CURSOR = "chatsessions.cursor"  # the pooled connection's reused cursor (in its `info`)


class Rows:
    """A statement's result, read at once: what callers use of SQLAlchemy's results."""

    __slots__ = ("rows", "rowcount")

    def __init__(self, rows: Sequence[Any], rowcount: int):
        self.rows, self.rowcount = rows, rowcount

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)

    def first(self) -> Any:
        return self.rows[0] if self.rows else None

    def all(self) -> Sequence[Any]:
        return self.rows

    def one(self) -> Any:
        if len(self.rows) != 1:
            raise (NoResultFound if not self.rows else MultipleResultsFound)("expected exactly one row")
        return self.rows[0]

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else None

    def scalar_one(self) -> Any:
        return self.one()[0]


@functools.cache
def _compiled(statement: Executable, keys: frozenset[str], dialect_name: str, dialect: Any) -> tuple[str, dict]:
    """A statement's SQL for these parameter names, and the values of the binds it carries itself (a literal in
    `.values(status=...)`), compiled once."""
    compiled = statement.compile(dialect=dialect, column_keys=sorted(keys))
    own = {name: value for name, value in compiled.construct_params(dict.fromkeys(keys)).items() if name not in keys}
    return str(compiled), own


def execute(c: Connection, statement: Executable, params: dict[str, Any]) -> Any:
    """Run a prebuilt Core statement in the transaction of `c`. On PostgreSQL it goes straight to psycopg — the SQL
    compiled once, one reused cursor per pooled connection, psycopg's own prepared statements — without
    SQLAlchemy's per-statement execution context, more than half a short statement's client CPU (the turn runs a
    dozen of them). Errors come out as SQLAlchemy's (DB_UNAVAILABLE, IntegrityError...), a dead connection
    invalidated as SQLAlchemy would. Elsewhere (SQLite), SQLAlchemy runs it."""
    if c.dialect.name != "postgresql":
        return c.execute(statement, params)
    sql, own = _compiled(statement, frozenset(params), c.dialect.name, c.dialect)
    if own:
        params = {**own, **params}
    for listener in STATEMENT_LISTENERS:
        listener(c, sql, params)
    fairy = c.connection
    cursor = fairy.info.get(_CURSOR)
    try:
        if cursor is None or cursor.closed or cursor.connection is not fairy.dbapi_connection:
            from psycopg.rows import namedtuple_row

            cursor = fairy.info[_CURSOR] = fairy.dbapi_connection.cursor(row_factory=namedtuple_row)
        cursor.execute(sql, params)
        result = cursor.pgresult
        rows = cursor.fetchall() if result is not None and result.ntuples else []
        return Rows(rows, cursor.rowcount)
    except c.dialect.loaded_dbapi.Error as exc:
        c._handle_dbapi_exception(exc, sql, params, cursor, None)  # raises SQLAlchemy's error, invalidates if dead
        raise
