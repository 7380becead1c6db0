"""`chatsessions loadgen` end to end against the real processes (started with cli/stack.py): gunicorn ingress, a
`celery worker` pool, PostgreSQL and Redis; a few sessions on every platform and kind, each message answered once,
in order, in its own chat. Correctness only: no timing is asserted.
"""

from __future__ import annotations

import json
import math
import subprocess

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cli.loadgen import LoadGen, Workload, correct, targets_from_settings
from cli.processes import StackError, free_port, venv_bin
from cli.stack import REPO, Stack
from cli.standins.platforms import StandInPlatforms

pytestmark = pytest.mark.integration

KINDS = {f"{platform}:{kind}" for platform in ("whatsapp", "telegram", "discord") for kind in ("dm", "group")}
REPORT_FIELDS = {"sent", "accepted", "rejected", "replied", "msgs_per_s", "duration_s", "latency_ms",
                 "accept_latency_ms", "lost", "duplicated", "reordered", "misrouted", "by_kind"}
SECRETS = {"LG_WA_APP": "lg-app-secret", "LG_WA_VERIFY": "lg-verify", "LG_WA_ACCESS": "lg-access",
           "LG_TG_BOT": "424242:lg-bot-token", "LG_TG_SECRET": "lg-secret-token", "LG_DC_BOT": "lg-discord-token"}
NO_PACING = "rate_limits = { account_per_s = 10000, account_burst = 10000, chat_per_s = 1000, chat_burst = 1000 }"


