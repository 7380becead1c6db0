"""Agents that wait: written plainly or as coroutines, they run the same turn, and no database connection is held
while they wait. One worker process on greenlets keeps a thousand of them waiting at once (WORKER_POOL=gevent)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
import pytest

from workers.agents import Conversation
from shared.db import engine_for
from test_turn import make_runner, msg, sent
from workers.testing import run_conversation

REPO = Path(__file__).resolve().parents[1]


class AsyncRemembering:
    """An async Agent: awaits (as an LLM client would), then says how much context it was given."""

    async def reply(self, conversation: Conversation) -> str:
        await asyncio.sleep(0.01)
        return f"{len(conversation.history)} before: {conversation.message.text}"


class BlockingRemembering:
    """The same Agent written plainly: blocks while it waits."""

    def reply(self, conversation: Conversation) -> str:
        time.sleep(0.01)
        return f"{len(conversation.history)} before: {conversation.message.text}"


@pytest.mark.parametrize("agent", [AsyncRemembering(), BlockingRemembering()], ids=["async", "blocking"])
def test_an_async_and_a_blocking_agent_run_the_same_conversation(agent):
    assert run_conversation(agent, ["hello", "my order 48213", "/new", "again"]) == [
        "0 before: hello", "2 before: my order 48213", "Started a new conversation. Earlier messages won't be used "
        "from now on.", "0 before: again"]


def test_an_async_agents_error_reaches_the_turn_like_any_other():
    class Broken:
        async def reply(self, conversation: Conversation) -> str:
            raise RuntimeError("the model is down")

    with pytest.raises(RuntimeError, match="the model is down"):
        run_conversation(Broken(), ["hello"])


class Watching:
    """While it 'waits on the LLM', looks at what its process holds of the database: pooled connections checked out
    (the engine's) and the server's own view of this database's backends in a transaction."""

    def __init__(self, url: str, wait: float = 0.05):
        self.url, self.wait, self.seen = url, wait, []

    def _look(self) -> tuple[int, int]:
        held = engine_for(self.url).pool.checkedout()
        in_transaction = 0
        if self.url.startswith("postgresql"):
            name = self.url.rsplit("/", 1)[1]
            with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as admin:
                in_transaction = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state LIKE 'idle in transaction%%'",
                    (name,)).fetchone()[0]
        return held, in_transaction


class PlainWatching(Watching):
    def reply(self, conversation: Conversation) -> str:
        self.seen.append(self._look())
        time.sleep(self.wait)
        return "ok"


class AsyncWatching(Watching):
    async def reply(self, conversation: Conversation) -> str:
        self.seen.append(self._look())
        await asyncio.sleep(self.wait)
        return "ok"


@pytest.mark.parametrize("style", [PlainWatching, AsyncWatching], ids=["plain", "async"])
def test_a_waiting_agent_holds_no_database_connection(database_url, style):
    agent = style(database_url)
    r = make_runner(database_url, agent)
    for seq in range(1, 4):
        assert r.handle(msg(f"m{seq}", seq=seq)) == "replied"
    assert agent.seen == [(0, 0)] * 3  # no pooled connection checked out, no transaction open on the server
    assert [text for _, text in sent(r)] == ["ok"] * 3


GEVENT_RUN = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    import asyncio, json, sys, time, gevent
    sys.path.insert(0, "tests")
    from shared.db import engine_for
    from test_turn import make_runner, msg, sent

    url, n, patience = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    waiting, peak_waiting, peak_connections = 0, 0, 0

    class Waiting:
        # Each Agent waits until all n are waiting at once (or `patience` runs out): only an execution model that
        # keeps n waits in flight gets there.
        def enter(self):
            global waiting, peak_waiting, peak_connections
            waiting += 1
            peak_waiting = max(peak_waiting, waiting)
            peak_connections = max(peak_connections, engine_for(url).pool.checkedout())
            return time.monotonic() + patience

        def everyone_waiting(self, deadline):
            return peak_waiting >= n or time.monotonic() > deadline

    class Plain(Waiting):  # blocking code: gevent makes time.sleep (and sockets) cooperative
        def reply(self, conversation):
            global waiting
            deadline = self.enter()
            while not self.everyone_waiting(deadline):
                time.sleep(0.05)
            waiting -= 1
            return "plain: " + conversation.message.text

    class Async(Waiting):  # a coroutine: awaited on the process's agent loop
        async def reply(self, conversation):
            global waiting
            deadline = self.enter()
            while not self.everyone_waiting(deadline):
                await asyncio.sleep(0.05)
            waiting -= 1
            return "async: " + conversation.message.text

    runners = [make_runner(url, Plain()), make_runner(url, Async())]
    jobs = [gevent.spawn(runners[i % 2].handle, msg(f"m{i}", user=f"u{i}", seq=1)) for i in range(n)]
    gevent.joinall(jobs)
    print(json.dumps({"outcomes": sorted({j.value for j in jobs}, key=str),
                      "errors": [repr(j.exception) for j in jobs if j.exception][:3],
                      "replies": sum(len(sent(r)) for r in runners), "peak_waiting": peak_waiting,
                      "peak_connections": peak_connections}))
""")


def test_one_process_on_greenlets_keeps_a_thousand_agents_waiting_at_once(clean_postgres_url):
    """WORKER_POOL=gevent: plain and async Agents alike wait without a thread each, and the turns around them share
    the engine's few connections (40 at most)."""
    done = subprocess.run([sys.executable, "-c", GEVENT_RUN, clean_postgres_url, "1000", "60"], cwd=REPO, env=os.environ,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["errors"] == [] and result["outcomes"] == ["replied"] and result["replies"] == 1000
    assert result["peak_waiting"] == 1000, result  # all of them waiting at the same time
    assert result["peak_connections"] <= 40, result


GREEN_QUERIES = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    import json, sys, gevent, psycopg
    from sqlalchemy import text
    from shared.db import engine_for
    from shared.greenlets import GreenConnection

    engine, ticks = engine_for(sys.argv[1]), []
    def ticker():
        while True:
            ticks.append(1)
            gevent.sleep(0.01)
    with engine.connect() as c:
        kind = type(c.connection.dbapi_connection).__name__
        t = gevent.spawn(ticker)
        gevent.sleep(0)
        before = len(ticks)
        slept = c.execute(text("select pg_sleep(0.3), 42")).one()[1]  # other greenlets run meanwhile
        during = len(ticks) - before
        t.kill()
        try:
            c.execute(text("select 1/0"))
            error = None
        except Exception as exc:
            error = type(exc.orig).__name__
        c.rollback()
        after = c.execute(text("select repeat('x', 300000)")).scalar()  # a reply larger than a socket read
    print(json.dumps({"kind": kind, "slept": slept, "during": during, "error": error, "after": len(after)}))
""")


def test_on_greenlets_a_query_parks_only_its_own_greenlet(postgres_url):
    """psycopg's own wait goes through gevent's patched poll (a poller, watchers and a timer per wait): on greenlets
    the engine's connections wait on one watcher of the hub instead, and still let other greenlets run."""
    done = subprocess.run([sys.executable, "-c", GREEN_QUERIES, postgres_url], cwd=REPO, env=os.environ,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kind"] == "GreenConnection" and result["slept"] == 42
    assert result["during"] >= 10, result  # the ticker ran while the query waited on the server
    assert result["error"] == "DivisionByZero" and result["after"] == 300000
