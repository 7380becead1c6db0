"""The turn's side of the session store: every step is one short transaction, and the fencing token guards every
write.

A message is accepted into its session's inbox; the session's lease holder takes the inbox in `seq` order,
one turn at a time, and never holds a transaction while the Agent runs. The transactions of a turn:

  accept         the message joins its session's inbox (creating the session, or waking a dormant one) — and,
                 when the lease is free, the lease is claimed in the same transaction (see `claim`)
  claim          the lease, with a new fencing token — and, read in the same transaction, what the new holder
                 has to do: the replies a holder before it committed but never sent (the outbox), and the
                 first ready message with its context
  commit_turn    the message and its reply (the outbox entry), fenced by the token and renewing the lease; returns
                 the reply to send and whether the next message is ready (only then is `next_turn` asked for it)
  renew          the fencing check before a send, when the last renewal is half a lease old (workers/dispatch.py)
  mark_delivery  a send's outcome (the last one of a holder goes with its release)
  release        the lease; says whether a message became ready meanwhile (then the holder claims again)

The order is the ingress's per-session `seq` (ingress/ledger.py), whose counter expires SEQ_TTL_S after its last
number; a session that comes back after that is numbered from 1 again, and `accept` resyncs it (SEQ_RESTART_IDLE_S).

A turn is one message, or with a burst policy the ready messages taken together (`Turn.earlier`), all stored and
settled in its one commit. A reply carries its route (the channel, chat and topic of the message it answers).
Beside the turns, beat's sweeps: workers/maintenance.py; what people read of the store: shared/transcripts.py.

The turn's statements (workers/statements.py) are SQLAlchemy Core statements built once, at import, run on one pooled
connection per transaction (`shared.db.run_transaction`); on PostgreSQL straight on psycopg (`shared.db.execute`).
On PostgreSQL the common case of accept, commit_turn and release is one call each of a function that runs the same
statements (migration 0007; `shared.db.run_call`): one round trip instead of six or seven.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable, Mapping, NamedTuple, TypeVar

import structlog
from sqlalchemy import (
    Connection,
    select,
)
from sqlalchemy.exc import IntegrityError

from workers import statements as sql
from workers.work import (
    AGENT_SENDER,
    NOTICE_SENDER,
    Accepted,
    Claim,
    HandoffRequest,
    Lease,
    PendingReply,
    Settled,
    StoredMessage,
    Turn,
)
from shared.config import ChannelConfig
from shared.db import DB_UNAVAILABLE, as_utc, engine_for, execute, run_call, run_statement, run_transaction
from shared.errors import ChatSessionsError, LeaseLost  # noqa: F401 - LeaseLost is part of the store's surface
from shared.messages import SEQ_TTL_S, Delivery, InboundMessage
from shared.models import (
    ACTIVE,
    CREATED,
    DORMANT,
    FAILED,
    HANDOFF_REQUESTED,
    NEW_GENERATION,
    PENDING,
    RESUMED,
    SENT,
    SKIPPED,
    WAITING,
    Channel,
    DeadLetter,
)

T = TypeVar("T")

log = structlog.get_logger(__name__)

# The ingress's `seq:<key>` counters expire this long after their last number, so Redis keeps no counter for
# sessions that ended. A session's next message after that is numbered 1 again while the session row keeps its
# last_seq: `accept` recognises the restart — a new message numbered at or below last_seq, for a session idle longer
# than SEQ_RESTART_IDLE_S with nothing waiting — and starts the session's order over (last_seq 0), so the restarted
# numbers are ordered like any others. Half the TTL: a counter expires only SEQ_TTL_S after its last number, and
# the session's last activity is that number's turn, committed well within the other half (15 days) of it.
SEQ_RESTART_IDLE_S = SEQ_TTL_S // 2


class LeaseBusy(ChatSessionsError):
    """Another holder owns the session's lease; it drains the session's inbox, this caller need not."""


class AlreadyStored(ChatSessionsError):
    """The platform message is already stored: a redelivery, not a new turn."""


def now() -> datetime:
    return datetime.now(timezone.utc)


def _clock() -> tuple[datetime, float]:
    """The time a lease renewal is computed from, and the monotonic time no later than it, which the holder may
    trust the renewal from (workers/dispatch.py, LeaseFence)."""
    monotonic = time.monotonic()
    return now(), monotonic


def _insert(url: str):
    if engine_for(url).dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def transactional(method: Callable[..., T]) -> Callable[..., T]:
    """The method runs as one transaction, on the connection it gets as `c` (callers do not pass it)."""
    @functools.wraps(method)
    def run(self: Store, *args, **kwargs) -> T:
        return run_transaction(self.url, lambda c: method(self, c, *args, **kwargs))
    return run


def _ready(c: Connection, session_id: int, last_seq: int) -> bool:
    """Whether the session's inbox head may run now: it is the next message (or an earlier one, replayed)."""
    return bool(execute(c, sql.READY, {"sid": session_id, "upto": last_seq + 1}).scalar())


