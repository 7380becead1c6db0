"""The webhook ingress (WSGI): each channel's adapter verifies and reads a request (`Inbound.receive`), the ingress
publishes what it found and answers what the adapter says. No platform logic and no turn logic here.

Status codes: 404 unknown channel, 401/403 bad signature, 400 malformed body, 413 too large,
405 wrong method, 503 when the broker cannot take the message (the platform retries), 200 otherwise.
"""

from __future__ import annotations

import structlog
from flask import Flask, Response, jsonify, request

from ingress import browser, webchat
from ingress.proxies import TrustedProxies
from ingress.publisher import Publisher
from shared.channels import Channel, WebhookRequest, build_channel
from shared.config import Settings
from shared.errors import (
    EnqueueFailed,
    HandshakeRefused,
    InvalidSignature,
    MalformedPayload,
    UnknownChannel,
)

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 1024 * 1024
NO_FRAMES = "frame-ancestors 'none'"


def create_app(settings: Settings, publisher: Publisher | None = None) -> Flask:
    app = Flask("chatsessions.ingress")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.wsgi_app = TrustedProxies(app.wsgi_app, settings.trusted_proxies)  # the client's address and scheme
    channels: dict[str, Channel] = {cid: build_channel(c) for cid, c in settings.channels.items()}
    publisher = publisher or Publisher(settings)

    def webhook_request(route: str) -> WebhookRequest:
        return WebhookRequest(
            method=request.method,
            headers={k.lower(): v for k, v in request.headers.items()},
            query=request.args.to_dict(),
            body=request.get_data(cache=False),
            route=route,
        )

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

    @app.errorhandler(UnknownChannel)
    def _unknown(exc: UnknownChannel):
        return reject(404, "unknown channel", str(exc))

    @app.errorhandler(InvalidSignature)
    def _forged(exc: InvalidSignature):
        return reject(401, f"invalid signature: {exc}")

    @app.errorhandler(HandshakeRefused)
    def _refused(exc: HandshakeRefused):
        return reject(403, f"verification failed: {exc}")

    @app.errorhandler(MalformedPayload)
    def _malformed(exc: MalformedPayload):
        return reject(400, f"malformed payload: {exc}")

    @app.errorhandler(EnqueueFailed)
    def _unavailable(exc: EnqueueFailed):
        log.error("ingress.enqueue_failed", reason=str(exc), path=request.path)
        return Response("temporarily unavailable\n", status=503, headers={"Retry-After": "5"}, mimetype="text/plain")

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

    @app.route("/webhooks/<channel_id>", methods=["GET", "POST"])
    @app.post("/webhooks/<channel_id>/<route>")
    def webhook(channel_id: str, route: str = ""):
        """Every platform's webhook: its adapter verifies and reads the request and says what to answer."""
        channel = channels.get(channel_id)
        if channel is None:
            raise UnknownChannel(channel_id)
        answer = channel.receive(webhook_request(route))
        if answer.dropped:
            log.warning("ingress.dropped", reason=answer.dropped, channel=channel_id)
        if answer.messages:
            publisher.publish(list(answer.messages))
        if isinstance(answer.body, str):
            return Response(answer.body, mimetype="text/plain")
        return jsonify(answer.body)

    app.register_blueprint(webchat.blueprint(settings, publisher))  # /chat/<channel_id>: the web chat page
    if not settings.admin_bind:  # else only on its own address (`chatsessions admin`)
        # /admin: the session browser and operator console (only with ADMIN_TOKEN or [[operators]])
        app.register_blueprint(browser.blueprint(settings, publisher))
    return app
