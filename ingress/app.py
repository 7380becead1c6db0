"""The webhook ingress (WSGI): each channel's adapter verifies and reads a request (`Inbound.receive`), the ingress
publishes what it found and answers what the adapter says (ingress/webhooks.py, before Flask); Flask serves the rest
(health, the web chat, the session browser). No platform logic and no turn logic here.

Status codes: 404 unknown channel, 401/403 bad signature, 400 malformed body, 413 too large,
405 wrong method, 503 when the broker cannot take the message (the platform retries), 200 otherwise.
"""

from __future__ import annotations

import structlog
from flask import Flask, Response, request

from ingress import browser, webchat
from ingress.proxies import TrustedProxies
from ingress.publisher import Publisher
from ingress.webhooks import MAX_BODY_BYTES, NO_FRAMES, REFUSED, RETRY_AFTER_S, Webhooks, refusal
from shared.channels import Channel, build_channel
from shared.config import Settings
from shared.errors import EnqueueFailed

log = structlog.get_logger(__name__)


def create_app(settings: Settings, publisher: Publisher | None = None) -> Flask:
    app = Flask("chatsessions.ingress")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    channels: dict[str, Channel] = {cid: build_channel(c) for cid, c in settings.channels.items()}
    publisher = publisher or Publisher(settings)
    # The webhooks are served before Flask (ingress/webhooks.py); the client's address and scheme before both.
    app.wsgi_app = TrustedProxies(Webhooks(channels, publisher, app.wsgi_app), settings.trusted_proxies)

    def reject(status: int, reason: str, channel_id: str | None = None) -> Response:
        if channel_id is None:
            channel_id = request.view_args.get("channel_id", "?") if request.view_args else "?"
        log.warning("ingress.rejected", status=status, reason=reason, channel=channel_id, path=request.path)
        return Response(reason + "\n", status=status, mimetype="text/plain")

    @app.after_request
    def _hardened(response: Response) -> Response:
        """Every answer: never MIME-sniffed, never framed — unless its own Content-Security-Policy already says who
        may frame it (the web chat page, per channel; the session browser sets all its headers itself)."""
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        policy = response.headers.get("Content-Security-Policy")
        if policy is None or "frame-ancestors" not in policy:
            response.headers["Content-Security-Policy"] = f"{policy}; {NO_FRAMES}" if policy else NO_FRAMES
            response.headers.setdefault("X-Frame-Options", "DENY")
        return response

    def _refused(exc: Exception):
        return reject(*refusal(exc))

    for refused in REFUSED:  # the web chat's
        app.register_error_handler(refused, _refused)

    @app.errorhandler(EnqueueFailed)
    def _unavailable(exc: EnqueueFailed):
        log.error("ingress.enqueue_failed", reason=str(exc), path=request.path)
        return Response("temporarily unavailable\n", status=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                        mimetype="text/plain")

    @app.errorhandler(405)
    def _wrong_method(exc):
        log.warning("ingress.rejected", status=405, reason=f"method {request.method} not allowed", path=request.path)
        return exc.get_response()

    @app.errorhandler(413)
    def _too_large(_exc):
        return reject(413, f"body larger than {MAX_BODY_BYTES} bytes")

    @app.get("/healthz")
    def healthz():
        return Response("ok\n", mimetype="text/plain")

    @app.get("/readyz")
    def readyz():
        try:
            publisher.ready()
        except Exception as exc:
            log.warning("ingress.not_ready", reason=exc.__class__.__name__)
            return Response("broker unreachable\n", status=503, mimetype="text/plain")
        return Response("ready\n", mimetype="text/plain")

    app.register_blueprint(webchat.blueprint(settings, publisher))  # /chat/<channel_id>: the web chat page
    if not settings.admin_bind:  # else only on its own address (`chatsessions admin`)
        # /admin: the session browser and operator console (only with ADMIN_TOKEN or [[operators]])
        app.register_blueprint(browser.blueprint(settings, publisher))
    return app
