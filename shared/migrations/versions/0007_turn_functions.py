"""turn functions: on PostgreSQL, the common case of each of a turn's transactions is one function call

A transaction of six short statements cost the worker ~0.5 ms of CPU and PostgreSQL ~0.45 ms, mostly in the
round trips (BEGIN, each statement, COMMIT); one call of a PL/pgSQL function doing the same work costs ~0.08 and
~0.24 ms. A volatile PL/pgSQL function takes a new snapshot for each statement, as separate statements of a
READ COMMITTED transaction do, so the reads after a row lock see what committed before it, as before.
workers/store.py calls these for the common case and keeps its statements for the rest and for SQLite.

Revision ID: 0007
Revises: 0006
"""
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# The turn a holder takes next: the inbox's head, with the session's newest messages of generation `_gen` when the
# head is the next message (`_last` + 1) and not stored yet, read with the limit of the head's channel: `_read`'s
# "limit", else its "limits" for the head's channel, else for the session's (the store's `_turn`).
TURN_READ = """
CREATE OR REPLACE FUNCTION cs_turn_read(_sid bigint, _gen int, _last bigint, _session_channel text, _read json,
                                        OUT heads json, OUT lim int, OUT history json)
LANGUAGE plpgsql AS $$
DECLARE _head record;
BEGIN
  heads := '[]';
  history := '[]';
  SELECT i.id, i.seq, i.payload, i.channel_id,
         EXISTS (SELECT 1 FROM messages m WHERE m.channel_id = i.channel_id
                                            AND m.platform_message_id = i.platform_message_id) AS stored
    INTO _head FROM inbox i WHERE i.session_id = _sid ORDER BY i.seq, i.id LIMIT 1;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  heads := json_build_array(json_build_array(_head.id, _head.seq, _head.payload, _head.stored));
  IF _head.stored OR _head.seq > _last + 1 THEN
    RETURN;
  END IF;
  lim := coalesce((_read->>'limit')::int, nullif((_read->'limits'->>_head.channel_id)::int, 0),
                  (_read->'limits'->>_session_channel)::int);
  SELECT coalesce(json_agg(json_build_array(role, sender_id, sender_name, text, created_at) ORDER BY position DESC),
                  '[]')
    INTO history
    FROM (SELECT position, role, sender_id, sender_name, text, created_at FROM messages
           WHERE session_id = _sid AND generation = _gen
             AND (delivery_status IS NULL OR delivery_status <> 'skipped')
           ORDER BY position DESC LIMIT lim) newest;
END $$
"""

