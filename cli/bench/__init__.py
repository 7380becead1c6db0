"""`chatsessions bench` (`make bench`): the real processes on this machine, the scenarios of issue 4, a table and JSON.

Starts a private stack (cli/stack.py): a fresh PostgreSQL database, a private redis-server, `chatsessions ingress`
(gunicorn), BENCH_POOLS worker pools (the command `chatsessions worker` execs) and beat; a StandInPlatforms receives
the replies, a StandInLLM (cli/standins/llm.py) answers the waiting Agent's completions; `chatsessions loadgen`'s
engine (cli.loadgen) plays WhatsApp, Telegram and Discord at it. Scenarios, in run order (pick with
SCENARIOS=e2e,ingress or --scenarios):

  turn         one worker's turn in this process (no stack): CPU ms, transactions and statements per turn
  ceiling      bare Celery no-op tasks (cli/bench_ceiling.py) through the same broker, queues and worker flags
  ingress      webhooks accepted and enqueued, workers stopped: max req/s (closed loop), p99 at BENCH_INGRESS_RATE
  status_callbacks  WhatsApp status webhooks (sent/delivered/read), workers stopped: max req/s, CPU per request,
               and that nothing was enqueued or logged at INFO for them
  e2e          webhook -> queue -> turn (PostgreSQL, demo Agent + echo) -> reply at the stand-in; ratio to ceiling
  hot_session  1,000 sessions at a steady rate, alone and while one session is flooded: the others' p99
  slow_agent   a 200 ms Agent (cli/bench_agents.py:SlowEcho), 1,000 sessions, worker concurrency 1/8/32/64, on one
               pool of each execution model (threads, then gevent: `slow_agent_gevent`)
  waiting_agent  the real OpenAI-compatible Agent against a stand-in LLM that takes 2 s, one gevent pool: waves of
               1,000 sessions sending at once (twice), then 500: turns/s, replies within 2 s + 1 s, RSS, connections
  memory       worker RSS after warm-up and after BENCH_MEMORY_MESSAGES messages over BENCH_MEMORY_SESSIONS sessions
  scale        e2e with 10k and 1M sessions stored (seeded with COPY, 10 messages each) + EXPLAIN of a turn's SQL

Sizes and knobs are environment variables (BENCH_*; `chatsessions bench --help` lists them with defaults);
--quick shrinks every size for a run of a few minutes. Results: a table on stdout, JSON at BENCH_OUT.
Each scenario also records where the machine's CPU went (stack, PostgreSQL, load generator, other processes),
because figures taken while something else loads the machine are not comparable.

This module is the command (its arguments, the choice of scenarios). The rest of the package, one concept a module:
  harness.py      the Bench: the private stack, stand-ins, bench channels and load generator; the run loop, the JSON
  turn.py         the `turn` scenario: a worker's turn profiled in this process
  pipeline.py     ceiling, ingress, status_callbacks, e2e, hot_session: the message path's scenarios
  slow_agents.py  slow_agent and waiting_agent: Agents that take their time, and the waiting scenario's figures
  growth.py       memory and scale (with the EXPLAIN of a turn's statements): what grows
  seeder.py       the scale scenario's sessions, stored with COPY
  pyspy.py        BENCH_PROFILE=1: py-spy recordings of the stack's processes, summarized
  meters.py       CPU by process, sampled peaks, the machine's description and commit cost
  report.py       the targets, which were met, and the table
  knobs.py        the BENCH_* variables and the progress log
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cli.bench.harness import SCENARIOS, Bench
from cli.bench.knobs import KNOBS, Knobs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "environment knobs (default / --quick default):\n" + "\n".join(
        f"  {name:27} {d or '-':>10} / {q or '-':<10} {meaning}" for name, (d, q, meaning) in KNOBS.items())
    parser.add_argument("--scenarios", default=os.environ.get("SCENARIOS") or "all",
                        help=f"comma-separated, from {','.join(SCENARIOS)} (default all; env SCENARIOS)")
    parser.add_argument("--out", default=os.environ.get("BENCH_OUT") or "bench-results.json",
                        help="the JSON results (env BENCH_OUT; default bench-results.json)")
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1",
                        help="small sizes: a few minutes (env BENCH_QUICK=1)")


def main(args: argparse.Namespace) -> int:
    from shared.errors import ConfigError

    names = SCENARIOS if args.scenarios in ("all", "") else tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ConfigError(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    ordered = [n for n in SCENARIOS if n in names]
    bench = Bench(Knobs(args.quick), Path(args.out))
    return bench.run(ordered)
