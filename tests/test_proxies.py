"""ingress/proxies.py: the client's address and scheme behind the operator's proxies (TRUSTED_PROXIES), as every
blueprint sees them through the real app (`request.remote_addr`, `request.is_secure`)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from flask import request

from ingress.app import create_app
from ingress.ledger import MemoryLedger
from ingress.publisher import Publisher
from shared.config import load_settings

CONFIG = """
[[channels]]
id = "web"
platform = "webchat"
agent = "echo"
"""


def client_for(tmp_path: Path, trusted: str = "") -> Any:
    """The real app with one extra route that shows what a blueprint sees of the client."""
    (tmp_path / "channels.toml").write_text(CONFIG)
    settings = load_settings({"CHATSESSIONS_CONFIG": str(tmp_path / "channels.toml"), "BROKER_URL": "memory://",
                              "DATABASE_URL": f"sqlite:///{tmp_path}/p.db", "TRUSTED_PROXIES": trusted})
    app = create_app(settings, Publisher(settings, ledger=MemoryLedger()))
    app.add_url_rule("/whoami", "whoami", lambda: {"addr": request.remote_addr, "secure": request.is_secure})
    return app.test_client()


def seen(client: Any, peer: str, **headers: str) -> tuple[str, bool]:
    doc = client.get("/whoami", environ_base={"REMOTE_ADDR": peer},
                     headers={k.replace("_", "-"): v for k, v in headers.items()}).json
    return doc["addr"], doc["secure"]


SPOOF = {"X_Forwarded_For": "203.0.113.7", "X_Forwarded_Proto": "https"}


def test_by_default_nobody_is_trusted_and_forwarded_headers_are_ignored(tmp_path):
    client = client_for(tmp_path)
    assert seen(client, "198.51.100.20", **SPOOF) == ("198.51.100.20", False)
    assert seen(client, "127.0.0.1", **SPOOF) == ("127.0.0.1", False)  # not even from this host


def test_a_trusted_proxy_reports_the_client(tmp_path):
    client = client_for(tmp_path, "10.0.0.0/8, 2001:db8::/32")
    assert seen(client, "10.1.2.3", **SPOOF) == ("203.0.113.7", True)
    assert seen(client, "2001:db8::5", X_Forwarded_For="2001:db8:ffff::1, 198.51.100.9") == ("198.51.100.9", False)
    # A peer outside the list is the client itself, whatever it claims.
    assert seen(client, "198.51.100.20", **SPOOF) == ("198.51.100.20", False)


@pytest.mark.parametrize("forwarded_for, client", [
    ("6.6.6.6, 203.0.113.7", "203.0.113.7"),  # the client wrote 6.6.6.6 itself: the proxy appended the real one
    ("6.6.6.6, 203.0.113.7, 10.9.9.9", "203.0.113.7"),  # two proxies: walked past the trusted one only
    ("10.0.0.1, 10.0.0.2", "10.0.0.1"),  # every hop trusted: the leftmost
    ("203.0.113.7:51234", "203.0.113.7"),  # with a port
    ("[2001:db8::7]:443", "2001:db8::7"),
    ("not-an-address", "10.1.2.3"),  # garbage after a trusted proxy: the request is that proxy's
    ("6.6.6.6, garbage, 203.0.113.7", "203.0.113.7"),
    ("", "10.1.2.3"),  # a trusted peer that forwards nothing: the peer
])
def test_x_forwarded_for_is_read_from_the_right_past_trusted_proxies_only(tmp_path, forwarded_for, client):
    assert seen(client_for(tmp_path, "10.0.0.0/8"), "10.1.2.3", X_Forwarded_For=forwarded_for)[0] == client


@pytest.mark.parametrize("proto, secure", [("https", True), ("HTTPS", True), ("http", False), ("http, https", True),
                                           ("https, http", False), ("ftp", False), ("", False)])
def test_the_scheme_is_what_the_nearest_trusted_proxy_says(tmp_path, proto, secure):
    assert seen(client_for(tmp_path, "10.0.0.1"), "10.0.0.1", X_Forwarded_Proto=proto)[1] is secure


def test_trusted_proxies_is_parsed_once_in_settings(tmp_path):
    (tmp_path / "channels.toml").write_text(CONFIG)
    env = {"CHATSESSIONS_CONFIG": str(tmp_path / "channels.toml")}
    assert load_settings(env).trusted_proxies == ()
    assert load_settings({**env, "TRUSTED_PROXIES": " 10.0.0.0/8,,192.0.2.1 ,::1"}).trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.1/32"), ipaddress.ip_network("::1/128"))
