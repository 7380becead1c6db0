"""`chatsessions check`: validate the config and reach the database, the broker and Redis (and, with --platforms,
each channel's platform API), one line per check; exit 1 if one fails, 2 if the configuration is invalid."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable

from cli.common import FAILED, OK, USAGE, celery_app, print_json, redact
from shared.config import Settings
from shared.errors import ConfigError


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str


def _attempt(name: str, fn: Callable[[], str]) -> CheckResult:
    try:
        return CheckResult(name, True, fn())
    except Exception as exc:  # noqa: BLE001 - a check reports every failure as a line, never a traceback
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if type(exc) is RuntimeError:  # this module's own findings: already worded
            return CheckResult(name, False, message)
        return CheckResult(name, False, f"{exc.__class__.__name__}: {message}" if message else exc.__class__.__name__)


def _check_database(url: str, timeout: float) -> str:
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine, inspect, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    from shared.db import driver_options
    from shared.migrate import alembic_config

    parsed = make_url(url)
    sqlite_file = parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
    if sqlite_file and not os.path.exists(parsed.database):  # connecting would create an empty file
        raise RuntimeError(f"{url}: no database file: run `chatsessions db upgrade`")
    connect_args = {}
    if url.startswith("postgresql"):
        connect_args = {"connect_timeout": max(1, int(timeout))} | driver_options(url)
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                raise RuntimeError("no schema: run `chatsessions db upgrade`")
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    where = parsed.render_as_string(hide_password=True)
    if version != head:
        raise RuntimeError(f"{where}: schema at {version}, this release needs {head}: run `chatsessions db upgrade`")
    return f"{where} (schema {version}, current)"


def _check_broker(settings: Settings, timeout: float) -> str:
    if settings.embedded:
        return "memory:// (in-process: works only inside `chatsessions run`)"
    app = celery_app(settings)
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
    return redact(settings.broker_url)


def _check_redis(url: str | None, timeout: float) -> str:
    if not url:
        return "none (in-process ledger: `chatsessions run` only)"
    from shared.redis_client import redis_client

    client = redis_client(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
        version = client.info("server").get("redis_version", "?")
    finally:
        client.close()
    return f"{redact(url)} (Redis {version})"


def _http_get(url: str, headers: dict[str, str], timeout: float, shown: str) -> Any:
    """GET a platform API; errors name `shown` (the URL without credentials) and the platform's own words."""
    from cli.platform_api import PlatformError, call

    try:
        return call("GET", url, headers=headers, timeout=timeout, shown=shown)
    except PlatformError as exc:
        raise RuntimeError(str(exc)) from None  # worded already: `check` prints it as it is


def _check_platform(channel: Any, timeout: float) -> str:
    """One authenticated read from the platform's API with the configured credentials."""
    base, secrets, options = channel.api_base, channel.secrets, channel.options
    if channel.platform == "whatsapp":
        version = options.get("api_version", "v21.0")
        number = options["phone_number_id"]
        doc = _http_get(f"{base}/{version}/{number}?fields=id,display_phone_number,verified_name",
                        {"Authorization": f"Bearer {secrets['access_token']}"}, timeout,
                        f"{base}/{version}/{number}")
        return f"phone number {doc.get('display_phone_number') or doc.get('id') or number}" + (
            f" ({doc['verified_name']})" if doc.get("verified_name") else "")
    if channel.platform == "telegram":
        doc = _http_get(f"{base}/bot{secrets['bot_token']}/getMe", {}, timeout, f"{base}/bot<token>/getMe")
        if not doc.get("ok"):
            raise RuntimeError(f"getMe answered ok=false: {doc.get('description', '')}")
        username = str(doc.get("result", {}).get("username", ""))
        expected = str(options.get("bot_username", "")).lstrip("@")
        if expected and username.lower() != expected.lower():
            raise RuntimeError(f"the token belongs to @{username}, but options.bot_username is {expected!r}")
        return f"bot @{username}"
    if channel.platform == "discord":
        doc = _http_get(f"{base}/users/@me", {"Authorization": f"Bot {secrets['bot_token']}"}, timeout,
                        f"{base}/users/@me")
        return f"bot {doc.get('username', '?')} ({doc.get('id', '?')})"
    if channel.platform == "webchat":
        return "served by the ingress at /chat/" + channel.id + " (no platform API)"
    raise RuntimeError(f"no API check for platform {channel.platform!r}")


def run_checks(settings: Settings, platforms: bool, timeout: float) -> list[CheckResult]:
    from workers.agents import load_agent
    from shared.channels import build_channel

    results = [CheckResult("config", True, f"{settings.config_path}: {len(settings.channels)} channel(s), "
                                           f"{settings.partitions} partitions, lease {settings.lease_seconds:g}s")]
    for cid, c in settings.channels.items():
        def channel_check(c=c) -> str:
            from cli.connect import telegram_secret_problem

            build_channel(c)
            load_agent(c.agent)
            if problem := telegram_secret_problem(c):
                raise RuntimeError(problem)
            return f"{c.platform}, agent {c.agent}"
        results.append(_attempt(f"channel {cid}", channel_check))
    results.append(_attempt("database", lambda: _check_database(settings.database_url, timeout)))
    results.append(_attempt("broker", lambda: _check_broker(settings, timeout)))
    results.append(_attempt("redis", lambda: _check_redis(settings.redis_url, timeout)))
    if platforms:
        for cid, c in settings.channels.items():
            results.append(_attempt(f"platform {cid}", lambda c=c: _check_platform(c, timeout)))
    return results


def _print_checks(results: list[CheckResult], as_json: bool) -> None:
    if as_json:
        print_json({"ok": all(r.ok for r in results),
                    "checks": [{"name": r.name, "ok": r.ok, "detail": r.detail} for r in results]})
        return
    width = max(len(r.name) for r in results)
    for r in results:
        print(f"{'ok' if r.ok else 'FAIL':4}  {r.name:{width}}  {r.detail}")


def main(args: argparse.Namespace) -> int:
    from shared.config import load_settings

    try:
        settings = load_settings()
    except ConfigError as exc:
        _print_checks([CheckResult("config", False, str(exc))], args.json)
        return USAGE
    results = run_checks(settings, args.platforms, args.timeout)
    _print_checks(results, args.json)
    return OK if all(r.ok for r in results) else FAILED
