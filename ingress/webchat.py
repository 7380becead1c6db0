"""The web chat's HTTP side: the page, the visitor's POSTs (through the same Publisher as every webhook) and
the polling endpoint that reads replies from the reply box. The visitor is a random id in a cookie the server
signed; past the cookie it is known by its pseudonym only (shared/channels/webchat.py).

  GET  /chat/<channel>                   the page (sets the visitor cookie if missing)
  POST /chat/<channel>/messages          {"id": ..., "text": ...} or {"id": ..., "command": "new"}
  GET  /chat/<channel>/replies?after=C   entries after cursor C (JSON), polled by the page

Status codes: 404 not a web chat channel, 400 bad or unsigned cookie, body or cursor, 413 text too long, 415 not JSON,
429 over one of the channel's limits — per visitor, per client address, for the whole channel — (Retry-After),
503 (Retry-After) when the broker, the reply box or the limits' Redis is down: the page retries with the same
message id, so no duplicate. Without its limits the ingress refuses rather than lets everything through (an
outage must not open the door to a flood; the publish would fail with Redis down anyway).
"""

from __future__ import annotations

import ipaddress
import math

import structlog
from flask import Blueprint, Response, jsonify, render_template, request

from ingress.publisher import Publisher
from shared.channels.webchat import TextTooLong, WebChatChannel, new_visitor_cookie, visitor_pseudonym
from shared.config import Settings
from shared.errors import MalformedPayload, UnknownChannel
from shared.ratelimit import LocalLimiter, RedisLimiter
from shared.replybox import CURSOR, reply_box
from shared.signing import keyed_hash

log = structlog.get_logger(__name__)

COOKIE = "chatsessions_visitor"  # "__Host-chatsessions_visitor" with SECURE_COOKIES (cookie_name)
COOKIE_MAX_AGE = 365 * 24 * 3600
NO_VISITOR = "visitor cookie missing, malformed or not issued by this server (reload the page)"
POLL_MS = 1000  # how often an idle page asks for replies; faster while it waits for one


def cookie_name(secure: bool) -> str:
    """The visitor cookie's name: with the __Host- prefix when Secure, so the browser keeps it only as this host set
    it (Secure, Path=/, no Domain) — no sibling subdomain or plain-http page can plant or shadow it."""
    return f"__Host-{COOKIE}" if secure else COOKIE


def address_of(remote_addr: str | None) -> str:
    """What the per-address limit counts: the client's address, an IPv6 one by its /64 (a host usually has a
    whole /64 to pick addresses from)."""
    try:
        address = ipaddress.ip_address(remote_addr or "")
    except ValueError:
        return remote_addr or "-"
    if address.version == 6 and address.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address if address.version == 4 else address.ipv4_mapped)


PAGE_CSP = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'"


