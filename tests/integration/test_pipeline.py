"""End to end through real HTTP: webhook -> gunicorn ingress -> Redis partition queues -> two worker pools ->
PostgreSQL -> the platforms' send APIs (the stand-in). See conftest.py for the stack.

Chat ids are unique per test so the stand-in's records of one test never mix with another's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cli.standins.payloads import encode, sign_discord, sign_whatsapp, telegram_headers, telegram_text
from ingress.publisher import Publisher
from shared.config import load_settings
from shared.messages import InboundMessage
from shared.transcripts import transcript

pytestmark = pytest.mark.integration

# The channels of the integration config (conftest.config_toml); the channel id is also the stand-in prefix.
WA, WA2, WA_ECHO = "wa", "wa2", "wa-echo"  # WhatsApp: demo, demo (another phone_number_id), echo
TG, TG_ECHO = "tg", "tg-echo"  # Telegram: demo (bot @ItSupportBot), echo
DC = "dc"  # Discord (demo), through the signed interactions endpoint

NEW_SESSION_REPLY = "Started a new conversation."  # workers.turn.NEW_SESSION_REPLY starts with this
GUILD = "1280000000000000001"


def session_key(channel_id: str, kind: str, chat_id: str) -> str:
    """The documented key format (shared.channels.base.session_key), spelled out so a change shows up here."""
    return f"{channel_id}:{kind}:{chat_id}"


# --------------------------------------------------------------------------------------------------------------------
# (1) many sessions interleaved across the three platforms


@dataclass
class Conversation:
    """One session of the load test: five messages sent in order, five replies expected in order."""

    label: str
    prefix: str  # channel id = stand-in prefix of its replies
    chat_id: str  # where its replies must go
    key: str
    sends: list[Callable[[], object]]  # each posts one message (in this order)
    expect: list[str]  # per reply: exact text (echo) or a fragment it must contain (demo)
    exact: bool
    own_facts: set[str] = field(default_factory=set)


def _wa_dm(stack, channel: str, i: int, echo: bool) -> Conversation:
    phone = f"5511{i:08d}"
    key = session_key(channel, "dm", phone)
    if echo:
        texts = [f"{key} message {n}" for n in range(1, 6)]
        sends = [lambda t=t: stack.whatsapp(channel, phone, t) for t in texts]
        return Conversation(f"wa-dm-echo-{i}", channel, phone, key, sends, [f"echo: {t}" for t in texts], True)
    name, order = f"User{i:02d}", f"51{i:04d}"
    return _demo_dm(f"wa-dm-{i}", channel, phone, key, name, order,
                    lambda text: stack.whatsapp(channel, phone, text, name=f"Person {i}"))


def _demo_dm(label: str, prefix: str, chat: str, key: str, name: str, order: str,
             send: Callable[[str], object]) -> Conversation:
    texts = [f"Hi, my order {order} has not arrived", f"my name is {name}", "can you help me with the delivery",
             "what is my name?", "where is my order?"]
    expect = [f"noted order {order}", f"Nice to meet you, {name}!", f"{name}, thanks for your message",
              f"Your name is {name}.", f"{name}, your order {order} is on its way"]
    return Conversation(label, prefix, chat, key, [lambda t=t: send(t) for t in texts], expect, False, {name, order})


def _demo_group(label: str, prefix: str, chat: str, key: str, members: tuple[str, str], order: str,
                send: Callable[[int, str], object]) -> Conversation:
    """Two members alternate; in groups the demo Agent greets whoever spoke and shares the group's context."""
    a, b = members
    script = [(0, f"my order {order} is late"), (1, "hello there"), (0, "any news for us"), (1, "anyone here"),
              (1, "where is my order?")]
    expect = [f"{a}, thanks, I noted order {order}", f"{b}, thanks for your message", f"{a}, thanks for your message",
              f"{b}, thanks for your message", f"{b}, your order {order} is on its way"]
    sends = [lambda m=m, t=t: send(m, t) for m, t in script]
    return Conversation(label, prefix, chat, key, sends, expect, False, {a, b, order})


