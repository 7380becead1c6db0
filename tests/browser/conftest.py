"""The browser tests' stack and browsers: headless Chromium (Debian's `chromium` and `chromium-driver`) driven by
Selenium, against the REAL stack of tests/integration — gunicorn ingress, two celery worker pools, beat,
PostgreSQL and Redis — whose fixtures and helpers are imported from there, not copied.

The stack differs in its settings only, so it gets its own Redis database (BROWSER_REDIS_URL, default
redis://127.0.0.1:6379/10) and lives for one module of this directory: web chat channels ("web", demo Agent) and
ADMIN_TOKEN and [[operators]], which turn the session browser and operator console on. Chromium missing is a
FAILURE, never a skip: `make setup`
installs it (`apt-get install -y chromium chromium-driver`). Selenium is given the driver path, so
selenium-manager never runs (and never downloads anything): it is made to fail if anything calls it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.selenium_manager import SeleniumManager

from shared.accounts import hash_password
from integration.conftest import (  # the integration stack: fixtures, helpers, and its process checks and log tails
    Stack,
    _stack_alive,
    pg_database,
    pytest_runtest_makereport,
    running_stack,
    standin,
)

__all__ = ["_stack_alive", "pg_database", "pytest_runtest_makereport", "standin"]  # re-exported for this directory

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1100,800"]
REDIS_URL = os.environ.get("BROWSER_REDIS_URL", "redis://127.0.0.1:6379/10")
ADMIN_TOKEN = "browser-admin-token-4Fq9Lw-session-browser"
WEB = "web"  # the web chat channel (demo Agent)
WEB_TITLE = "Acme support"
EMBED = "web-embed"  # a web chat channel that another site (http://localhost:<any port>) may show in an iframe
# The operator console's accounts ([[operators]]): two operators and a viewer, passwords stored only as hashes.
OPERATORS = {"maria": ("operator", "maria-console-password-1"), "joao": ("operator", "joao-console-password-2"),
             "vera": ("viewer", "vera-console-password-3")}


def webchat_toml() -> str:
    operators = [f'[[operators]]\nname = "{name}"\nrole = "{role}"\npassword_hash = "{hash_password(password)}"\n'
                 for name, (role, password) in OPERATORS.items()]
    return "\n".join(["[[channels]]", f'id = "{WEB}"', 'platform = "webchat"', 'agent = "demo"',
                      f'options = {{ title = "{WEB_TITLE}" }}', 'session = { operator_prefix = "{operator}: " }', "",
                      "[[channels]]", f'id = "{EMBED}"', 'platform = "webchat"', 'agent = "demo"',
                      """options = { frame_ancestors = ["'self'", "http://localhost:*"] }""", "", *operators])


@pytest.fixture(scope="module")
def stack(pg_database, standin, tmp_path_factory) -> Iterator[Stack]:
    """The integration stack's processes (same commands, same readiness checks) with the web chat channel and the
    session browser turned on."""
    work = tmp_path_factory.mktemp("browser-stack")
    with running_stack(work, pg_database, standin, extra_config=webchat_toml(),
                       redis_url=REDIS_URL, extra_env={"ADMIN_TOKEN": ADMIN_TOKEN}, name="browser") as running:
        yield running


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
                    "make setup does it)", pytrace=False)
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