def blueprint(settings: Settings, publisher: Publisher) -> Blueprint:
    bp = Blueprint("webchat", __name__, template_folder="templates", static_folder="static/webchat",
                   static_url_path="/chat-static")
    box = reply_box(settings.redis_url)
    channels = {cid: WebChatChannel(c, box=box) for cid, c in settings.channels.items() if c.platform == "webchat"}
    limiter = RedisLimiter(settings.redis_url) if settings.redis_url else LocalLimiter()
    cookie = cookie_name(settings.secure_cookies)

    def channel_for(channel_id: str) -> WebChatChannel:
        if channel_id not in channels:
            raise UnknownChannel(channel_id)
        return channels[channel_id]

    def reject(status: int, reason: str, channel_id: str) -> Response:
        log.warning("ingress.rejected", status=status, reason=reason, channel=channel_id, path=request.path)
        response = jsonify({"error": reason})
        response.status_code = status
        return response

    def unavailable(retry_s: int) -> Response:
        """503 with Retry-After (the caller logged why): the page retries."""
        response = jsonify({"error": "temporarily unavailable"})
        response.status_code = 503
        response.headers["Retry-After"] = str(retry_s)
        return response

    def visitor() -> str | None:
        """The visitor's pseudonym, if the request carries a visitor cookie this server issued (the first one: a
        browser may also send an old cookie of the same name, set for the path /chat/ before Path=/)."""
        found = (visitor_pseudonym(settings.secret_key, value) for value in request.cookies.getlist(cookie))
        return next((pseudonym for pseudonym in found if pseudonym), None)

    @bp.get("/chat/<channel_id>")
    def page(channel_id: str):
        channel = channel_for(channel_id)
        current = visitor()
        html = render_template("webchat/page.html", channel_id=channel_id, title=channel.title,
                               max_chars=channel.max_chars, poll_ms=POLL_MS)
        response = Response(html, mimetype="text/html")
        framing = " ".join(channel.frame_ancestors)
        response.headers["Content-Security-Policy"] = f"{PAGE_CSP}; frame-ancestors {framing}"
        # X-Frame-Options for browsers without frame-ancestors; it cannot name other sites (then CSP alone decides).
        frame_options = {("'none'",): "DENY", ("'self'",): "SAMEORIGIN"}.get(channel.frame_ancestors)
        if frame_options:
            response.headers["X-Frame-Options"] = frame_options
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "same-origin"
        if current is None:  # first visit (or a cookie we did not issue): a new visitor, a new session
            # In another site's iframe only a SameSite=None cookie is sent; Partitioned keeps it that site's alone.
            elsewhere = settings.secure_cookies and channel.framed_elsewhere
            response.set_cookie(cookie, new_visitor_cookie(settings.secret_key), max_age=COOKIE_MAX_AGE,
                                httponly=True, secure=settings.secure_cookies, path="/",
                                samesite="None" if elsewhere else "Lax", partitioned=elsewhere)
            if request.cookies.get(cookie) is not None:
                log.info("webchat.cookie_replaced", channel=channel_id,
                         reason="visitor cookie malformed or not issued by this server")
        return response

    @bp.post("/chat/<channel_id>/messages")
    def post_message(channel_id: str):
        channel = channel_for(channel_id)
        if not request.is_json:  # also keeps cross-site forms out: they cannot send application/json
            return reject(415, "Content-Type must be application/json", channel_id)
        who = visitor()
        if who is None:
            return reject(400, NO_VISITOR, channel_id)
        address = keyed_hash(settings.secret_key, "address", address_of(request.remote_addr))  # no address in Redis
        limits = channel.inbound_limits(who, address)
        try:
            wait, limited = limiter.take(list(limits))
        except Exception as exc:  # no limits, no entry (and the ledger shares this Redis: publish would fail too)
            log.error("webchat.limiter_unreachable", channel=channel_id, error=exc.__class__.__name__)
            return unavailable(retry_s=5)
        if wait > 0:
            response = reject(429, limits[limited], channel_id)
            response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
            return response
        try:
            message = channel.message(who, request.get_data(cache=False))
        except TextTooLong as exc:
            return reject(413, str(exc), channel_id)
        except MalformedPayload as exc:
            return reject(400, f"malformed message: {exc}", channel_id)
        new = publisher.publish([message]) == 1  # EnqueueFailed -> 503 (app handler); the page retries
        if new:
            client_id = message.platform_message_id.split(":", 1)[1]
            role, text = ("event", "New conversation") if message.command else ("user", message.text)
            try:
                # Stamped with the time before the publish: a fast reply may reach the box first.
                box.push(channel_id, who, role, text, id=client_id, at=message.sent_at)
            except Exception as exc:  # enqueued all the same; only a reload would miss this line
                log.warning("webchat.box_failed", channel=channel_id, error=exc.__class__.__name__)
        return jsonify({"accepted": True, "duplicate": not new})

    @bp.get("/chat/<channel_id>/replies")
    def replies(channel_id: str):
        channel_for(channel_id)
        who = visitor()
        if who is None:
            return reject(400, NO_VISITOR, channel_id)
        after = request.args.get("after") or None
        if after is not None and not CURSOR.fullmatch(after):
            return reject(400, "after: not a cursor this server gave", channel_id)
        try:
            entries = box.read(channel_id, who, after)
        except Exception as exc:
            log.error("webchat.box_unreachable", channel=channel_id, error=exc.__class__.__name__)
            return unavailable(retry_s=2)
        response = jsonify({"entries": [e.to_dict() for e in entries],
                            "cursor": entries[-1].cursor if entries else after})
        response.headers["Cache-Control"] = "no-store"
        return response

    return bp
