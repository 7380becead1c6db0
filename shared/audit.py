"""The audit log of operators' actions: written in the same transaction as the action (shared/handoff.py), read by
`chatsessions audit`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db import as_utc, iso, transaction
from shared.models import AuditEntry

CONSOLE, CLI = "console", "cli"  # where an action was made
REPLY = "reply"  # the action of an operator's reply (taking over and handing back are named by their events)
ERASED_KEY = "(erased)"  # what an erased user's session key becomes in the log


@dataclass(frozen=True)
class Entry:
    at: datetime
    actor: str
    action: str
    session_key: str
    via: str
    detail: str | None

    def to_dict(self) -> dict:
        return asdict(self) | {"at": iso(self.at)}


def record(s: Session, at: datetime, actor: str, action: str, key: str, via: str, detail: str | None = None) -> None:
    """Add one entry to the caller's transaction: the action and its entry commit together or not at all."""
    s.add(AuditEntry(at=at, actor=actor, action=action, session_key=key, via=via, detail=detail))


def entries(url: str, actor: str | None = None, key: str | None = None, limit: int = 100) -> list[Entry]:
    """The newest `limit` entries, newest first; of one actor and/or one session if named."""
    q = select(AuditEntry)
    if actor is not None:
        q = q.where(AuditEntry.actor == actor)
    if key is not None:
        q = q.where(AuditEntry.session_key == key)
    with transaction(url) as s:
        rows = s.scalars(q.order_by(AuditEntry.id.desc()).limit(limit)).all()
        return [Entry(as_utc(r.at), r.actor, r.action, r.session_key, r.via, r.detail) for r in rows]
