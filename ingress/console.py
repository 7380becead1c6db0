"""The operator console, on the session browser's blueprint: the waiting queue and the conversations operators have
(refreshed live by static/browser/console.js), and a session's actions — take over, reply, hand back — over
shared/handoff.py, so they keep its guarantees (one owner; a reply stored and sent in the session's order).

Roles (shared/accounts.py): a viewer only reads; an operator takes over, replies and hands back its own sessions; an
admin also hands back anyone's. Every action is a POST carrying the account's CSRF token (a keyed hash of the
account: a page of another site cannot know it, though the browser would send the credentials) and a same-origin
`Origin` when the browser sends one; each action goes to the audit log in its own transaction.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Callable
from urllib.parse import urlsplit

import structlog
from flask import Blueprint, Response, abort, g, redirect, render_template, request, url_for

from ingress.publisher import Publisher
from shared import handoff
from shared.accounts import ADMIN, OPERATOR, Account
from shared.audit import CONSOLE
from shared.config import Settings
from shared.errors import EnqueueFailed
from shared.models import HUMAN, WAITING
from shared.signing import keyed_hash

log = structlog.get_logger(__name__)

CSRF_FIELD = "csrf"
ACTIONS = ("takeover", "reply", "handback")
# What the session page says after an action (by name: a redirect never carries text of the request's making).
DONE = {"takeover": "You have this conversation: the Agent does not answer it until you hand it back.",
        "reply": "Reply queued: it is sent after every message before it; its delivery shows below.",
        "handback": "Handed back: the Agent answers the next message."}


def csrf_token(secret_key: str, account: Account) -> str:
    """The account's token for state-changing forms: changes with its password (or ADMIN_TOKEN) and SECRET_KEY."""
    return keyed_hash(secret_key, "console-csrf", f"{account.name}\0{account.password_hash}")


def register(bp: Blueprint, settings: Settings, publisher: Publisher,
             session_page: Callable[[str, str | None, int], Response]) -> None:
    """Add the console's pages and actions to the browser's blueprint (whose before_request set `g.account`).
    `session_page(key, notice, status)` renders a session's page with a notice (after a refused action)."""
    url = settings.database_url

    @bp.app_template_global()
    def csrf() -> str:
        return csrf_token(settings.secret_key, g.account)

    @bp.app_template_global()
    def may(role: str) -> bool:
        return g.account.may(role)

    @bp.get("/console")
    def console():
        me = g.account.name
        with_people = handoff.handovers(url, HUMAN)
        lists = {"waiting": handoff.handovers(url, WAITING), "mine": [h for h in with_people if h.operator == me],
                 "others": [h for h in with_people if h.operator != me], "now": datetime.now(timezone.utc)}
        template = "browser/_console_lists.html" if "live" in request.args else "browser/console.html"
        return render_template(template, **lists)

    def refuse(status: int, reason: str, key: str) -> Response:
        log.warning("console.refused", status=status, reason=reason, operator=g.account.name, session_key=key,
                    remote=request.remote_addr)
        return Response(reason + "\n", status=status, mimetype="text/plain")

    def same_origin() -> bool:
        """A browser's Sec-Fetch-Site and Origin name this site; a client that sends neither is not a browser. (The
        pages' no-referrer policy makes Chromium send `Origin: null` with their forms: that says nothing.)"""
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return False
        origin = request.headers.get("Origin", "null")
        return origin == "null" or urlsplit(origin).netloc == request.host

    @bp.post("/console/<action>")
    def act(action: str):
        account, key = g.account, request.form.get("key", "")[:300]
        if action not in ACTIONS:
            abort(404)
        if not same_origin() or request.form.get(CSRF_FIELD) != csrf_token(settings.secret_key, account):
            return refuse(403, "missing or wrong CSRF token: reload the page and try again", key)
        if not account.may(OPERATOR):
            return refuse(403, f"the {account.role} role cannot {action} (an operator or admin can)", key)
        try:
            if action == "takeover":
                handoff.take_over(url, key, account.name, via=CONSOLE)
            elif action == "reply":
                handoff.operator_reply(url, key, account.name, request.form.get("text", ""),
                                       publish=publisher.publish, via=CONSOLE)
            else:  # an admin may hand back anyone's session; an operator only their own
                handoff.hand_back(url, key, account.name, None if account.may(ADMIN) else account.name, via=CONSOLE)
        except handoff.TakenBy as exc:
            log.info("console.taken", action=action, operator=account.name, session_key=key, by=exc.operator)
            return session_page(key, f"{exc.operator} has this conversation: only they can {action} it.", 409)
        except handoff.HandoffError as exc:
            log.info("console.refused", action=action, operator=account.name, session_key=key, reason=str(exc))
            return session_page(key, str(exc), 400)
        except EnqueueFailed as exc:
            log.error("console.enqueue_failed", operator=account.name, session_key=key, reason=str(exc))
            return session_page(key, "The broker did not take the reply: nothing was sent, try again.", 503)
        log.info("console.acted", action=action, operator=account.name, session_key=key)
        return redirect(url_for("browser.session", key=key, done=action), code=303)