def _conversations(stack) -> list[Conversation]:
    convs: list[Conversation] = []
    n = iter(range(100))
    # WhatsApp DMs: demo on two channels, echo on a third.
    convs += [_wa_dm(stack, WA, next(n), echo=False) for _ in range(4)]
    convs += [_wa_dm(stack, WA2, next(n), echo=False) for _ in range(2)]
    convs += [_wa_dm(stack, WA_ECHO, next(n), echo=True) for _ in range(4)]
    # WhatsApp groups (demo): two members each.
    for _ in range(3):
        i = next(n)
        group, phones, names = f"GRP{i:04d}IT", (f"5512{i:06d}01", f"5512{i:06d}02"), (f"Mema{i:02d}", f"Memb{i:02d}")
        convs.append(_demo_group(
            f"wa-group-{i}", WA, group, session_key(WA, "group", group), names, f"52{i:04d}",
            lambda m, t, group=group, phones=phones, names=names: stack.whatsapp(
                WA, phones[m], t, name=names[m], group_id=group)))
    # Telegram DMs (demo and echo) and groups (demo; a "group" and a "supergroup").
    for _ in range(4):
        i = next(n)
        chat = 700_000_000 + i
        convs.append(_demo_dm(f"tg-dm-{i}", TG, str(chat), session_key(TG, "dm", str(chat)), f"User{i:02d}",
                              f"53{i:04d}", lambda t, chat=chat, i=i: stack.telegram(TG, chat, chat, f"Tg{i}", t)))
    for _ in range(4):
        i = next(n)
        chat = 710_000_000 + i
        key = session_key(TG_ECHO, "dm", str(chat))
        texts = [f"{key} message {k}" for k in range(1, 6)]
        sends = [lambda t=t, chat=chat: stack.telegram(TG_ECHO, chat, chat, "Echo", t) for t in texts]
        convs.append(Conversation(f"tg-dm-echo-{i}", TG_ECHO, str(chat), key, sends, [f"echo: {t}" for t in texts],
                                  True))
    for kind in ("group", "supergroup", "group"):
        i = next(n)
        chat = -(4_000_000_000 + i)
        users, names = (720_000_000 + 2 * i, 720_000_001 + 2 * i), (f"Mema{i:02d}", f"Memb{i:02d}")
        convs.append(_demo_group(
            f"tg-{kind}-{i}", TG, str(chat), session_key(TG, "group", str(chat)), names, f"54{i:04d}",
            lambda m, t, chat=chat, users=users, names=names, kind=kind: stack.telegram(
                TG, chat, users[m], names[m], t, chat_type=kind, title=f"Group {chat}")))
    # Discord through the signed interactions endpoint: guild channels (two members) and DMs.
    for _ in range(3):
        i = next(n)
        channel = str(1290000000000000000 + i)
        users = (str(402900000000000000 + 2 * i), str(402900000000000001 + 2 * i))
        names = (f"Mema{i:02d}", f"Memb{i:02d}")
        convs.append(_demo_group(
            f"dc-guild-{i}", DC, channel, session_key(DC, "group", channel), names, f"55{i:04d}",
            lambda m, t, channel=channel, users=users, names=names: stack.discord_ask(
                channel, users[m], names[m], t, guild_id=GUILD)))
    for _ in range(2):
        i = next(n)
        channel = str(1291000000000000000 + i)
        convs.append(_demo_dm(f"dc-dm-{i}", DC, channel, session_key(DC, "dm", channel), f"User{i:02d}", f"56{i:04d}",
                              lambda t, channel=channel, i=i: stack.discord_ask(channel, str(403000000000000000 + i),
                                                                                 f"Dc{i}", t)))
    # Pad to 30 sessions with WhatsApp echo DMs.
    while len(convs) < 30:
        convs.append(_wa_dm(stack, WA_ECHO, next(n), echo=True))
    return convs