def config(standin_port: int) -> str:
    base = f"http://127.0.0.1:{standin_port}"
    return f"""partitions = 4
lease_seconds = 30

[[channels]]
id = "lg-wa"
platform = "whatsapp"
agent = "echo"
api_base = "{base}/lg-wa"
secrets = {{ app_secret = "LG_WA_APP", verify_token = "LG_WA_VERIFY", access_token = "LG_WA_ACCESS" }}
options = {{ phone_number_id = "100000000000777", api_version = "v21.0", {NO_PACING} }}
session = {{ group_reply = "always" }}  # every group message of the load expects its reply

[[channels]]
id = "lg-tg"
platform = "telegram"
agent = "echo"
api_base = "{base}/lg-tg"
secrets = {{ bot_token = "LG_TG_BOT", secret_token = "LG_TG_SECRET" }}
options = {{ bot_username = "LoadGenBot", {NO_PACING} }}
session = {{ group_reply = "always" }}  # every group message of the load expects its reply

[[channels]]
id = "lg-dc"
platform = "discord"
agent = "echo"
api_base = "{base}/lg-dc"
secrets = {{ bot_token = "LG_DC_BOT", public_key = "LG_DC_PUBLIC_KEY" }}
options = {{ application_id = "1270000000000000001", {NO_PACING} }}
"""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A small real deployment whose channels send their replies to a stand-in on `standin_port`."""
    key = Ed25519PrivateKey.generate()
    standin_port = free_port()
    env = dict(SECRETS, LG_DC_PUBLIC_KEY=key.public_key().public_bytes_raw().hex())
    work = tmp_path_factory.mktemp("loadgen")
    stack = Stack(work, env=env, config_text=config(standin_port), db_name=f"chatsessions_lg_{free_port()}")
    try:
        stack.setup()
        stack.start_ingress(workers=1, threads=4)
        stack.start_pool("pool-all", "all", concurrency=4)
        stack.wait_ready()
        stack.wait_pools_ready()
    except StackError as exc:
        stack.teardown()
        pytest.fail(str(exc), pytrace=False)
    try:
        yield stack, key, standin_port
    finally:
        stack.teardown()


def test_loadgen_command_drives_every_platform_and_checks_every_reply(deployment):
    stack, key, _ = deployment
    env = dict(stack.full_env(), LOADGEN_DISCORD_KEY=key.private_bytes_raw().hex())
    done = subprocess.run(
        [str(venv_bin() / "chatsessions"), "loadgen", "--url", stack.url, "--config", stack.env["CHATSESSIONS_CONFIG"],
         "--sessions", "12", "--messages", "3", "--concurrency", "6", "--window", "2", "--json", "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, f"loadgen exited {done.returncode}:\n{done.stdout}\n{done.stderr}\n{stack.tails(20)}"
    report = json.loads(done.stdout)
    assert REPORT_FIELDS <= set(report), sorted(REPORT_FIELDS - set(report))
    assert {"p50", "p95", "p99"} <= set(report["latency_ms"])
    assert set(report["by_kind"]) == KINDS  # WhatsApp, Telegram and Discord, DMs and groups
    assert (report["sent"], report["accepted"], report["replied"], report["rejected"]) == (36, 36, 36, 0)
    assert (report["lost"], report["duplicated"], report["reordered"], report["misrouted"]) == (0, 0, 0, 0), report
    assert report["channels"] == ["lg-wa", "lg-tg", "lg-dc"]


def test_open_loop_workload_in_process(deployment):
    """The engine `chatsessions bench` uses: an open-loop rate, several messages of a session in flight at once."""
    stack, key, standin_port = deployment
    with stack.applied_env():
        from shared.config import load_settings

        settings = load_settings()
    targets, address, warnings = targets_from_settings(settings, key)
    assert (warnings, address) == ([], ("127.0.0.1", standin_port))
    standin = StandInPlatforms(port=standin_port).start()
    gen = LoadGen(stack.url, targets, standin, reply_timeout=60, drain_timeout=30, progress=False)
    try:
        report, = gen.run(Workload("open", sessions=6, messages=4, rate=40))
    finally:
        gen.close()
        standin.stop()
    assert report["mode"] == "open" and report["accepted"] == report["replied"] == 24, report
    assert correct(report), report
    assert report["unmatched_replies"] == 0


def test_status_callbacks_are_answered_200_and_nothing_else(deployment):
    """`--status-callbacks`: WhatsApp's sent/delivered/read webhooks to the WhatsApp DM sessions, each done at its
    200; the ingress writes no log line for them (the `status_callbacks` bench scenario's check, in small)."""
    stack, _, _ = deployment
    ingress_log = stack.proc("ingress").log_path
    before = ingress_log.read_text()
    done = subprocess.run(
        [str(venv_bin() / "chatsessions"), "loadgen", "--url", stack.url, "--config", stack.env["CHATSESSIONS_CONFIG"],
         "--status-callbacks", "--sessions", "4", "--messages", "6", "--concurrency", "4", "--json", "--quiet"],
        cwd=REPO, env=stack.full_env(), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"loadgen exited {done.returncode}:\n{done.stdout}\n{done.stderr}\n{stack.tails(20)}"
    report = json.loads(done.stdout)
    assert (report["sent"], report["accepted"], report["rejected"], report["replied"]) == (24, 24, 0, None), report
    assert set(report["by_kind"]) == {"whatsapp:dm"} and report["channels"] == ["lg-wa"]
    assert report["unmatched_replies"] == 0  # nothing was answered
    assert ingress_log.read_text() == before


def test_waves_at_once_on_the_same_sessions_and_the_pools_connections_named_after_it(deployment):
    """The `waiting_agent` scenario's waves: every session sends at once (rate=inf), then, with `continues=`, the first
    of them send their next messages in the same chats, numbered on; each reply is matched to its wave. The stack
    names each process's database connections after it (PGAPPNAME), which is how the bench counts the pool's."""
    stack, key, standin_port = deployment
    with stack.applied_env():
        from shared.config import load_settings

        settings = load_settings()
    targets, _, _ = targets_from_settings(settings, key)
    standin = StandInPlatforms(port=standin_port).start()
    gen = LoadGen(stack.url, targets, standin, reply_timeout=60, drain_timeout=30, progress=False)
    try:
        first = Workload("first", sessions=6, messages=1, rate=math.inf, senders=6)
        early = Workload("early", sessions=2, messages=1, rate=math.inf, continues=first)
        with pytest.raises(ValueError, match="must have run"):
            gen.prepare(early)
        gen.run(first)
        with pytest.raises(ValueError, match="has 6 sessions, not 7"):
            gen.prepare(Workload("more", sessions=7, messages=1, rate=math.inf, continues=first))
        second = Workload("second", sessions=4, messages=2, rate=math.inf, senders=4, continues=first)
        report, = gen.run(second)
        first_report = gen.report(first)
    finally:
        gen.close()
        standin.stop()
    assert second.run_num == first.run_num and second.plan == first.plan[:4]
    assert sorted(first.msgs) == [(i, 0) for i in range(6)]
    assert sorted(second.msgs) == [(i, k) for i in range(4) for k in (1, 2)]
    assert {m.session.chat_id for m in second.msgs.values()} == {s.chat_id for s in first.plan[:4]}
    assert report["accepted"] == report["replied"] == 8 and first_report["replied"] == 6, json.dumps([report, first_report], default=str)
    assert correct(report) and correct(first_report) and report["unmatched_replies"] == 0
    with psycopg.connect(stack.pg_admin, autocommit=True) as conn:
        names = {r[0] for r in conn.execute("SELECT DISTINCT application_name FROM pg_stat_activity WHERE datname = %s",
                                             (stack.db_name,))}
    assert "pool-all" in names and names <= {p.name for p in stack.procs}, names