# A message into the inbox of its session — created if new (with its `created` event) — claiming the lease if free
# and reading the new holder's work (Store.accept). NULL, with nothing done, for the cases the store's statements
# handle: a dormant session, a restarted ingress numbering, or a claim on a channel that takes bursts (a turn of
# several messages, which the store puts together). `_read`: {"limits": {channel: history limit}, "takes": {channel: messages per turn}}, or NULL
# to read only the outbox. The turn (the inbox's head, when it is the next message) comes with its history, read
# with the limit of the head's channel (`limit` in the result).
ACCEPT = """
CREATE OR REPLACE FUNCTION cs_accept(_key text, _seq bigint, _t timestamptz, _until timestamptz, _channel text,
                                     _chat_kind text, _chat_id text, _pmid text, _payload text,
                                     _idle_since timestamptz, _read json) RETURNS json
LANGUAGE plpgsql AS $$
DECLARE s record; c record; _claimed boolean := false; _inserted int; _outbox json; _gen int;
        _heads json := '[]'; _lim int; _history json := '[]';
BEGIN
  SELECT id, channel_id, status, last_seq, last_activity_at, lease_until INTO s FROM sessions WHERE key = _key;
  IF NOT FOUND THEN
    IF _until IS NOT NULL AND coalesce((_read->'takes'->>_channel)::int, 1) > 1 THEN
      RETURN NULL;
    END IF;
    INSERT INTO sessions (channel_id, key, chat_kind, chat_id, status, generation, message_count, last_seq,
                          lease_token, lease_until, created_at, last_activity_at)
         VALUES (_channel, _key, _chat_kind, _chat_id, 'active', 1, 0, 0, 0, NULL, _t, _t)
    ON CONFLICT (key) DO NOTHING
      RETURNING id, channel_id, status, last_seq, last_activity_at, lease_until INTO s;
    IF FOUND THEN
      INSERT INTO session_events (session_id, generation, event, at) VALUES (s.id, 1, 'created', _t);
    ELSE  -- a concurrent accept created it (and committed: ON CONFLICT waited for it)
      SELECT id, channel_id, status, last_seq, last_activity_at, lease_until INTO s FROM sessions WHERE key = _key;
    END IF;
  END IF;
  IF s.status <> 'active' OR (_seq > 0 AND _seq <= s.last_seq AND s.last_activity_at < _idle_since)
     OR (coalesce((_read->'takes'->>s.channel_id)::int, 1) > 1 AND (s.lease_until IS NULL OR s.lease_until < _t)) THEN
    RETURN NULL;
  END IF;
  IF _until IS NOT NULL AND (s.lease_until IS NULL OR s.lease_until < _t) THEN
    UPDATE sessions SET lease_token = lease_token + 1, lease_until = _until
     WHERE id = s.id AND (lease_until IS NULL OR lease_until < _t)
     RETURNING id, channel_id, lease_token, generation, last_seq, chat_id, chat_kind, status, last_activity_at, mode,
               operator, notice_sent INTO c;
    _claimed := FOUND;
  END IF;
  INSERT INTO inbox (session_id, channel_id, platform_message_id, seq, payload, created_at)
       VALUES (s.id, _channel, _pmid, _seq, _payload, _t)
  ON CONFLICT (channel_id, platform_message_id) DO NOTHING;
  GET DIAGNOSTICS _inserted = ROW_COUNT;
  IF NOT _claimed THEN
    RETURN json_build_object('sid', s.id, 'inserted', _inserted > 0);
  END IF;
  SELECT coalesce(json_agg(json_build_array(id, text, channel_id, chat_id, chat_kind, thread_id, user_sent_at)
                           ORDER BY position), '[]')
    INTO _outbox FROM messages WHERE session_id = s.id AND delivery_status = 'pending';
  IF _read IS NOT NULL THEN
    SELECT heads, lim, history INTO _heads, _lim, _history
      FROM cs_turn_read(s.id, c.generation, c.last_seq, c.channel_id, _read);
    IF json_array_length(_heads) > 0 AND c.status = 'dormant' THEN  -- the dormancy sweep raced this accept
      UPDATE sessions SET status = 'active' WHERE id = s.id AND status = 'dormant' RETURNING generation INTO _gen;
      IF FOUND THEN
        INSERT INTO session_events (session_id, generation, event, at) VALUES (s.id, _gen, 'resumed', _t);
      END IF;
    END IF;
  END IF;
  RETURN json_build_object('sid', s.id, 'inserted', _inserted > 0, 'claim',
                           json_build_array(c.id, c.channel_id, c.lease_token, c.generation, c.last_seq, c.chat_id,
                                            c.chat_kind, c.status, c.last_activity_at, c.mode, c.operator,
                                            c.notice_sent),
                           'outbox', _outbox, 'heads', _heads, 'limit', _lim, 'history', _history);
END $$
"""

# The holder's next turn (Store.next_turn, one message a turn): the lease renewed if the token still holds it (NULL
# if not), the session's state as of now, and the turn.
NEXT_TURN = """
CREATE OR REPLACE FUNCTION cs_next_turn(_sid bigint, _token bigint, _until timestamptz, _read json) RETURNS json
LANGUAGE plpgsql AS $$
DECLARE c record; _turn record;
BEGIN
  UPDATE sessions SET lease_until = _until WHERE id = _sid AND lease_token = _token
   RETURNING channel_id, generation, last_seq, last_activity_at, mode, operator, notice_sent INTO c;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  SELECT * INTO _turn FROM cs_turn_read(_sid, c.generation, c.last_seq, c.channel_id, _read);
  RETURN json_build_object('session', json_build_array(c.generation, c.last_seq, c.last_activity_at, c.mode,
                                                       c.operator, c.notice_sent),
                           'heads', _turn.heads, 'limit', _turn.lim, 'history', _turn.history);
END $$
"""