def test_many_sessions_interleaved_across_platforms(stack):
    convs = _conversations(stack)
    assert len(convs) == 30 and len({c.key for c in convs}) == 30

    # Sessions run concurrently; inside a session each POST follows the previous one's 200 (that is the order
    # the ingress sees and must keep), without waiting for any reply.
    def play(conv: Conversation) -> None:
        for send in conv.sends:
            send()

    with ThreadPoolExecutor(max_workers=16) as pool:
        for future in [pool.submit(play, c) for c in convs]:
            future.result()

    everyone_facts = set().union(*(c.own_facts for c in convs))
    for conv in convs:
        got = stack.wait_replies(conv.prefix, conv.chat_id, 5, timeout=120)
        assert len(got) == 5, f"{conv.label}: more replies than messages: {got}"
        if conv.exact:
            assert got == conv.expect, f"{conv.label}: replies out of order or wrong"
        else:
            for n, (reply, fragment) in enumerate(zip(got, conv.expect), 1):
                assert fragment in reply, f"{conv.label}: reply {n} {reply!r} should contain {fragment!r}; all: {got}"
            foreign = {fact for fact in everyone_facts - conv.own_facts if any(fact in r for r in got)}
            assert not foreign, f"{conv.label}: replies carry another session's facts {foreign}: {got}"

    # Every reply went to its own chat only: the stand-in got exactly 5 replies per session in this test.
    chats = {(c.prefix, c.chat_id) for c in convs}
    sent_here = [s for s in stack.standin.sent if (s.prefix, s.chat_id) in chats]
    assert len(sent_here) == 5 * len(convs)

    # The store agrees: each session has 5 inbound + 5 sent replies, in the ingress order (seq 1..5).
    for conv in convs:
        rows = stack.wait_settled(conv.key, 5)
        users = [m for m in rows if m["role"] == "user"]
        assert [m["ingress_seq"] for m in users] == [1, 2, 3, 4, 5], conv.label
        assert [m["role"] for m in rows] == ["user", "assistant"] * 5, conv.label
        assert all(m["delivery_status"] == "sent" for m in rows if m["role"] == "assistant"), conv.label


# --------------------------------------------------------------------------------------------------------------------
# (2) groups: members share one context, the store keeps who said what


def test_whatsapp_group_members_share_context_and_authorship_is_stored(stack):
    group = "120363000000000001@g.us"
    ana, bruno = "5521900000001", "5521900000002"
    key = session_key(WA, "group", group)
    stack.whatsapp(WA, ana, "Hi, my order 222001 is late", name="Ana Souza", group_id=group)
    stack.wait_replies(WA, group, 1)
    stack.whatsapp(WA, bruno, "where is my order?", name="Bruno Lima", group_id=group)
    replies = stack.wait_replies(WA, group, 2)
    assert replies[1].startswith("Bruno Lima, your order 222001 is on its way"), replies

    # The replies went to the group, as a group message.
    to_group = [s for s in stack.standin.sent if s.prefix == WA and s.chat_id == group]
    assert all(s.body["recipient_type"] == "group" and s.body["to"] == group for s in to_group)

    rows = stack.wait_settled(key, 2)
    assert [(m["role"], m["sender_id"], m["sender_name"]) for m in rows] == [
        ("user", ana, "Ana Souza"), ("assistant", "agent", "Agent"),
        ("user", bruno, "Bruno Lima"), ("assistant", "agent", "Agent"),
    ]
    shown = stack.cli("sessions", "show", key)
    assert shown.returncode == 0, shown.stderr
    assert "g1 Ana Souza: Hi, my order 222001 is late" in shown.stdout, shown.stdout
    assert "g1 Bruno Lima: where is my order?" in shown.stdout, shown.stdout


def test_telegram_group_members_share_context_and_authorship_is_stored(stack):
    chat, dana, eli = -4012345001, 381920101, 381920102
    key = session_key(TG, "group", str(chat))
    stack.telegram(TG, chat, dana, "Dana", "my order 222002 never came", chat_type="supergroup", title="Beta")
    stack.wait_replies(TG, chat, 1)
    stack.telegram(TG, chat, eli, "Eli", "where is my order?", chat_type="supergroup", title="Beta")
    replies = stack.wait_replies(TG, chat, 2)
    assert replies[1].startswith("Eli, your order 222002 is on its way"), replies

    found = transcript(stack.database_url, key)
    assert found is not None
    _, lines = found
    said = [(line.sender_name, line.text) for line in lines if line.kind == "user"]
    assert said == [("Dana", "my order 222002 never came"), ("Eli", "where is my order?")]
    assert {m["sender_id"] for m in stack.messages(key) if m["role"] == "user"} == {str(dana), str(eli)}


