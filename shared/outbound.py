"""Outbound HTTP to the platforms: one pooled requests.Session per channel, timeouts, bounded retries."""

from __future__ import annotations

import functools
import json
import os
import random
import threading
import time
from typing import Any, Callable, Protocol
from urllib.parse import urlsplit, urlunsplit

import requests
import structlog
import urllib3

from shared.errors import LeaseLost
from shared.messages import Delivery

log = structlog.get_logger(__name__)

TIMEOUT = (3.05, 15)  # connect, read (seconds)
MAX_ATTEMPTS = 5
MAX_WAIT = 60.0  # never sleep longer than this on one Retry-After


def split_text(text: str, limit: int) -> list[str]:
    """Split text into chunks of at most `limit` characters, preferring line and word boundaries."""
    if len(text) <= limit:
        return [text]
    chunks: list[str] = []
    rest = text
    while len(rest) > limit:
        cut = rest.rfind("\n", 0, limit + 1)
        if cut <= 0:
            cut = rest.rfind(" ", 0, limit + 1)
        if cut <= 0:
            cut = limit
        chunks.append(rest[:cut])
        rest = rest[cut:].lstrip("\n ") if cut < len(rest) else ""
    if rest:
        chunks.append(rest)
    return chunks


def retry_after(response: requests.Response) -> float | None:
    """Seconds to wait from a 429/5xx: the Retry-After header, or Discord/Telegram JSON fields."""
    header = response.headers.get("Retry-After")
    if header:
        try:
            return float(header)
        except ValueError:
            pass
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict):
        if isinstance(body.get("retry_after"), (int, float)):
            return float(body["retry_after"])
        params = body.get("parameters")
        if isinstance(params, dict) and isinstance(params.get("retry_after"), (int, float)):
            return float(params["retry_after"])
    return None


def safe_url(url: str, path: bool = True) -> str:
    """The URL without credentials or query (and without its path if `path` is false), for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path if path else "", "", ""))


# Keep-alive connections kept per host: more than any pool's concurrency (a gevent pool runs 1000 turns at once), so a
# connection is never thrown away (with a WARNING) for lack of room and a fresh TLS handshake paid for its successor.
# urllib3 fills a pool lazily: the size costs nothing until that many requests run at once.
CONNECTIONS_PER_HOST = 1024


class Fence(Protocol):
    """A sender's right to send for one session (workers/dispatch.py: its lease). The send path takes it from the turn
    through the channel to the HTTP request: `check` runs before every request (after any pacing wait) and raises
    LeaseLost once the right is gone; else it returns the monotonic time until which the check counts, which the
    HTTP connection checks again at every socket write (a holder paused in between sends nothing)."""

    def check(self) -> float | None: ...


_fenced = threading.local()  # this thread's current request: the monotonic time its fencing check stops counting


def _check_fence() -> None:
    until = getattr(_fenced, "until", None)
    if until is not None and time.monotonic() > until:
        raise LeaseLost("the fencing check expired before the request was sent (the sender was paused)")


class _FencedSend:
    """Every write of a request to its socket — the headers, then each part of the body — comes right after the
    fencing check is found still counting. A sender stopped (SIGSTOP, a long GC pause) anywhere before a write
    finds it expired when it resumes and writes nothing more: a request whose headers left without its body is
    never complete, so the platform acts on nothing. What is left is the write itself."""

    def send(self, data) -> None:  # http.client.HTTPConnection.send, under urllib3's request()
        if self.sock is None:  # type: ignore[attr-defined]  # connect first (http.client would, inside send)
            self.connect()  # type: ignore[attr-defined]
        _check_fence()
        super().send(data)  # type: ignore[misc]


class _FencedHTTPConnection(_FencedSend, urllib3.connection.HTTPConnection):
    pass


class _FencedHTTPSConnection(_FencedSend, urllib3.connection.HTTPSConnection):
    pass


class _FencedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _FencedHTTPConnection


class _FencedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _FencedHTTPSConnection


class FencedAdapter(requests.adapters.HTTPAdapter):
    """Requests whose every socket write is preceded by the sender's fencing check (see _FencedSend)."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _FencedHTTPPool, "https": _FencedHTTPSPool}

    def send(self, request, *args, **kwargs):
        _check_fence()  # before a connection is even taken
        return super().send(request, *args, **kwargs)