# Give the lease up, recording the last send's outcome first (`_rid` NULL: none); whether an inbox message is ready
# (Store.release; more than one send to record takes the store's statements).
RELEASE = """
CREATE OR REPLACE FUNCTION cs_release(_sid bigint, _token bigint, _rid bigint, _outcome text, _error text,
                                      _attempts int, _at timestamptz) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE _last bigint;
BEGIN
  IF _rid IS NOT NULL THEN
    UPDATE messages SET delivery_status = _outcome, delivery_error = _error,
                        delivery_attempts = delivery_attempts + _attempts, delivered_at = _at
     WHERE id = _rid;
  END IF;
  UPDATE sessions SET lease_until = NULL WHERE id = _sid AND lease_token = _token RETURNING last_seq INTO _last;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  RETURN EXISTS (SELECT 1 FROM inbox WHERE session_id = _sid AND seq <= _last + 1);
END $$
"""

# A turn of one message with at most one reply, and nothing else to record (Store.commit_turn): fenced by the
# token and renewing the lease; NULL `held` if the token moved. A platform id stored already raises
# unique_violation on uq_messages_platform_id, and nothing of the call is applied.
COMMIT_TURN = """
CREATE OR REPLACE FUNCTION cs_commit_turn(
    _sid bigint, _token bigint, _gen int, _t timestamptz, _until timestamptz, _item bigint, _seq bigint,
    _channel text, _chat text, _kind text, _thread text, _sender_id text, _sender_name text, _text text, _pmid text,
    _reply text, _reply_sender_id text, _reply_sender_name text, _user_sent_at timestamptz,
    OUT held boolean, OUT reply_id bigint, OUT ready boolean)
LANGUAGE plpgsql AS $$
DECLARE _count int := CASE WHEN _reply IS NULL THEN 1 ELSE 2 END; _pos int; _last bigint; _in bigint;
BEGIN
  UPDATE sessions SET message_count = message_count + _count, last_activity_at = _t, generation = _gen,
                      status = 'active', last_seq = CASE WHEN last_seq < _seq THEN _seq ELSE last_seq END,
                      lease_until = _until
   WHERE id = _sid AND lease_token = _token
   RETURNING message_count - _count, last_seq INTO _pos, _last;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  DELETE FROM inbox WHERE id = _item;
  INSERT INTO messages (session_id, generation, position, role, sender_id, sender_name, text, channel_id, chat_id,
                        chat_kind, thread_id, platform_message_id, ingress_seq, created_at, delivery_attempts)
       VALUES (_sid, _gen, _pos, 'user', _sender_id, _sender_name, _text, _channel, _chat, _kind, _thread, _pmid,
               _seq, _t, 0)
    RETURNING id INTO _in;
  IF _reply IS NOT NULL THEN
    INSERT INTO messages (session_id, generation, position, role, sender_id, sender_name, text, channel_id, chat_id,
                          chat_kind, thread_id, user_sent_at, created_at, in_reply_to, delivery_status,
                          delivery_attempts)
         VALUES (_sid, _gen, _pos + 1, 'assistant', _reply_sender_id, _reply_sender_name, _reply, _channel, _chat,
                 _kind, _thread, _user_sent_at, _t, _in, 'pending', 0)
      RETURNING id INTO reply_id;
  END IF;
  held := true;
  ready := EXISTS (SELECT 1 FROM inbox WHERE session_id = _sid AND seq <= _last + 1);
END $$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(TURN_READ)
    op.execute(ACCEPT)
    op.execute(NEXT_TURN)
    op.execute(COMMIT_TURN)
    op.execute(RELEASE)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION IF EXISTS cs_accept")
    op.execute("DROP FUNCTION IF EXISTS cs_next_turn")
    op.execute("DROP FUNCTION IF EXISTS cs_turn_read")
    op.execute("DROP FUNCTION IF EXISTS cs_commit_turn")
    op.execute("DROP FUNCTION IF EXISTS cs_release")