# --------------------------------------------------------------------------------------------------------------------
# (3) dormancy and resume


def test_idle_session_goes_dormant_and_resumes_with_its_context(stack):
    phone = "5531900000001"
    key = session_key(WA, "dm", phone)
    stack.whatsapp(WA, phone, "Hi, my order 333001 has not arrived")
    stack.wait_replies(WA, phone, 1)
    before = stack.session(key)
    assert before is not None

    # idle_minutes = 0.02 (1.2 s) and the beat sweeps every second.
    stack.wait_until(lambda: (stack.session(key) or {}).get("status") == "dormant", 30, f"{key} to go dormant")

    stack.whatsapp(WA, phone, "where is my order?")
    replies = stack.wait_replies(WA, phone, 2)
    assert "your order 333001 is on its way" in replies[1], replies

    after = stack.session(key)
    assert after["id"] == before["id"] and after["generation"] == 1  # the SAME session, same context
    assert stack.query("SELECT count(*) AS n FROM sessions WHERE key = %s", key)[0]["n"] == 1
    events = stack.events(key)
    assert events[:3] == ["created", "dormant", "resumed"], events

    # The transcript tells the story in order: first turn, dormant, resumed, second turn.
    _, lines = transcript(stack.database_url, key)
    story = [line.text if line.kind == "event" else line.kind for line in lines]
    assert story[:7] == ["created", "user", "assistant", "dormant", "resumed", "user", "assistant"], story


# --------------------------------------------------------------------------------------------------------------------
# (4) /new drops the context; the old generation stays stored


def test_whatsapp_new_command_drops_context_but_keeps_old_messages(stack):
    phone = "5541900000001"
    key = session_key(WA, "dm", phone)
    stack.whatsapp(WA, phone, "Hi, my order 444001 has not arrived")
    stack.whatsapp(WA, phone, "/new")
    stack.whatsapp(WA, phone, "where is my order?")
    replies = stack.wait_replies(WA, phone, 3)
    assert "noted order 444001" in replies[0]
    assert replies[1].startswith(NEW_SESSION_REPLY), replies
    assert "don't have an order number" in replies[2] and "444001" not in replies[2], replies

    rows = stack.wait_settled(key, 3)
    assert stack.session(key)["generation"] == 2
    gen1 = [m["text"] for m in rows if m["generation"] == 1 and m["role"] == "user"]
    gen2 = [m["text"] for m in rows if m["generation"] == 2 and m["role"] == "user"]
    assert gen1 == ["Hi, my order 444001 has not arrived", "/new"]
    assert gen2 == ["where is my order?"]
    assert "new_session" in stack.events(key)


def test_telegram_group_new_addressed_to_our_bot_drops_context(stack):
    chat, fay, gus = -4012345002, 381920201, 381920202
    key = session_key(TG, "group", str(chat))

    def say(user: int, name: str, text: str) -> None:
        stack.telegram(TG, chat, user, name, text, chat_type="group", title="Support")

    say(fay, "Fay", "my order 444002 is missing")
    say(gus, "Gus", "/new@SomeOtherBot")  # addressed to another bot: an ordinary message for us
    say(fay, "Fay", "where is my order?")
    say(gus, "Gus", f"/new@{stack.telegram_bot}")
    say(fay, "Fay", "where is my order?")
    replies = stack.wait_replies(TG, chat, 5)
    assert "Fay, your order 444002 is on its way" in replies[2], replies
    assert replies[3].startswith(NEW_SESSION_REPLY), replies
    assert "Fay, I don't have an order number" in replies[4] and "444002" not in replies[4], replies

    rows = stack.wait_settled(key, 5)
    assert stack.session(key)["generation"] == 2
    assert [m["text"] for m in rows if m["generation"] == 1 and m["role"] == "user"] == [
        "my order 444002 is missing", "/new@SomeOtherBot", "where is my order?", f"/new@{stack.telegram_bot}"]