class HttpSender:
    """POSTs JSON with retries on network errors, 429 and 5xx; other 4xx are final unless `retryable` says so.

    `retryable` lets a platform mark its own rate-limit answers as transient (WhatsApp reports some with HTTP 400).
    """

    def __init__(
        self,
        headers: dict[str, str],
        sleep: Callable[[float], None] = time.sleep,
        retryable: Callable[[requests.Response], bool] | None = None,
    ):
        self.session = requests.Session()
        self.session.headers.update(headers)
        # requests reads the environment again on every request (proxies, .netrc, the CA bundle): a third of a send's
        # CPU. Read once instead: the CA bundle here, each host's proxies at its first request.
        self.session.trust_env = False
        self.session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        self._proxies: dict[tuple[str, str], dict[str, str]] = {}
        adapter = FencedAdapter(pool_connections=4, pool_maxsize=CONNECTIONS_PER_HOST)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.sleep = sleep
        self.retryable = retryable

    def post(self, url: str, payload: dict[str, Any], id_of: Callable[[Any], str | None],
             before_attempt: Callable[[], float | None] | None = None) -> Delivery:
        """Send one request; id_of extracts the platform's message id from the JSON answer. `before_attempt`
        (pacing, then the fencing check) runs before every attempt, retries included; what it raises escapes.
        It returns the monotonic time until which its check counts (None: no fence), checked again by the
        adapter right before the request goes on the wire."""
        error = "not attempted"
        for attempt in range(1, MAX_ATTEMPTS + 1):
            _fenced.until = before_attempt() if before_attempt is not None else None
            try:
                response = self._send(url, payload)
            except requests.RequestException as exc:
                error = f"network: {exc.__class__.__name__}"
                wait = None
            else:
                if response.ok:
                    try:
                        body = response.json()
                    except ValueError:
                        body = None
                    msg_id = id_of(body)
                    return Delivery(ok=True, platform_message_ids=(msg_id,) if msg_id else (), attempts=attempt)
                error = f"http {response.status_code}: {response.text[:200]}"
                transient = response.status_code == 429 or response.status_code >= 500
                if not transient and not (self.retryable and self.retryable(response)):
                    return Delivery(ok=False, error=error, attempts=attempt)
                wait = retry_after(response)
            if attempt == MAX_ATTEMPTS:
                break
            delay = min(wait if wait is not None else 0.5 * 2 ** (attempt - 1) * (1 + random.random()), MAX_WAIT)
            # Only the host: a path may hold a bot token (Telegram) or a chat id (Discord).
            log.warning("outbound.retry", url=safe_url(url, path=False), attempt=attempt, wait_s=round(delay, 2),
                        error=error)
            self.sleep(delay)
        return Delivery(ok=False, error=error, attempts=MAX_ATTEMPTS)

    def _send(self, url: str, payload: dict[str, Any]) -> requests.Response:
        """POST the payload as JSON through the session's adapter, without `Session.request`: its merging of
        settings, cookies, hooks and the environment for every request was a third of a send's CPU, none of which a
        platform's API uses (no cookies; a 3xx is an error here, not followed)."""
        body = json.dumps(payload, allow_nan=False).encode()
        request = requests.PreparedRequest()
        request.method, request.url, request.body, request.hooks = "POST", _checked_url(url), body, {"response": []}
        request.headers = requests.structures.CaseInsensitiveDict(self.session.headers)
        request.headers["Content-Type"] = "application/json"
        request.headers["Content-Length"] = str(len(body))
        response = self.session.get_adapter(url).send(request, timeout=TIMEOUT, verify=self.session.verify,
                                                      proxies=self._proxies_for(url))
        response.content  # read it whole: the connection goes back to the pool now, not when the response is freed
        return response

    def _proxies_for(self, url: str) -> dict[str, str]:
        """HTTP(S)_PROXY / NO_PROXY from the environment for this URL's host, read once per host."""
        host = urlsplit(url)[:2]
        if host not in self._proxies:
            self._proxies[host] = requests.utils.get_environ_proxies(url)
        return self._proxies[host]


@functools.lru_cache(maxsize=4096)  # a channel sends to few URLs (Discord: one per channel it answers in)
def _checked_url(url: str) -> str:
    """The URL as requests would send it (checked, IDNA host, quoted path), worked out once per URL."""
    request = requests.PreparedRequest()
    request.prepare_url(url, None)
    return request.url


def send_chunks(text: str, limit: int, send_one: Callable[[int, str], Delivery]) -> Delivery:
    """Send a long reply as chunks of at most `limit` characters, in order, stopping at the first failure.
    `send_one(index, chunk)`: the index is stable for a given text, so a chunk can be recognised when sent again."""
    deliveries: list[Delivery] = []
    for index, chunk in enumerate(split_text(text, limit)):
        deliveries.append(send_one(index, chunk))
        if not deliveries[-1].ok:
            break
    return combine(deliveries)


def combine(deliveries: list[Delivery]) -> Delivery:
    """One Delivery for a reply sent in several chunks: ok only if every chunk was."""
    ids = tuple(i for d in deliveries for i in d.platform_message_ids)
    failed = [d for d in deliveries if not d.ok]
    return Delivery(
        ok=not failed,
        platform_message_ids=ids,
        error=failed[0].error if failed else None,
        attempts=sum(d.attempts for d in deliveries),
    )
