"""The session browser and operator console: channels, sessions (paged), a session's transcript, a search by
platform user id (read-only pages over shared/session_queries.py, shared/privacy.py and shared/transcripts.py),
and the handoff's console (ingress/console.py: waiting queue, take over, reply, hand back).

It shows private conversations, so it exists only when someone can log in (ADMIN_TOKEN or `[[operators]]`; 404
otherwise), and every page needs an account: HTTP basic auth with an operator's name and password
(shared/accounts.py), or the ADMIN_TOKEN as the password of any other user name or as `Authorization: Bearer`.
A client address that sent FAILED_LOGINS wrong passwords in FAILED_LOGIN_WINDOW_S is answered 429 until its bucket
refills, right password or not (else guessing would simply go on). No page shows configuration secrets, options or
Agent options; every view is logged.
"""

from __future__ import annotations

import hashlib
import math
from datetime import datetime, timezone
from typing import Any

import structlog
from flask import Blueprint, Flask, Response, abort, g, redirect, render_template, request, url_for

from ingress import console
from ingress.proxies import TrustedProxies
from ingress.publisher import Publisher
from shared.accounts import ADMIN, TOKEN_ACCOUNT, Account, PasswordCache
from shared.privacy import export_user
from shared.session_queries import find_sessions, get_session
from shared.channels.base import same_secret
from shared.config import Settings
from shared.logs import pseudonym
from shared.models import ACTIVE, DORMANT
from shared.partitioning import partition_of
from shared.ratelimit import Bucket, LocalLimiter, RedisLimiter
from shared.signing import keyed_hash
from shared.transcripts import transcript
from shared import redis_keys

log = structlog.get_logger(__name__)

PAGE_SIZE = 50
REALM = 'Basic realm="chatsessions session browser", charset="UTF-8"'
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; script-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
HSTS = "max-age=31536000"  # on responses served over TLS: the browser then never asks over plain HTTP
FAILED_LOGINS = 10  # wrong tokens from one client address...
FAILED_LOGIN_WINDOW_S = 600.0  # ...in this long (a token bucket: one more every window / FAILED_LOGINS)


def _presented() -> tuple[str | None, str | None, str]:
    """The user name and password (or token) the request carries, and how (for the log)."""
    auth = request.authorization
    if auth is None:
        return None, None, "no credentials"
    if auth.type == "basic":
        return auth.username, auth.password, "basic"
    if auth.type == "bearer":
        return None, auth.token, "bearer"
    return None, None, f"unsupported scheme {auth.type!r}"


def _request_fields() -> dict[str, Any]:
    """What a log line says of the request: the page by its route (a transcript's path holds the session key), its
    parameters, and the session key and the searched user id as fields of their own, which the logs pseudonymize
    (shared/logs.py) like every personal id."""
    fields: dict[str, Any] = {"page": request.url_rule.rule if request.url_rule else "?"}
    if "key" in (request.view_args or {}):
        fields["session_key"] = request.view_args["key"]
    args = request.args.to_dict()
    if "user" in args:
        fields["user"] = args.pop("user").strip()[:200]
    if args:
        fields["query"] = {k[:20]: v[:50] for k, v in list(args.items())[:5]}  # channel, status, page
    return fields


