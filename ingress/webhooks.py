"""The webhook route, served as plain WSGI in front of the Flask app.

A webhook is the request the ingress serves most (and WhatsApp posts three status callbacks for every reply sent),
so it skips Flask: its request context, URL map and response objects were three quarters of a webhook's CPU in
the process, the channel's own work (verify, parse) the rest. Every other path (health, the web chat, the session
browser) goes on to Flask. The answers are those of any other route: the same statuses and `ingress.rejected`
lines (`refusal`, shared with the Flask app's handlers), the same hardened headers.

    /webhooks/<channel id>            GET (a platform's handshake), HEAD, POST
    /webhooks/<channel id>/<route>    POST (Discord's interactions endpoint)
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import parse_qsl

import structlog

from ingress.publisher import Publisher
from shared.channels import Channel, WebhookRequest
from shared.errors import EnqueueFailed, HandshakeRefused, InvalidSignature, MalformedPayload, UnknownChannel

log = structlog.get_logger(__name__)

PREFIX = "/webhooks/"
MAX_BODY_BYTES = 1024 * 1024
NO_FRAMES = "frame-ancestors 'none'"
HARDENED = [("X-Content-Type-Options", "nosniff"), ("Content-Security-Policy", NO_FRAMES), ("X-Frame-Options", "DENY")]
REFUSED = (UnknownChannel, InvalidSignature, HandshakeRefused, MalformedPayload)
RETRY_AFTER_S = 5  # a 503's Retry-After: the broker is away

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def refusal(exc: Exception) -> tuple[int, str]:
    """A refused request's status and the reason it is answered and logged with."""
    if isinstance(exc, UnknownChannel):
        return 404, "unknown channel"
    if isinstance(exc, HandshakeRefused):  # (an InvalidSignature too)
        return 403, f"verification failed: {exc}"
    if isinstance(exc, InvalidSignature):
        return 401, f"invalid signature: {exc}"
    return 400, f"malformed payload: {exc}"


class BodyTooLarge(Exception):
    pass


class Webhooks:
    def __init__(self, channels: Mapping[str, Channel], publisher: Publisher, app: WSGIApp):
        self.channels, self.publisher, self.app = channels, publisher, app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        target = _target(path)
        if target is None:
            return self.app(environ, start_response)
        method = environ.get("REQUEST_METHOD", "GET")
        status, body, headers = self._answer(environ, method, path, *target)
        start_response(f"{status} {HTTPStatus(status).phrase}",
                       [*headers, ("Content-Length", str(len(body))), *HARDENED])
        return [] if method == "HEAD" else [body]

    def _answer(self, environ: dict[str, Any], method: str, path: str, channel_id: str,
                route: str) -> tuple[int, bytes, list[tuple[str, str]]]:
        allowed = ("GET", "HEAD", "POST") if not route else ("POST",)
        if method not in allowed:
            return _rejected(405, f"method {method} not allowed", channel_id, path, [("Allow", ", ".join(allowed))])
        try:
            body = _body(environ)
        except BodyTooLarge:
            return _rejected(413, f"body larger than {MAX_BODY_BYTES} bytes", channel_id, path)
        except ValueError:
            return _rejected(400, "bad Content-Length", channel_id, path)
        try:
            channel = self.channels.get(channel_id)
            if channel is None:
                raise UnknownChannel(channel_id)
            answer = channel.receive(WebhookRequest(method="GET" if method == "HEAD" else method,
                                                    headers=_headers(environ), query=_query(environ), body=body,
                                                    route=route))
            if answer.dropped:
                log.warning("ingress.dropped", reason=answer.dropped, channel=channel_id)
            if answer.messages:
                self.publisher.publish(list(answer.messages))
        except REFUSED as exc:
            return _rejected(*refusal(exc), channel_id, path)
        except EnqueueFailed as exc:
            log.error("ingress.enqueue_failed", reason=str(exc), path=path)
            return 503, b"temporarily unavailable\n", [("Content-Type", "text/plain; charset=utf-8"),
                                                        ("Retry-After", str(RETRY_AFTER_S))]
        if isinstance(answer.body, str):
            return 200, answer.body.encode(), [("Content-Type", "text/plain; charset=utf-8")]
        return 200, json.dumps(answer.body, separators=(",", ":")).encode() + b"\n", [("Content-Type",
                                                                                      "application/json")]


def _target(path: str) -> tuple[str, str] | None:
    """(channel id, route) of a webhook path; None for any other path (Flask answers it, 404 if nothing matches)."""
    if not path.startswith(PREFIX):
        return None
    parts = path[len(PREFIX):].split("/")
    if len(parts) > 2 or not all(parts):
        return None
    return parts[0], parts[1] if len(parts) == 2 else ""


def _rejected(status: int, reason: str, channel_id: str, path: str,
              headers: Iterable[tuple[str, str]] = ()) -> tuple[int, bytes, list[tuple[str, str]]]:
    log.warning("ingress.rejected", status=status, reason=reason, channel=channel_id, path=path)
    return status, (reason + "\n").encode(), [("Content-Type", "text/plain; charset=utf-8"), *headers]


def _body(environ: dict[str, Any]) -> bytes:
    """The request's body, at most MAX_BODY_BYTES (BodyTooLarge beyond; ValueError for a bad Content-Length)."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        size = int(length)
        if size < 0:
            raise ValueError(length)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge()
        return stream.read(size)
    if environ.get("wsgi.input_terminated"):  # chunked: the server ends the stream
        body = stream.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            raise BodyTooLarge()
        return body
    return b""


def _headers(environ: dict[str, Any]) -> dict[str, str]:
    """The request's headers, names lower-case (as WebhookRequest has them)."""
    headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items()
               if key.startswith("HTTP_") and key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH")}
    for key, name in (("CONTENT_TYPE", "content-type"), ("CONTENT_LENGTH", "content-length")):
        if environ.get(key):
            headers[name] = environ[key]
    return headers


def _query(environ: dict[str, Any]) -> dict[str, str]:
    """The query's parameters, the first value of each (as Flask's `request.args.to_dict()`)."""
    raw = environ.get("QUERY_STRING", "")
    if not raw:
        return {}
    query: dict[str, str] = {}
    for name, value in parse_qsl(raw.encode("latin-1").decode("utf-8", "replace"), keep_blank_values=True,
                                 errors="replace"):
        query.setdefault(name, value)
    return query