def test_discord_new_slash_command_drops_context(stack):
    channel, user = "1293000000000000001", "405000000000000001"
    key = session_key(DC, "group", channel)
    stack.discord_ask(channel, user, "Kim", "my order 444003 is late", guild_id=GUILD)
    ack = stack.discord_ask(channel, user, "Kim", "", guild_id=GUILD, command="new")
    assert ack.json()["type"] == 4
    stack.discord_ask(channel, user, "Kim", "where is my order?", guild_id=GUILD)
    replies = stack.wait_replies(DC, channel, 3)
    assert "noted order 444003" in replies[0]
    assert replies[1].startswith(NEW_SESSION_REPLY), replies
    assert "Kim, I don't have an order number" in replies[2] and "444003" not in replies[2], replies
    stack.wait_settled(key, 3)
    assert stack.session(key)["generation"] == 2
    # Every reply went out with its own enforced nonce (a resend by another holder would post nothing new).
    bodies = [s.body for s in stack.standin.sent if s.prefix == DC and s.chat_id == channel]
    assert all(b["enforce_nonce"] is True and b["nonce"].endswith(".0") for b in bodies), bodies
    assert len({b["nonce"] for b in bodies}) == 3


# --------------------------------------------------------------------------------------------------------------------
# (5) duplicated webhooks


def test_duplicate_webhook_gets_one_reply_and_one_stored_message(stack):
    phone = "5551900000001"
    key = session_key(WA_ECHO, "dm", phone)

    # The same body twice, one after the other (Meta's retry after a lost 200).
    body, headers, first_id = stack.whatsapp_body(WA_ECHO, phone, "dup sequential")
    assert stack.post(f"/webhooks/{WA_ECHO}", body, headers).status_code == 200
    assert stack.post(f"/webhooks/{WA_ECHO}", body, headers).status_code == 200

    # The same body twice at the same moment (two ingress workers racing).
    body, headers, second_id = stack.whatsapp_body(WA_ECHO, phone, "dup concurrent")
    barrier = threading.Barrier(4)

    def post() -> int:
        barrier.wait()
        return stack.post(f"/webhooks/{WA_ECHO}", body, headers).status_code

    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = [f.result() for f in [pool.submit(post) for _ in range(4)]]
    # A copy that arrives while another is being enqueued gets 503 (the platform retries), never a 200 for
    # a message that might not be enqueued; once the first copy is in the broker, copies get 200.
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    assert stack.post(f"/webhooks/{WA_ECHO}", body, headers).status_code == 200  # the platform's retry

    # A later message of the same session is the barrier: turns run in order, so once its reply is out,
    # any duplicate turn would already have replied.
    stack.whatsapp(WA_ECHO, phone, "after the duplicates")
    replies = stack.wait_replies(WA_ECHO, phone, 3)
    assert replies == ["echo: dup sequential", "echo: dup concurrent", "echo: after the duplicates"]

    rows = stack.wait_settled(key, 3)
    for msg_id in (first_id, second_id):
        assert sum(1 for m in rows if m["platform_message_id"] == msg_id) == 1


def test_redelivery_past_the_ingress_ledger_is_stopped_by_the_store(stack):
    """If the ledger forgot a message (Redis key expired or lost), the duplicate reaches a worker: the unique
    platform message id in PostgreSQL must still prevent a second turn and a second reply."""
    phone = "5551900000002"
    key = session_key(WA_ECHO, "dm", phone)
    body, headers, msg_id = stack.whatsapp_body(WA_ECHO, phone, "only once please")
    assert stack.post(f"/webhooks/{WA_ECHO}", body, headers).status_code == 200
    stack.wait_replies(WA_ECHO, phone, 1)
    assert stack.redis.delete(f"seen:{WA_ECHO}:{msg_id}") == 1
    assert stack.post(f"/webhooks/{WA_ECHO}", body, headers).status_code == 200  # enqueued again, as seq 2
    started = time.monotonic()
    stack.whatsapp(WA_ECHO, phone, "next")  # seq 3
    replies = stack.wait_replies(WA_ECHO, phone, 2)
    waited = time.monotonic() - started
    assert replies == ["echo: only once please", "echo: next"]
    rows = stack.wait_settled(key, 2)
    assert [m["text"] for m in rows if m["role"] == "user"] == ["only once please", "next"]
    # The duplicate's turn is done (nothing to do), so the next message must not wait for it as for a
    # missing predecessor (workers.app.ORDER_WAIT_S = 30 s, then a false "turn.gap").
    assert waited < 10, f"the message after a duplicate waited {waited:.1f}s for its turn (seq gap after duplicate)"