def _pending(r, chat_id: str, chat_kind: str) -> PendingReply:
    """A PendingReply from an outbox row (id, text, *sql.ROUTE); a row older than its route columns goes to the
    session's chat (`chat_id`, `chat_kind`), as every reply did then."""
    return PendingReply(r.id, r.channel_id, r.chat_id or chat_id, r.chat_kind or chat_kind, r.text, r.thread_id,
                        as_utc(r.user_sent_at))


def _outbox(c: Connection, claim: Claim) -> tuple[PendingReply, ...]:
    return tuple(_pending(r, claim.chat_id, claim.chat_kind) for r in execute(c, sql.OUTBOX, {"sid": claim.session_id}))


def _take(take: Mapping[str, int] | None, claim: Claim) -> int:
    """How many inbox rows a turn reads: 1, or the burst size of the session's channel."""
    return max(1, take.get(claim.channel_id, 1)) if take else 1


def _history(c: Connection, claim: Claim) -> Callable[[int], Iterable]:
    """The HISTORY reader `_turn` takes: the newest messages of the claim's generation, newest first."""
    return lambda limit: execute(c, sql.HISTORY, {"sid": claim.session_id, "generation": claim.generation,
                                                  "limit": limit}).all()


def _turn(claim: Claim, heads, history_limit: int | Mapping[str, int], force: bool,
          read_history: Callable[[int], Iterable]) -> Turn | None:
    """The turn of the inbox's first rows `heads` with its context: the newest `history_limit` messages of the
    session's current generation, oldest first (a mapping: the limit of the message's channel, which in a
    per-person session need not be the session row's). None if there is no head, or it waits for an earlier
    message (unless `force`).

    With more than one row (a burst), the turn takes the head and the rows right after it that are ready too: each
    the next seq, not stored yet, not a command (a command is a turn of its own). Its `message` is the newest."""
    head = heads[0] if heads else None
    if head is None or (head.seq > claim.last_seq + 1 and not force):
        return None
    message = InboundMessage.from_dict(json.loads(head.payload))
    if head.stored:
        return Turn(claim, head.id, message, [], stored=True)
    burst = [(head.id, message)]
    if message.command is None:
        for row in heads[1:]:
            if row.stored or row.seq > burst[-1][1].seq + 1:
                break
            nxt = InboundMessage.from_dict(json.loads(row.payload))
            if nxt.command is not None:
                break
            burst.append((row.id, nxt))
    item_id, message = burst[-1]
    if not isinstance(history_limit, int):
        history_limit = history_limit.get(message.channel_id) or history_limit[claim.channel_id]
    history = read_history(history_limit)
    return Turn(claim, item_id, message, [StoredMessage(*r) for r in reversed(history)], stored=False,
                earlier=tuple(burst[:-1]))


class _Head(NamedTuple):
    """An inbox row as HEAD reads it, from cs_accept's result."""

    id: int
    seq: int
    payload: str
    stored: bool


def _timestamp(value: str | None) -> datetime | None:
    """A timestamptz as PostgreSQL writes it in JSON (ISO 8601 with its offset), in UTC."""
    return as_utc(datetime.fromisoformat(value)) if value else None


def _history_rows(rows: list) -> list[tuple]:
    """HISTORY's rows from a turn function's JSON (read with the limit `_turn` would use: a turn of one message)."""
    return [(role, sender, name, text, _timestamp(at)) for role, sender, name, text, at in rows]


def _platform_id_taken(exc: IntegrityError) -> bool:
    """Whether the refused INSERT's platform message id is stored already (and not another constraint: PostgreSQL's
    message of an error inside a function quotes the whole INSERT, column names included)."""
    diag = getattr(exc.orig, "diag", None)  # psycopg
    if diag is not None:
        return diag.constraint_name == "uq_messages_platform_id"
    return "messages.platform_message_id" in str(exc.orig)  # SQLite: "UNIQUE constraint failed: messages.channel_id, ..."


def _delivery_params(reply_id: int, delivery: Delivery) -> dict:
    return {"rid": reply_id, "outcome": SENT if delivery.ok else FAILED, "error": delivery.error,
            "attempts": delivery.attempts, "at": now() if delivery.ok else None}


TURN_FUNCTIONS = ("cs_accept", "cs_commit_turn", "cs_release")


