"""Who the client is when the ingress sits behind reverse proxies (TRUSTED_PROXIES).

Applied once, around the whole app, so every blueprint's `request.remote_addr` (the web chat's per-address limit,
the session browser's log) and `request.is_secure` are the client's. Forwarded headers are believed only from a
trusted peer, and X-Forwarded-For is read from the right, past trusted proxies only: the first address no trusted
proxy vouches for is the client, so entries a client writes itself are never taken. With no trusted proxy (the
default) the headers are ignored. gunicorn gets the same list (`--forwarded-allow-ips`, cli/main.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any, Callable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> Address | None:
    """An address as proxies write it: bare, or with a port (`1.2.3.4:80`, `[2001:db8::1]:80`); None if not one."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class TrustedProxies:
    """WSGI middleware: REMOTE_ADDR and wsgi.url_scheme as the trusted proxies in front report them."""

    def __init__(self, app: Callable[..., Any], networks: Iterable[Network]):
        self.app = app
        self.networks = tuple(networks)

    def trusted(self, address: Address | None) -> bool:
        return address is not None and any(address in network for network in self.networks)

    def client(self, peer: str, forwarded_for: str) -> str:
        """The client's address: walking X-Forwarded-For from the right while the hop is a trusted proxy."""
        client = _address(peer)
        if not self.trusted(client):
            return peer
        for entry in reversed(forwarded_for.split(",") if forwarded_for else []):
            hop = _address(entry)
            if hop is None:  # a trusted proxy forwarded garbage: the request is that proxy's
                break
            client = hop
            if not self.trusted(hop):
                break
        return str(client)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        peer = environ.get("REMOTE_ADDR") or ""
        if self.networks and self.trusted(_address(peer)):
            environ["REMOTE_ADDR"] = self.client(peer, environ.get("HTTP_X_FORWARDED_FOR", ""))
            proto = environ.get("HTTP_X_FORWARDED_PROTO", "").rpartition(",")[2].strip().lower()
            if proto in ("http", "https"):  # what the proxy next to us says the client used
                environ["wsgi.url_scheme"] = proto
        return self.app(environ, start_response)