def test_a_message_the_store_cannot_take_is_dead_lettered_and_the_session_goes_on(stack):
    """Whatever slips past the parsers and cannot be stored (here a send time of infinity, which no datetime holds)
    must not hold its session for ever: the real workers set it aside as a dead letter and answer the next one."""
    phone = "5551900000003"
    key = session_key(WA_ECHO, "dm", phone)
    publisher = Publisher(load_settings(stack.env))
    bad = InboundMessage(channel_id=WA_ECHO, platform="whatsapp", session_key=key, chat_id=phone, chat_kind="dm",
                         sender_id=phone, sender_name="Ines", text="sent at the end of time",
                         platform_message_id=f"wamid.inf{stack.next_id()}", sent_at=float("inf"))
    assert publisher.publish([bad]) == 1  # seq 1
    stack.whatsapp(WA_ECHO, phone, "and now?")  # seq 2, through the real ingress
    assert stack.wait_replies(WA_ECHO, phone, 1) == ["echo: and now?"]
    letters = stack.wait_until(lambda: stack.query(
        "SELECT platform_message_id, error FROM dead_letters WHERE session_key = %s", key), 30, "the dead letter")
    assert [row["platform_message_id"] for row in letters] == [bad.platform_message_id]
    assert letters[0]["error"].startswith("not retryable: ")
    assert stack.query("SELECT count(*) AS n FROM inbox i JOIN sessions s ON s.id = i.session_id WHERE s.key = %s",
                       key) == [{"n": 0}]


# --------------------------------------------------------------------------------------------------------------------
# (6) the same phone number on two WhatsApp channels


def test_same_phone_on_two_whatsapp_channels_is_two_sessions(stack):
    phone = "5561900000001"
    stack.whatsapp(WA, phone, "Hi, my order 666001 has not arrived")
    stack.wait_replies(WA, phone, 1)
    stack.whatsapp(WA2, phone, "where is my order?")
    on_second = stack.wait_replies(WA2, phone, 1)
    assert "don't have an order number" in on_second[0] and "666001" not in on_second[0], on_second

    stack.whatsapp(WA2, phone, "my order 666002 is wrong")
    stack.wait_replies(WA2, phone, 2)
    stack.whatsapp(WA, phone, "where is my order?")
    on_first = stack.wait_replies(WA, phone, 2)
    assert "666001" in on_first[1] and "666002" not in on_first[1], on_first

    one, two = stack.session(session_key(WA, "dm", phone)), stack.session(session_key(WA2, "dm", phone))
    assert one and two and one["id"] != two["id"]
    assert (one["channel_id"], two["channel_id"]) == (WA, WA2)
    # Each channel replied with its own credentials, to its own phone number id.
    for channel in (WA, WA2):
        sent = [s for s in stack.standin.sent if s.prefix == channel and s.chat_id == phone]
        env_prefix = stack.whatsapp_channels[channel][2]
        assert {s.headers["authorization"] for s in sent} == {f"Bearer {stack.secrets[f'{env_prefix}_ACCESS_TOKEN']}"}


# --------------------------------------------------------------------------------------------------------------------
# (7) bad input at the ingress