@functools.cache
def _turn_functions(url: str) -> bool:
    """Whether the database has the turn's functions. A worker started on code newer than the schema (before
    `chatsessions db upgrade`) runs the statements instead, and says so; it uses the functions once restarted."""
    found = run_transaction(url, lambda c: c.exec_driver_sql(  # to_regproc: as the search path finds them
        "SELECT count(to_regproc(name)) FROM unnest(%(names)s::text[]) AS name", {"names": list(TURN_FUNCTIONS)}
    ).scalar())
    if found < len(TURN_FUNCTIONS):
        log.warning("store.turn_functions_missing", hint="run `chatsessions db upgrade` (migration 0007), then "
                    "restart the workers: until then each turn takes ~20 round trips to the database instead of 3")
    return found == len(TURN_FUNCTIONS)


class Store:
    def __init__(self, database_url: str):
        self.url = database_url
        self.insert = _insert(database_url)
        dialect = engine_for(database_url).dialect.name
        self._create_session, self._enqueue = sql.upserts(dialect)
        self._calls: bool | None = None if dialect == "postgresql" else False  # see _functions

    def _functions(self) -> bool:
        """Whether the turn's common cases run as the functions of migration 0007 (PostgreSQL, once migrated)."""
        if self._calls is None:
            self._calls = _turn_functions(self.url)
        return self._calls

    def sync_channels(self, channels: Iterable[ChannelConfig]) -> None:
        """Make the channels table match the config (rows are kept for channels that left it)."""
        channels = list(channels)

        def work(c: Connection) -> None:
            for ch in channels:
                stmt = self.insert(Channel).values(id=ch.id, platform=ch.platform, agent=ch.agent, created_at=now())
                c.execute(stmt.on_conflict_do_update(index_elements=["id"],
                                                     set_={"platform": ch.platform, "agent": ch.agent}))
        run_transaction(self.url, work)

    # -- accepting ----------------------------------------------------------------------------------------------

    def accept(self, msg: InboundMessage, lease: Lease | None = None) -> Accepted:
        """Record a message in its session's inbox (creating the session, or waking a dormant one).

        After this commits the message is durable: the broker's copy may be acknowledged. The session's row is
        only read, unless the session is new or dormant: a flooded session's messages do not queue on its row
        lock (behind each other and behind the holder's commits). Its activity time is set when a turn commits.

        With `lease`, and the session's lease free as read, the same transaction claims it (see `claim`) *before*
        the message joins the inbox, and returns the claim: the common case (a session nobody is serving) costs one
        transaction, not two. Claimed first, nobody else can hold the lease when the message goes in. When the lease
        is held, or taken between the read and the claim, the message only joins the inbox, as without `lease`,
        and the caller claims in a transaction of its own once this one has committed: the release protocol (see
        `release`) relies on the message being committed before that claim is tried.

        On PostgreSQL this is one call of `cs_accept` (migration 0007), which runs the statements below; a dormant
        session, a restarted numbering, or a claim on a channel that takes bursts, takes the statements.
        """
        if self._functions():
            accepted = self._accept_call(msg, lease)
            if accepted is not None:
                return accepted
        return self._accept(msg, lease)

    def _accept_call(self, msg: InboundMessage, lease: Lease | None) -> Accepted | None:
        t, monotonic = _clock()
        read = None
        if lease is not None and lease.history_limits is not None:
            read = json.dumps({"limits": lease.history_limits, "takes": lease.take or {}})
        out = run_call(self.url, sql.ACCEPT_CALL, {
            "key": msg.session_key, "seq": msg.seq, "t": t,
            "until": t + timedelta(seconds=lease.seconds) if lease is not None else None,
            "channel": msg.channel_id, "chat_kind": msg.chat_kind, "chat_id": msg.chat_id,
            "pmid": msg.platform_message_id, "payload": json.dumps(msg.to_dict()),
            "idle_since": t - timedelta(seconds=SEQ_RESTART_IDLE_S), "read": read}).scalar()
        if out is None:
            return None
        if "claim" not in out:
            return Accepted(out["sid"], new=out["inserted"])
        assert lease is not None
        (sid, channel_id, token, generation, last_seq, chat_id, chat_kind, _status, last_activity_at, mode, operator,
         notice_sent) = out["claim"]
        claim = Claim(sid, channel_id, token, generation, last_seq, chat_id, chat_kind, _timestamp(last_activity_at),
                      lease.seconds, monotonic, mode, operator, notice_sent)
        outbox = tuple(PendingReply(rid, channel, chat or chat_id, kind or chat_kind, text, thread, _timestamp(at))
                       for rid, text, channel, chat, kind, thread, at in out["outbox"])
        if lease.history_limits is None:
            return Accepted(sid, new=out["inserted"], claim=replace(claim, outbox=outbox))

        heads = [_Head(*h) for h in out["heads"]]
        turn = _turn(claim, heads, lease.history_limits, False, lambda _limit: _history_rows(out["history"]))
        return Accepted(sid, new=out["inserted"], claim=replace(claim, outbox=outbox, turn=turn))

    @transactional
    def _accept(self, c: Connection, msg: InboundMessage, lease: Lease | None) -> Accepted:
        t, monotonic = _clock()
        row = execute(c, sql.FIND_SESSION, {"key": msg.session_key}).first()
        if row is None:
            row = execute(c, self._create_session, {
                "channel_id": msg.channel_id, "key": msg.session_key, "chat_kind": msg.chat_kind,
                "chat_id": msg.chat_id, "status": ACTIVE, "generation": 1, "message_count": 0, "last_seq": 0,
                "lease_token": 0, "lease_until": None, "created_at": t, "last_activity_at": t,
            }).first()
            if row is not None:
                execute(c, sql.ADD_EVENT, sql.event(row.id, row.generation, CREATED, t))
            else:  # a concurrent accept created it (and committed: ON CONFLICT waited for it)
                row = execute(c, sql.FIND_SESSION, {"key": msg.session_key}).one()
        if row.status == DORMANT:
            self._wake(c, row.id, t)
        if 0 < msg.seq <= row.last_seq and as_utc(row.last_activity_at) < t - timedelta(seconds=SEQ_RESTART_IDLE_S):
            self._restart_seq(c, row.id, msg, t)
        free = row.lease_until is None or as_utc(row.lease_until) < t
        held = self._take_lease(c, row.id, t, lease) if lease is not None and free else None
        # A redelivery of an answered message goes through the inbox too: its turn, in seq order,
        # only records that this seq is settled, so later messages don't wait for it.
        inserted = execute(c, self._enqueue, {
            "session_id": row.id, "channel_id": msg.channel_id, "platform_message_id": msg.platform_message_id,
            "seq": msg.seq, "payload": json.dumps(msg.to_dict()), "created_at": t,
        }).rowcount
        claim = self._read_work(c, held, t, lease, monotonic) if held is not None else None
        return Accepted(row.id, new=bool(inserted), claim=claim)

    @staticmethod
    def _restart_seq(c: Connection, session_id: int, msg: InboundMessage, t: datetime) -> None:
        """A new message numbered at or below last_seq of a session idle past SEQ_RESTART_IDLE_S: the ingress's
        counter expired and restarted at 1. Without this, the restarted numbers would all look like replays, run
        whenever they arrive, unordered, until they passed the old last_seq."""
        restarted = execute(c, sql.RESTART_SEQ, {"sid": session_id, "seq": msg.seq, "channel": msg.channel_id,
                                             "pmid": msg.platform_message_id,
                                             "idle_since": t - timedelta(seconds=SEQ_RESTART_IDLE_S)}).rowcount
        if restarted:
            log.info("store.seq_restarted", session_key=msg.session_key, seq=msg.seq)

    @staticmethod
    def _wake(c: Connection, session_id: int, t: datetime) -> None:
        """A dormant session becomes active again (once: the update is conditional), with its `resumed` event."""
        woke = execute(c, sql.WAKE, {"sid": session_id, "t": t}).first()
        if woke is not None:
            execute(c, sql.ADD_EVENT, sql.event(session_id, woke.generation, RESUMED, t))

    # -- the lease ----------------------------------------------------------------------------------------------

    @transactional
    def claim(self, c: Connection, session_id: int, lease_seconds: float, *,
              history_limits: Mapping[str, int] | None = None, force: bool = False,
              take: Mapping[str, int] | None = None) -> Claim:
        """Take the session's lease with a new fencing token; LeaseBusy if another holder has it.

        The claim carries what its holder has to do first, read in the same transaction: `outbox`, the replies
        a holder before it committed but never sent, and — given the channels' history limits — `turn`, the
        first ready inbox message with its context (see `next_turn`; `force` passes a gap; `take`: how many ready
        messages one turn may take, by the session's channel — above 1, a burst)."""
        (t, monotonic), lease = _clock(), Lease(lease_seconds, history_limits, take)
        held = self._take_lease(c, session_id, t, lease)
        if held is None:
            raise LeaseBusy(str(session_id))
        return self._read_work(c, held, t, lease, monotonic, force)

    @staticmethod
    def _take_lease(c: Connection, session_id: int, t: datetime, lease: Lease):
        """The lease with a new fencing token, if it is free (the claim's UPDATE ... RETURNING row), else None."""
        return execute(c, sql.CLAIM, {"sid": session_id, "t": t, "until": t + timedelta(seconds=lease.seconds)}).first()

    def _read_work(self, c: Connection, row, t: datetime, lease: Lease, monotonic: float, force: bool = False) -> Claim:
        """What the new holder has to do: the outbox, and (with history limits) the first ready turn."""
        claim = Claim(row.id, row.channel_id, row.lease_token, row.generation, row.last_seq, row.chat_id,
                      row.chat_kind, as_utc(row.last_activity_at), lease.seconds, monotonic, row.mode, row.operator,
                      row.notice_sent)
        outbox = _outbox(c, claim)
        if lease.history_limits is None:
            return replace(claim, outbox=outbox)
        heads = execute(c, sql.HEAD, {"sid": claim.session_id, "take": _take(lease.take, claim)}).all()
        if heads and row.status == DORMANT:  # the dormancy sweep raced an accept: active again
            self._wake(c, claim.session_id, t)
        turn = _turn(claim, heads, lease.history_limits, force, _history(c, claim))
        return replace(claim, outbox=outbox, turn=turn)

    def release(self, claim: Claim, deliveries: Iterable[tuple[int, Delivery]] = ()) -> bool:
        """Give the lease up, recording the outcomes of the last sends in the same transaction. True if an inbox
        message is ready after all: it came in while the holder finished its last turn, and its own worker found
        the lease taken; the holder must claim again.

        Race-free because the release's UPDATE locks the session's row before the inbox is read (a new
        statement, a new snapshot): an accept that committed before that read is seen here; one that committed
        after it then claims, and that claim waits for this transaction's row lock, then finds the lease free.
        On PostgreSQL the transaction is one call of `cs_release` (migration 0007), whose statements do the same."""
        deliveries = list(deliveries)
        if len(deliveries) > 1 or not self._functions():
            return self._release(claim, deliveries)
        mark = _delivery_params(*deliveries[0]) if deliveries else dict.fromkeys(("rid", "outcome", "error",
                                                                                  "attempts", "at"))
        return bool(run_call(self.url, sql.RELEASE_CALL, {"sid": claim.session_id, "token": claim.token,
                                                          **mark}).scalar())

    @transactional
    def _release(self, c: Connection, claim: Claim, deliveries: Iterable[tuple[int, Delivery]]) -> bool:
        for reply_id, delivery in deliveries:
            execute(c, sql.MARK_DELIVERY, _delivery_params(reply_id, delivery))
        row = execute(c, sql.RELEASE, {"sid": claim.session_id, "token": claim.token}).first()
        return row is not None and _ready(c, claim.session_id, row.last_seq)

    def renew(self, claim: Claim, lease_seconds: float) -> None:
        """Extend the lease if this holder still has it (the fencing check before a send); LeaseLost if not."""
        renewed = run_statement(self.url, sql.RENEW, {"sid": claim.session_id, "token": claim.token,
                                                   "until": now() + timedelta(seconds=lease_seconds)})
        if not renewed:
            raise LeaseLost(str(claim.session_id))

    # -- turns --------------------------------------------------------------------------------------------------

    def next_turn(self, claim: Claim, lease_seconds: float, history_limit: int | Mapping[str, int],
                  force: bool = False, take: Mapping[str, int] | None = None) -> Turn | None:
        """The inbox message whose turn it is (lowest seq, right after last_seq), with its context; renews the
        lease. None if the inbox is empty or its head waits for an earlier message (unless `force`). With `take`
        (see `claim`), the ready messages after it too, up to that many: a burst. On PostgreSQL, a turn of one
        message is one call of `cs_next_turn` (migration 0007)."""
        if force or _take(take, claim) > 1 or not self._functions():
            return self._next_turn(claim, lease_seconds, history_limit, force, take)
        t, monotonic = _clock()
        read = {"limit": history_limit} if isinstance(history_limit, int) else {"limits": history_limit}
        out = run_call(self.url, sql.NEXT_TURN_CALL, {"sid": claim.session_id, "token": claim.token,
                                                      "until": t + timedelta(seconds=lease_seconds),
                                                      "read": json.dumps(read)}).scalar()
        if out is None:
            raise LeaseLost(str(claim.session_id))
        generation, last_seq, last_activity_at, mode, operator, notice_sent = out["session"]
        claim = replace(claim, generation=generation, last_seq=last_seq, last_activity_at=_timestamp(last_activity_at),
                        renewed_at=monotonic, mode=mode, operator=operator, notice_sent=notice_sent, outbox=(),
                        turn=None)
        return _turn(claim, [_Head(*h) for h in out["heads"]], history_limit, False,
                     lambda _limit: _history_rows(out["history"]))

    @transactional
    def _next_turn(self, c: Connection, claim: Claim, lease_seconds: float, history_limit: int | Mapping[str, int],
                   force: bool, take: Mapping[str, int] | None) -> Turn | None:
        t, monotonic = _clock()
        row = execute(c, sql.RENEW_FOR_TURN, {"sid": claim.session_id, "token": claim.token,
                                          "until": t + timedelta(seconds=lease_seconds)}).first()
        if row is None:
            raise LeaseLost(str(claim.session_id))
        claim = replace(claim, generation=row.generation, last_seq=row.last_seq,
                        last_activity_at=as_utc(row.last_activity_at), renewed_at=monotonic, mode=row.mode,
                        operator=row.operator, notice_sent=row.notice_sent, outbox=(), turn=None)
        heads = execute(c, sql.HEAD, {"sid": claim.session_id, "take": _take(take, claim)}).all()
        return _turn(claim, heads, history_limit, force, _history(c, claim))

    def commit_turn(self, turn: Turn, reply: str | None, *, new_generation: bool = False,
                    reset: bool = False, supersede: bool = False, handoff: HandoffRequest | None = None,
                    notice: bool = False) -> Settled:
        """Move the turn's messages from the inbox into the conversation with its reply (the outbox entry), all or
        nothing; returns the reply to send and whether the next message is ready. LeaseLost if the fencing token
        moved, AlreadyStored if a platform id is already stored.

        `new_generation` (/new): the message closes its generation, the next one starts after it. `reset` (a reset
        policy): a new generation starts with this turn — its messages stored in it, after its `new_session` event.
        A burst's messages are stored in order and all their seqs settle here. `supersede` (burst = "latest"): if a
        newer message of the session is already waiting, the reply is stored `skipped`, never sent (that message's
        turn answers the whole burst).

        `handoff`: the session now waits for a person (from the mode the turn read; an operator's takeover meanwhile
        stands). `notice`: the reply is the handoff's notice to the user (said once per handoff)."""
        if not (turn.earlier or new_generation or reset or supersede or handoff or notice) and self._functions():
            return self._commit_call(turn, reply)
        return self._commit_turn(turn, reply, new_generation=new_generation, reset=reset, supersede=supersede,
                                 handoff=handoff, notice=notice)

    def _commit_call(self, turn: Turn, reply: str | None) -> Settled:
        """commit_turn's common case on PostgreSQL, one message and its reply, as one call of `cs_commit_turn`
        (migration 0007): the statements of `_commit_turn` for that case, in one round trip."""
        claim, msg, (t, monotonic) = turn.claim, turn.message, _clock()
        user_sent_at = datetime.fromtimestamp(msg.sent_at, timezone.utc) if msg.sent_at else None
        try:
            row = run_call(self.url, sql.COMMIT_TURN_CALL, {
                "sid": claim.session_id, "token": claim.token, "gen": claim.generation, "t": t,
                "until": t + timedelta(seconds=claim.lease_seconds), "item": turn.item_id, "seq": msg.seq,
                "channel": msg.channel_id, "chat": msg.chat_id, "kind": msg.chat_kind, "thread": msg.thread_id,
                "sender_id": msg.sender_id, "sender_name": msg.sender_name, "text": msg.text,
                "pmid": msg.platform_message_id, "reply": reply or None, "reply_sender_id": AGENT_SENDER[0],
                "reply_sender_name": AGENT_SENDER[1], "user_sent_at": user_sent_at}).one()
        except IntegrityError as exc:
            if _platform_id_taken(exc):
                raise AlreadyStored(msg.platform_message_id) from None
            raise
        if not row.held:
            raise LeaseLost(msg.session_key)
        replies = () if row.reply_id is None else (
            PendingReply(row.reply_id, msg.channel_id, msg.chat_id, msg.chat_kind, reply, msg.thread_id, user_sent_at),)
        return Settled(replies, row.ready, renewed_at=monotonic)

    @transactional
    def _commit_turn(self, c: Connection, turn: Turn, reply: str | None, *, new_generation: bool, reset: bool,
                     supersede: bool, handoff: HandoffRequest | None, notice: bool) -> Settled:
        claim, msg, (t, monotonic) = turn.claim, turn.message, _clock()
        generation = claim.generation + 1 if new_generation or reset else claim.generation
        inbound = turn.messages
        count = len(inbound) + (1 if reply else 0)
        row = execute(c, sql.COMMIT, {"sid": claim.session_id, "token": claim.token, "count": count, "t": t,
                                  "gen": generation, "seq": msg.seq,  # the newest: a burst's highest seq
                                  "until": t + timedelta(seconds=claim.lease_seconds)}).first()
        if row is None:
            raise LeaseLost(msg.session_key)
        for item_id, _ in turn.earlier:
            execute(c, sql.TAKE_ITEM, {"item": item_id})
        execute(c, sql.TAKE_ITEM, {"item": turn.item_id})
        position = row.message_count - count
        if reset:
            execute(c, sql.ADD_EVENT, sql.event(claim.session_id, generation, NEW_GENERATION, t))
            claim = replace(claim, generation=generation)  # the messages and the reply belong to the new one
        try:
            for m in inbound:
                inbound_id = execute(c, sql.ADD_MESSAGE, self._message(
                    claim, m, position, "user", m.sender_id, m.sender_name, m.text, t,
                    platform_message_id=m.platform_message_id, ingress_seq=m.seq)).scalar_one()
                position += 1
        except IntegrityError as exc:
            if _platform_id_taken(exc):
                raise AlreadyStored(msg.platform_message_id) from None
            raise
        if new_generation:
            execute(c, sql.ADD_EVENT, sql.event(claim.session_id, generation, NEW_GENERATION, t))
        if handoff is not None:
            if execute(c, sql.SET_MODE, {"sid": claim.session_id, "token": claim.token, "seen": claim.mode,
                                         "new_mode": WAITING, "t": t, "reason": handoff.reason,
                                         "noticed": notice}).first():
                execute(c, sql.ADD_EVENT, sql.event(claim.session_id, generation, HANDOFF_REQUESTED, t,
                                                    handoff.actor, handoff.reason))
        elif notice:
            execute(c, sql.NOTICED, {"sid": claim.session_id, "token": claim.token, "seen": claim.mode})
        replies: tuple[PendingReply, ...] = ()
        stale = False
        if reply:
            stale = supersede and bool(execute(c, sql.NEWER, {"sid": claim.session_id, "seq": msg.seq}).scalar())
            user_sent_at = datetime.fromtimestamp(msg.sent_at, timezone.utc) if msg.sent_at else None
            sender_id, sender_name = NOTICE_SENDER if notice else AGENT_SENDER
            reply_id = execute(c, sql.ADD_MESSAGE, self._message(
                claim, msg, position, "assistant", sender_id, sender_name, reply, t, in_reply_to=inbound_id,
                delivery_status=SKIPPED if stale else PENDING, user_sent_at=user_sent_at)).scalar_one()
            if not stale:
                replies = (PendingReply(reply_id, msg.channel_id, msg.chat_id, msg.chat_kind, reply, msg.thread_id,
                                        user_sent_at),)
        return Settled(replies, _ready(c, claim.session_id, row.last_seq), superseded=stale, renewed_at=monotonic)

    @transactional
    def commit_operator_reply(self, c: Connection, turn: Turn, text: str, refused: str | None = None) -> Settled:
        """An operator's reply (an inbox message of its own, so it follows every message stored before it) stored as
        the session's next outbox entry, sent with the operator's name. Stored only while that operator has the
        session (it restarts their idle clock); otherwise, or with `refused`, it is stored failed with the reason,
        never sent — visible to the operator in the transcript. AlreadyStored on a redelivery."""
        claim, msg, (t, monotonic) = turn.claim, turn.message, _clock()
        row = execute(c, sql.COMMIT, {"sid": claim.session_id, "token": claim.token, "count": 1, "t": t,
                                      "gen": claim.generation, "seq": msg.seq,
                                      "until": t + timedelta(seconds=claim.lease_seconds)}).first()
        if row is None:
            raise LeaseLost(msg.session_key)
        execute(c, sql.TAKE_ITEM, {"item": turn.item_id})
        if refused is None and not execute(c, sql.OPERATOR_ACTIVE, {"sid": claim.session_id, "token": claim.token,
                                                                      "op": msg.sender_name, "t": t}).first():
            refused = f"not sent: {msg.sender_name} no longer has the session"
        user_sent_at = datetime.fromtimestamp(msg.sent_at, timezone.utc) if msg.sent_at else None
        try:
            reply_id = execute(c, sql.ADD_MESSAGE, self._message(
                claim, msg, row.message_count - 1, "assistant", msg.sender_id, msg.sender_name, text, t,
                platform_message_id=msg.platform_message_id, ingress_seq=msg.seq,
                delivery_status=FAILED if refused else PENDING, user_sent_at=user_sent_at,
                delivery_error=refused)).scalar_one()
        except IntegrityError as exc:
            if _platform_id_taken(exc):
                raise AlreadyStored(msg.platform_message_id) from None
            raise
        replies = () if refused else (PendingReply(reply_id, msg.channel_id, msg.chat_id, msg.chat_kind, text,
                                                   msg.thread_id, user_sent_at),)
        return Settled(replies, _ready(c, claim.session_id, row.last_seq), renewed_at=monotonic)

    @staticmethod
    def _message(claim: Claim, route: InboundMessage, position: int, role: str, sender_id: str, sender_name: str,
                 text: str, t: datetime, platform_message_id: str | None = None, ingress_seq: int | None = None,
                 in_reply_to: int | None = None, delivery_status: str | None = None,
                 user_sent_at: datetime | None = None, delivery_error: str | None = None) -> dict:
        """A messages row (every column named, so both kinds of message share one compiled INSERT). `route` is the
        inbound message stored, or answered: its channel and chat are the row's (a reply goes back there)."""
        return {"session_id": claim.session_id, "generation": claim.generation, "position": position, "role": role,
                "sender_id": sender_id, "sender_name": sender_name, "text": text, "channel_id": route.channel_id,
                "chat_id": route.chat_id, "chat_kind": route.chat_kind, "thread_id": route.thread_id,
                "user_sent_at": user_sent_at, "platform_message_id": platform_message_id, "ingress_seq": ingress_seq,
                "created_at": t, "in_reply_to": in_reply_to, "delivery_status": delivery_status,
                "delivery_error": delivery_error, "delivery_attempts": 0}

    @transactional
    def discard(self, c: Connection, turn: Turn) -> Settled:
        """Drop an inbox message that turned out to be stored already (a redelivery); returns the session's unsent
        replies (its own, if it was committed but never sent) and whether the next message is ready."""
        row = execute(c, sql.SETTLE_SEQ, {"sid": turn.claim.session_id, "token": turn.claim.token,
                                      "seq": turn.message.seq}).first()
        if row is None:  # another holder took over: it takes the inbox; our next fencing check stops us
            return Settled((), False)
        execute(c, sql.TAKE_ITEM, {"item": turn.item_id})
        return Settled(_outbox(c, turn.claim), _ready(c, turn.claim.session_id, row.last_seq))

    @transactional
    def dead_letter(self, c: Connection, turn: Turn, error: str, attempts: int, handoff: HandoffRequest | None = None,
                    notice: str | None = None) -> Settled:
        """Set a failed turn's messages aside (fenced, like a commit) so the session goes on with its next message
        (a burst: each of its messages becomes a dead letter of its own). `handoff` (handoff_on_failure): the
        session now waits for a person, and the user is told `notice`."""
        msg, t = turn.message, now()
        error = error.replace("\x00", "\ufffd")[:4000]  # an error may quote the value PostgreSQL refused
        row = execute(c, sql.SETTLE_DEAD, {"sid": turn.claim.session_id, "token": turn.claim.token, "seq": msg.seq,
                                       "t": t}).first()
        if row is None:
            raise LeaseLost(msg.session_key)
        for item_id, m in (*turn.earlier, (turn.item_id, msg)):
            execute(c, sql.TAKE_ITEM, {"item": item_id})
            c.execute(self.insert(DeadLetter).values(
                channel_id=m.channel_id, session_key=m.session_key, platform_message_id=m.platform_message_id,
                payload=json.dumps(m.to_dict()), error=error, attempts=attempts, created_at=t,
            ).on_conflict_do_update(index_elements=["channel_id", "platform_message_id"],
                                    set_={"error": error, "attempts": attempts, "created_at": t}))
        replies: tuple[PendingReply, ...] = ()
        claim = turn.claim
        if handoff is not None and execute(c, sql.SET_MODE, {
                "sid": claim.session_id, "token": claim.token, "seen": claim.mode, "new_mode": WAITING, "t": t,
                "reason": handoff.reason, "noticed": bool(notice)}).first():
            execute(c, sql.ADD_EVENT, sql.event(claim.session_id, claim.generation, HANDOFF_REQUESTED, t,
                                                handoff.actor, handoff.reason))
            if notice:
                position = execute(c, sql.NEXT_POSITION, {"sid": claim.session_id, "token": claim.token}).scalar_one()
                user_sent_at = datetime.fromtimestamp(msg.sent_at, timezone.utc) if msg.sent_at else None
                reply_id = execute(c, sql.ADD_MESSAGE, self._message(
                    claim, msg, position - 1, "assistant", *NOTICE_SENDER, notice, t, delivery_status=PENDING,
                    user_sent_at=user_sent_at)).scalar_one()
                replies = (PendingReply(reply_id, msg.channel_id, msg.chat_id, msg.chat_kind, notice, msg.thread_id,
                                        user_sent_at),)
        return Settled(replies, _ready(c, claim.session_id, row.last_seq))

    # -- the outbox ---------------------------------------------------------------------------------------------

    @transactional
    def pending_replies(self, c: Connection, session_id: int) -> list[PendingReply]:
        """Unsent replies of a session, in order (the outbox; a turn gets them with its claim)."""
        rows = c.execute(
            select(sql.messages.c.id, sql.messages.c.text, *sql.ROUTE, sql.sessions.c.chat_id.label("session_chat_id"),
                   sql.sessions.c.chat_kind.label("session_chat_kind"))
            .join_from(sql.messages, sql.sessions, sql.sessions.c.id == sql.messages.c.session_id)
            .where(sql.messages.c.session_id == session_id, sql.UNSENT).order_by(sql.messages.c.position)
        ).all()
        return [_pending(r, r.session_chat_id, r.session_chat_kind) for r in rows]

    def mark_delivery(self, reply_id: int, delivery: Delivery, retry_for_s: float = 60.0) -> None:
        """Record a send's outcome. Retried in place on a database outage: the reply already left, and a
        retried turn would find it still pending and send it again."""
        params = _delivery_params(reply_id, delivery)
        deadline, wait = time.monotonic() + retry_for_s, 0.2
        while True:
            try:
                run_statement(self.url, sql.MARK_DELIVERY, params)
                return
            except DB_UNAVAILABLE:
                if time.monotonic() > deadline:
                    raise
                time.sleep(wait)
                wait = min(wait * 2, 5.0)
