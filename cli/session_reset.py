"""`chatsessions sessions new KEY`: a fresh session as if the user had sent /new, taken under the session's lease like a
turn."""

from __future__ import annotations


from sqlalchemy import update

from shared.db import transaction
from shared.models import (
    NEW_GENERATION,
    ChatSession,
    SessionEvent,
)
from shared.session_queries import get_session
from workers.store import LeaseLost, Store, now


def force_new_session(url: str, key: str, lease_seconds: float) -> int:
    """Start a new generation of the session, as `/new` does, and return it: older messages stay stored but
    are never given to the Agent again. Takes the lease like a turn (LeaseBusy while one runs) and writes
    fenced by its token, so it cannot interleave with a turn. LookupError if there is no such session."""
    session = get_session(url, key)
    if session is None:
        raise LookupError(f"no session {key!r}")
    claim = Store(url).claim(session.id, lease_seconds)
    t = now()
    with transaction(url) as s:
        row = s.execute(
            update(ChatSession)
            .where(ChatSession.id == session.id, ChatSession.lease_token == claim.token)
            .values(generation=ChatSession.generation + 1, lease_until=None)
            .returning(ChatSession.generation)
        ).first()
        if row is None:
            raise LeaseLost(key)
        s.add(SessionEvent(session_id=session.id, generation=row.generation, event=NEW_GENERATION, at=t))
    return row.generation