def test_ingress_rejects_bad_input(stack):
    # Forged or missing signatures.
    body, _, forged_id = stack.whatsapp_body(WA, "5571900000001", "forged")
    assert stack.post(f"/webhooks/{WA}", body, sign_whatsapp(body, "not-the-app-secret")).status_code == 401
    assert stack.post(f"/webhooks/{WA}", body, {"Content-Type": "application/json"}).status_code == 401
    # Signed with another channel's secret.
    wa_secret = stack.secrets["IT_WA_APP_SECRET"]
    assert stack.post(f"/webhooks/{WA2}", body, sign_whatsapp(body, wa_secret)).status_code == 401
    tg_body = encode(telegram_text(381920301, "private", 381920301, "Mal", "forged", stack.next_id(), stack.next_id()))
    assert stack.post(f"/webhooks/{TG}", tg_body, telegram_headers("wrong-secret")).status_code == 401
    dc_body = encode({"type": 1, "id": "1311000000000000001"})
    assert stack.post(f"/webhooks/{DC}/interactions", dc_body,
                      sign_discord(dc_body, Ed25519PrivateKey.generate())).status_code == 401

    # Unknown channel; Discord has no plain webhook route.
    assert stack.post("/webhooks/nope", body, sign_whatsapp(body, wa_secret)).status_code == 404
    assert stack.get("/webhooks/nope", **{"hub.mode": "subscribe"}).status_code == 404
    assert stack.post(f"/webhooks/{DC}", dc_body, sign_discord(dc_body, stack.discord_key)).status_code == 404

    # Not JSON, correctly signed.
    junk = b"this is not json"
    assert stack.post(f"/webhooks/{WA}", junk, sign_whatsapp(junk, wa_secret)).status_code == 400
    assert stack.post(f"/webhooks/{DC}/interactions", junk, sign_discord(junk, stack.discord_key)).status_code == 400
    # ... except Telegram, which would hold back the chat's later updates behind a refused one: dropped with a 200.
    dropped = stack.post(f"/webhooks/{TG}", junk, telegram_headers(stack.secrets["IT_TG_SECRET"]))
    assert dropped.status_code == 200

    # Discord's PING is answered with a PONG (signed by our generated key).
    pong = stack.post(f"/webhooks/{DC}/interactions", dc_body, sign_discord(dc_body, stack.discord_key))
    assert pong.status_code == 200 and pong.json() == {"type": 1}

    # WhatsApp subscription handshake.
    verify_token = stack.secrets["IT_WA_VERIFY_TOKEN"]
    ok = stack.get(f"/webhooks/{WA}", **{"hub.mode": "subscribe", "hub.verify_token": verify_token,
                                        "hub.challenge": "1158201444"})
    assert ok.status_code == 200 and ok.text == "1158201444"
    bad = stack.get(f"/webhooks/{WA}", **{"hub.mode": "subscribe", "hub.verify_token": "guess",
                                         "hub.challenge": "1158201444"})
    assert bad.status_code == 403 and "1158201444" not in bad.text

    # Liveness/readiness.
    assert requests.get(stack.url + "/healthz", timeout=10).status_code == 200
    assert requests.get(stack.url + "/readyz", timeout=10).status_code == 200

    # None of this was enqueued (the ingress ledger never saw it) or created a session.
    assert not stack.redis.exists(f"seen:{WA}:{forged_id}") and not stack.redis.exists(f"seen:{WA2}:{forged_id}")
    assert stack.session(session_key(WA, "dm", "5571900000001")) is None
    assert stack.session(session_key(TG, "dm", "381920301")) is None


def test_whatsapp_status_callback_is_accepted_without_a_turn(stack):
    recipient = "5572900000001"
    status = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": stack.whatsapp_channels[WA_ECHO][0]},
            "statuses": [{"id": "wamid.status-it-1", "status": "delivered", "timestamp": "1764032410",
                          "recipient_id": recipient}],
        }}]}],
    }
    body = encode(status)
    r = stack.post(f"/webhooks/{WA_ECHO}", body, sign_whatsapp(body, stack.secrets["IT_WAE_APP_SECRET"]))
    assert r.status_code == 200
    # Barrier: a real message from the same person; its session must hold exactly that one turn.
    stack.whatsapp(WA_ECHO, recipient, "a real message")
    assert stack.wait_replies(WA_ECHO, recipient, 1) == ["echo: a real message"]
    rows = stack.wait_settled(session_key(WA_ECHO, "dm", recipient), 1)
    assert [m["text"] for m in rows] == ["a real message", "echo: a real message"]
    assert not stack.query("SELECT id FROM messages WHERE platform_message_id = 'wamid.status-it-1'")


# --------------------------------------------------------------------------------------------------------------------
# (8) rate limits from the platform are retried; the reply arrives and is stored as sent


def _delivery(stack, key: str, text: str) -> dict:
    rows = [m for m in stack.wait_settled(key, 1) if m["role"] == "assistant" and m["text"] == text]
    assert len(rows) == 1, rows
    return rows[0]


