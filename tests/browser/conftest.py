"""The browser tests' stack and browsers: headless Chromium (Debian's `chromium` and `chromium-driver`) driven by
Selenium, against the REAL stack of tests/integration — gunicorn ingress, two celery worker pools, beat,
PostgreSQL and Redis — whose fixtures and helpers are imported from there, not copied.

The stack differs in two settings only, so it gets its own Redis database (BROWSER_REDIS_URL, default
redis://127.0.0.1:6379/10) and lives for this directory's module only: a web chat channel ("web", demo Agent)
and ADMIN_TOKEN, which turns the session browser on. Chromium missing is a FAILURE, never a skip: .ci/run
installs it (`apt-get install -y chromium chromium-driver`). Selenium is given the driver path, so
selenium-manager never runs (and never downloads anything): it is made to fail if anything calls it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.selenium_manager import SeleniumManager

from integration.conftest import (  # the integration stack: fixtures and helpers
    REPO,
    SECRETS,
    VENV_BIN,
    Proc,
    Stack,
    _free_port,
    _stop,
    _wait_consuming,
    _wait_ready,
    config_toml,
    pg_database,
    standin,
)

__all__ = ["pg_database", "standin"]  # fixtures, re-exported for this directory

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1100,800"]
REDIS_URL = os.environ.get("BROWSER_REDIS_URL", "redis://127.0.0.1:6379/10")
ADMIN_TOKEN = "browser-admin-token-4Fq9Lw"
WEB = "web"  # the web chat channel (demo Agent)
WEB_TITLE = "Acme support"

_STACK: Stack | None = None


def webchat_toml() -> str:
    return "\n".join(["[[channels]]", f'id = "{WEB}"', 'platform = "webchat"', 'agent = "demo"',
                      f'options = {{ title = "{WEB_TITLE}" }}', ""])


@pytest.fixture(scope="module")
def browser_redis() -> Iterator[redis.Redis]:
    """This stack's Redis database (broker, ledger, reply boxes), flushed; FAILS when Redis is unreachable."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5, socket_timeout=10)
    try:
        client.ping()
        client.flushdb()
    except redis.RedisError as exc:
        client.close()
        pytest.fail(f"browser tests need Redis at {REDIS_URL}; it is not reachable: {exc}", pytrace=False)
    yield client
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture(scope="module")
def stack(pg_database, browser_redis, standin, tmp_path_factory, request) -> Iterator[Stack]:
    """The integration stack's processes (same commands, same readiness checks) with the web chat channel."""
    global _STACK
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    work = tmp_path_factory.mktemp("browser-stack")
    discord_key = Ed25519PrivateKey.generate()
    public_key = discord_key.public_key().public_bytes_raw().hex()
    config = work / "channels.toml"
    config.write_text(config_toml(standin, public_key) + "\n" + webchat_toml())
    database_url = pg_database.replace("postgresql://", "postgresql+psycopg://", 1)
    env = {k: v for k, v in os.environ.items()
           if k not in ("LEASE_SECONDS", "VISIBILITY_TIMEOUT", "WORKER_CONCURRENCY", "LOG_LEVEL", "BIND")}
    env.update(SECRETS)
    env.update(IT_DC_PUBLIC_KEY=public_key, CHATSESSIONS_CONFIG=str(config), DATABASE_URL=database_url,
               BROKER_URL=REDIS_URL, REDIS_URL=REDIS_URL, PARTITIONS="16", SWEEP_SECONDS="1", LOG_FORMAT="json",
               PYTHONUNBUFFERED="1", ADMIN_TOKEN=ADMIN_TOKEN,
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    stack = Stack(url="", env=env, database_url=database_url, pg_url=pg_database, redis=browser_redis,
                  standin=standin, discord_key=discord_key, log_dir=work)
    upgrade = stack.cli("db", "upgrade", timeout=120)
    if upgrade.returncode != 0:
        pytest.fail(f"`chatsessions db upgrade` failed:\n{upgrade.stdout}\n{upgrade.stderr}", pytrace=False)
    port = _free_port()
    stack.url = f"http://127.0.0.1:{port}"
    commands = {
        "ingress": ["ingress", "--bind", f"127.0.0.1:{port}", "--workers", "2"],
        "worker-a": ["worker", "--partitions", "0-7", "--concurrency", "8", "--name", "browser-a@%h"],
        "worker-b": ["worker", "--partitions", "8-15", "--concurrency", "8", "--name", "browser-b@%h"],
        "beat": ["beat", "--schedule", str(work / "beat-schedule")],
    }
    _STACK = stack
    try:
        for name, args in commands.items():
            log_path = work / f"{name}.log"
            log_file = open(log_path, "wb")  # noqa: SIM115 - closed in _stop, after the process exits
            popen = subprocess.Popen([str(VENV_BIN / "chatsessions"), *args], env=env, cwd=REPO,
                                     stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            stack.procs.append(Proc(name, popen, log_path, log_file))
        _wait_ready(stack)
        _wait_consuming(stack)
        yield stack
    finally:
        killed = _stop(stack.procs)
        _STACK = None
        if killed:
            print(f"\nbrowser stack: {killed} ignored SIGTERM and were killed; logs in {work}", file=sys.stderr)


@pytest.fixture(autouse=True)
def _stack_alive(stack):
    stack.assert_alive()
    yield
    stack.assert_alive()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _STACK is not None and _STACK.procs:
        report.sections.append(("chatsessions process logs (tails)", _STACK.tails(60)))


# --------------------------------------------------------------------------------------------------------------------
# Chromium


def _no_selenium_manager(*_args, **_kwargs):
    raise AssertionError("selenium-manager was asked for a driver: it must never run (it downloads browsers)")


@pytest.fixture(scope="module")
def chromium(tmp_path_factory) -> Iterator[Callable[..., webdriver.Chrome]]:
    """A factory of headless Chromium sessions, each with a fresh profile (its own cookies: its own visitor).
    `chromium(headers={...})` sends extra HTTP headers on every request (e.g. Authorization);
    `network_log=True` records the DevTools network events (what the browser got, e.g. a 401 it prompts for)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        pytest.fail(f"browser tests need {missing} (Debian: apt-get install -y chromium chromium-driver; "
                    ".ci/run does it)", pytrace=False)
    saved = SeleniumManager.binary_paths
    SeleniumManager.binary_paths = _no_selenium_manager
    drivers: list[webdriver.Chrome] = []

    def start(headers: dict[str, str] | None = None, network_log: bool = False) -> webdriver.Chrome:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        if network_log:  # driver.get_log("performance"): the DevTools network events (status codes)
            options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
        for flag in CHROME_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        drivers.append(driver)
        driver.set_page_load_timeout(60)
        if headers:
            driver.execute_cdp_cmd("Network.enable", {})
            driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": headers})
        return driver

    try:
        yield start
    finally:
        for driver in drivers:
            try:
                driver.quit()
            except Exception as exc:  # a crashed browser: nothing left to close
                print(f"chromium: quit failed: {exc!r}", file=sys.stderr)
        SeleniumManager.binary_paths = saved