def _time(value: datetime | None) -> str:
    if value is None:
        return ""
    value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def blueprint(settings: Settings, publisher: Publisher) -> Blueprint:
    bp = Blueprint("browser", __name__, url_prefix="/admin", template_folder="templates",
                   static_folder="static/browser", static_url_path="/static")
    passwords = PasswordCache()
    token_account = (Account(TOKEN_ACCOUNT, ADMIN, "token:" + hashlib.sha256(settings.admin_token.encode()).hexdigest())
                     if settings.admin_token else None)

    def account_of(name: str | None, password: str | None) -> Account | None:
        """The account these credentials log in as: a configured operator by name, else ADMIN_TOKEN's."""
        if password is None:
            return None
        if name in settings.operators:
            account = settings.operators[name]
            return account if passwords.check(account, password) else None
        if token_account is not None and same_secret(password, settings.admin_token):
            return token_account
        return None

    url = settings.database_url
    # Only what a support lead needs to tell channels apart: never secrets, options or agent_options.
    channels = [{"id": c.id, "platform": c.platform, "agent": c.agent, "idle_minutes": c.session.idle_minutes}
                for c in settings.channels.values()]
    bp.add_app_template_filter(_time, "utc")
    limiter = RedisLimiter(settings.redis_url) if settings.redis_url else LocalLimiter()

    def failed_logins(peek: bool) -> float:
        """Count a wrong token from this client address (or only look): the seconds it must wait, 0 if none."""
        # The address is keyed, so Redis holds no client addresses.
        where = keyed_hash(settings.secret_key, "admin-login", request.remote_addr or "")
        bucket = Bucket(redis_keys.admin_login(where), FAILED_LOGINS / FAILED_LOGIN_WINDOW_S, FAILED_LOGINS)
        try:
            return limiter.peek([bucket]) if peek else limiter.try_take([bucket])
        except Exception as exc:  # Redis down: the token's length still makes guessing hopeless
            log.warning("browser.limiter_failed", error=exc.__class__.__name__)
            return 0.0

    @bp.before_request
    def authenticate():
        if not settings.admin_token and not settings.operators:
            abort(404)  # off unless configured: the same answer as any unknown path
        wait = failed_logins(peek=True)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            log.warning("browser.login_limited", **_request_fields(), remote=request.remote_addr, retry_after=retry)
            return Response("too many failed logins, try again later\n", status=429, mimetype="text/plain",
                            headers={"Retry-After": str(retry), **HEADERS})
        name, password, how = _presented()
        account = account_of(name, password)
        if account is None:
            reason = how if password is None else f"wrong password or token ({how})"
            log.warning("browser.denied", reason=reason, **_request_fields(), remote=request.remote_addr)
            if password is not None:  # a browser's first request carries no credentials: not a failed login
                failed_logins(peek=False)
            return Response("authentication required\n", status=401, mimetype="text/plain",
                            headers={"WWW-Authenticate": REALM, **HEADERS})
        g.account = account
        if request.method == "GET" and "live" not in request.args:  # the console's refreshes are not views
            log.info("browser.viewed", **_request_fields(), remote=request.remote_addr, operator=account.name)
        return None

    @bp.after_request
    def harden(response: Response) -> Response:
        response.headers.update(HEADERS)
        if request.is_secure:
            response.headers["Strict-Transport-Security"] = HSTS
        return response

    def page_number() -> int:
        try:
            return max(1, int(request.args.get("page", "1")))
        except ValueError:
            return 1

    @bp.get("/")
    def index():
        counts = {c["id"]: find_sessions(url, channel=c["id"], limit=1).total for c in channels}
        recent = find_sessions(url, limit=10)
        return render_template("browser/index.html", channels=channels, counts=counts, recent=recent)

    @bp.get("/sessions")
    def sessions():
        channel = request.args.get("channel") or None
        status = request.args.get("status") or None
        if channel is not None and channel not in settings.channels:
            abort(404)
        if status not in (None, ACTIVE, DORMANT):
            abort(400)
        found = find_sessions(url, channel=channel, status=status, page=page_number(), limit=PAGE_SIZE)
        if found.page > found.pages:
            abort(404)

        def page_url(n: int) -> str:
            return url_for("browser.sessions", channel=channel, status=status, page=n)

        return render_template("browser/sessions.html", page=found, channel=channel, status=status,
                               channels=channels, statuses=(ACTIVE, DORMANT), page_url=page_url)

    def session_page(key: str, notice: str | None = None, status: int = 200) -> Response:
        """A session's page (or, with ?live, the part the console refreshes: its mode and transcript)."""
        found = transcript(url, key)
        if found is None:
            abort(404)
        summary, lines = found
        generations: list[tuple[int, list[Any]]] = []
        for line in lines:
            if not generations or generations[-1][0] != line.generation:
                generations.append((line.generation, []))
            generations[-1][1].append(line)
        if "live" in request.args:
            return Response(render_template("browser/_transcript.html", summary=summary, generations=generations))
        page = render_template("browser/session.html", summary=summary, info=get_session(url, key),
                               generations=generations, partition=partition_of(key, settings.partitions),
                               pseudonym=pseudonym(settings.secret_key, key), notice=notice)
        return Response(page, status=status)

    @bp.get("/sessions/<path:key>")
    def session(key: str):
        return session_page(key, console.DONE.get(request.args.get("done", "")))

    console.register(bp, settings, publisher, session_page)

    @bp.get("/users")
    def users():
        user = (request.args.get("user") or "").strip()
        if len(user) > 200:
            abort(400)
        result = export_user(url, user) if user else None
        groups: dict[str, int] = {}
        for m in (result or {}).get("group_messages", []):
            groups[m["session_key"]] = groups.get(m["session_key"], 0) + 1
        return render_template("browser/users.html", user=user, result=result, groups=groups)

    @bp.app_template_global()
    def iso_time(value: str | None) -> str:
        return _time(datetime.fromisoformat(value)) if value else ""

    @bp.errorhandler(404)
    def not_found(_exc):
        return Response("not found\n", status=404, mimetype="text/plain")

    @bp.errorhandler(400)
    def bad_request(_exc):
        log.warning("ingress.rejected", status=400, reason="bad session browser query", **_request_fields())
        return Response("bad request\n", status=400, mimetype="text/plain")

    return bp


def create_app(settings: Settings) -> Flask:
    """The session browser and console alone, for their own address (`chatsessions admin`, ADMIN_BIND): a port only
    the support team's network reaches, while the public ingress has no /admin at all."""
    app = Flask("chatsessions.admin")
    app.wsgi_app = TrustedProxies(app.wsgi_app, settings.trusted_proxies)  # the lead's address (login limit), TLS
    app.register_blueprint(blueprint(settings, Publisher(settings)))  # operators' replies go through the broker
    app.add_url_rule("/", "home", lambda: redirect(url_for("browser.index")))
    return app