def test_telegram_429_with_retry_after_is_retried(stack):
    chat = 381920401
    key = session_key(TG_ECHO, "dm", str(chat))
    stack.standin.fail_next(429, {"ok": False, "error_code": 429, "description": "Too Many Requests: retry after 1",
                                  "parameters": {"retry_after": 1}})
    stack.telegram(TG_ECHO, chat, chat, "Rae", "first")
    stack.telegram(TG_ECHO, chat, chat, "Rae", "second")
    assert stack.wait_replies(TG_ECHO, chat, 2) == ["echo: first", "echo: second"]  # order survives the retry
    first = _delivery(stack, key, "echo: first")
    assert first["delivery_status"] == "sent" and first["delivery_attempts"] == 2 and first["delivery_error"] is None
    assert _delivery(stack, key, "echo: second")["delivery_attempts"] == 1


def test_discord_429_with_retry_after_header_is_retried(stack):
    channel = "1292000000000000001"
    key = session_key(DC, "group", channel)
    stack.standin.fail_next(429, {"message": "You are being rate limited.", "retry_after": 0.5, "global": False},
                            {"Retry-After": "0.5"})
    ack = stack.discord_ask(channel, "404000000000000001", "Ivy", "my order 888001 is late", guild_id=GUILD)
    assert ack.json()["type"] == 4  # the interaction is answered at once; the Agent's reply follows
    replies = stack.wait_replies(DC, channel, 1)
    assert "noted order 888001" in replies[0]
    row = _delivery(stack, key, replies[0])
    assert row["delivery_status"] == "sent" and row["delivery_attempts"] == 2


def test_whatsapp_rate_limit_reported_as_400_is_retried(stack):
    phone = "5581900000001"
    key = session_key(WA_ECHO, "dm", phone)
    stack.standin.fail_next(400, {"error": {"message": "(#130429) Rate limit hit", "type": "OAuthException",
                                            "code": 130429, "fbtrace_id": "AbCdEf"}})
    stack.whatsapp(WA_ECHO, phone, "slow down")
    assert stack.wait_replies(WA_ECHO, phone, 1) == ["echo: slow down"]
    row = _delivery(stack, key, "echo: slow down")
    assert row["delivery_status"] == "sent" and row["delivery_attempts"] == 2


# --------------------------------------------------------------------------------------------------------------------
# Personal data in the logs


def test_no_phone_number_or_message_text_in_any_process_log(stack):
    """At INFO every process logs a session by its pseudonym: the turn's line (the ingress logs an accepted webhook
    only at DEBUG, Celery's per-task lines are off unless LOG_TASK_LINES; tests/test_redis_enqueue.py checks the
    task's name), and a platform's refusal that echoes the phone number is logged as status and code."""
    import json

    from integration.conftest import SECRETS
    from shared.logs import pseudonym

    phone = "5591900000001"
    key = session_key(WA_ECHO, "dm", phone)
    stack.standin.fail_next(400, {"error": {"message": f"(#130429) Rate limit hit sending to {phone}",
                                            "type": "OAuthException", "code": 130429, "fbtrace_id": "AbCdEf"}})
    stack.whatsapp(WA_ECHO, phone, "private words 9931")
    assert stack.wait_replies(WA_ECHO, phone, 1) == ["echo: private words 9931"]
    session = pseudonym(SECRETS["SECRET_KEY"], key)

    def lines() -> list[dict]:
        return [json.loads(line) for p in stack.procs for line in p.log().splitlines() if line.startswith("{")]

    stack.wait_until(lambda: any(e["event"] == "turn.reply_sent" and e.get("session_key") == session
                                 for e in lines()), 15, "the turn's line")
    assert [p.name for p in stack.procs if phone in p.log() or "private words 9931" in p.log()] == []
    events = lines()
    assert not any(e["event"] == "ingress.enqueued" or e["event"].startswith("Task chat.") for e in events)
    [retry] = [e for e in events if e["event"] == "outbound.retry" and e.get("session_key") == session]
    assert retry["error"].startswith("http 400: [body redacted, ") and retry["error"].endswith("; code=130429]")
