import socket

import pytest
import requests
from channel_helpers import Reply, StandIn, no_sleep

from shared.messages import Delivery
from shared.outbound import MAX_ATTEMPTS, MAX_WAIT, HttpSender, combine, retry_after, split_text


def id_of(body):
    return body.get("id") if isinstance(body, dict) else None


@pytest.mark.parametrize(
    "text, limit, chunks",
    [
        ("short", 10, ["short"]),
        ("", 10, [""]),
        ("a" * 10, 10, ["a" * 10]),
        ("a" * 25, 10, ["a" * 10, "a" * 10, "a" * 5]),
        ("hello world again", 11, ["hello world", "again"]),
        ("line one\nline two", 12, ["line one", "line two"]),
        ("aaa bbb\nccc ddd eee", 12, ["aaa bbb", "ccc ddd eee"]),
    ],
)
def test_split_text(text, limit, chunks):
    assert split_text(text, limit) == chunks


def test_split_text_respects_limit_and_keeps_words():
    text = " ".join(f"word{i}" for i in range(2000))
    chunks = split_text(text, 4096)
    assert all(len(c) <= 4096 for c in chunks) and len(chunks) > 1
    assert " ".join(chunks).split() == text.split()


def response_from(reply: Reply) -> requests.Response:
    with StandIn(reply) as server:
        return requests.post(server.base + "/x", json={}, timeout=5)


@pytest.mark.parametrize(
    "reply, wait",
    [
        (Reply(429, {}, {"Retry-After": "3"}), 3.0),
        (Reply(429, {"message": "slow", "retry_after": 0.532, "global": False}), 0.532),
        (Reply(429, {"ok": False, "error_code": 429, "parameters": {"retry_after": 7}}), 7.0),
        (Reply(503, b"busy"), None),
        (Reply(429, {}, {"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}), None),
        (Reply(429, [1, 2]), None),
    ],
    ids=["header", "discord", "telegram", "not-json", "http-date", "json-list"],
)
def test_retry_after(reply, wait):
    assert retry_after(response_from(reply)) == wait


def test_success_returns_id():
    with StandIn(default=Reply(body={"id": "m1"})) as server:
        delivery = HttpSender({"X-Test": "1"}).post(server.base + "/send", {"a": 1}, id_of)
    assert delivery == Delivery(ok=True, platform_message_ids=("m1",), attempts=1)
    assert server.requests[0].body == {"a": 1} and server.requests[0].headers["x-test"] == "1"


def test_a_request_goes_out_as_json_with_the_senders_headers_through_the_configured_proxy(monkeypatch):
    """The send skips requests' Session.request, so what it did for us is checked here: the JSON body with its
    type and length, the sender's headers beside requests' own, the path quoted, and HTTP_PROXY honoured (the
    stand-in plays the proxy: it is sent the absolute URL)."""
    with StandIn(default=Reply(body={"id": "m1"})) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.base)
        sender = HttpSender({"Authorization": "Bot t0ken"})
        delivery = sender.post("http://platform.invalid/bot1:AB/send message", {"text": "olá"}, id_of)
    assert delivery.ok and delivery.platform_message_ids == ("m1",)
    [sent] = proxy.requests
    assert sent.path == "http://platform.invalid/bot1:AB/send%20message"
    assert sent.body == {"text": "olá"}
    assert sent.headers["content-type"] == "application/json" and int(sent.headers["content-length"]) > 0
    assert sent.headers["authorization"] == "Bot t0ken" and sent.headers["user-agent"].startswith("python-requests")


def test_success_without_json_body_has_no_id():
    with StandIn(default=Reply(body=b"ok")) as server:
        assert HttpSender({}).post(server.base, {}, id_of) == Delivery(ok=True, attempts=1)


def test_retries_5xx_then_succeeds():
    with StandIn(Reply(500, b"oops"), Reply(502, b"bad gateway"), default=Reply(body={"id": "m2"})) as server:
        sender = HttpSender({})
        waits = no_sleep(sender)
        delivery = sender.post(server.base, {}, id_of)
    assert delivery.ok and delivery.attempts == 3 and delivery.platform_message_ids == ("m2",)
    assert len(waits) == 2 and 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0
    assert len(server.requests) == 3


def test_429_honours_retry_after_capped():
    script = Reply(429, {}, {"Retry-After": "2.5"}), Reply(429, {}, {"Retry-After": "3600"})
    with StandIn(*script, default=Reply(body={"id": "m"})) as server:
        sender = HttpSender({})
        waits = no_sleep(sender)
        assert sender.post(server.base, {}, id_of).ok
    assert waits == [2.5, MAX_WAIT]


def test_final_4xx_is_not_retried():
    with StandIn(Reply(403, {"description": "Forbidden: bot was blocked by the user"})) as server:
        sender = HttpSender({})
        waits = no_sleep(sender)
        delivery = sender.post(server.base, {}, id_of)
    assert not delivery.ok and delivery.attempts == 1 and waits == []
    assert delivery.error.startswith("http 403") and "blocked" in delivery.error
    assert len(server.requests) == 1


def test_gives_up_after_max_attempts():
    with StandIn(default=Reply(503, b"down")) as server:
        sender = HttpSender({})
        waits = no_sleep(sender)
        delivery = sender.post(server.base, {}, id_of)
    assert not delivery.ok and delivery.attempts == MAX_ATTEMPTS and delivery.error.startswith("http 503")
    assert len(server.requests) == MAX_ATTEMPTS and len(waits) == MAX_ATTEMPTS - 1


def test_network_errors_are_retried():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sender = HttpSender({})
    waits = no_sleep(sender)
    delivery = sender.post(f"http://127.0.0.1:{port}/", {}, id_of)
    assert not delivery.ok and delivery.error == "network: ConnectionError" and len(waits) == MAX_ATTEMPTS - 1


def test_retryable_callback_turns_a_4xx_into_a_retry():
    rate_limited = Reply(400, {"error": {"code": 130429}})
    with StandIn(rate_limited, Reply(400, {"error": {"code": 131047}})) as server:
        sender = HttpSender({}, retryable=lambda r: r.json()["error"]["code"] == 130429)
        waits = no_sleep(sender)
        delivery = sender.post(server.base, {}, id_of)
    assert not delivery.ok and delivery.attempts == 2 and len(waits) == 1 and "131047" in delivery.error


def test_combine():
    ok1 = Delivery(ok=True, platform_message_ids=("a",), attempts=1)
    ok2 = Delivery(ok=True, platform_message_ids=("b",), attempts=2)
    failed = Delivery(ok=False, error="http 400: no", attempts=1)
    assert combine([ok1, ok2]) == Delivery(ok=True, platform_message_ids=("a", "b"), attempts=3)
    assert combine([ok1, failed]) == Delivery(ok=False, platform_message_ids=("a",), error="http 400: no", attempts=2)


def test_a_sender_paused_after_its_fencing_check_sends_nothing():
    import time

    from shared.errors import LeaseLost

    with StandIn(default=Reply(body={"id": "m1"})) as server:
        sender = HttpSender({})
        # The check passed and counts until a moment ago: the sender was stopped before the request left.
        with pytest.raises(LeaseLost):
            sender.post(server.base + "/send", {"a": 1}, id_of, before_attempt=lambda: time.monotonic() - 0.001)
        assert server.requests == []
        fresh = sender.post(server.base + "/send", {"a": 2}, id_of, before_attempt=lambda: time.monotonic() + 30)
        assert fresh.ok and [r.body for r in server.requests] == [{"a": 2}]


def test_a_sender_paused_between_its_last_check_and_the_socket_sends_nothing(monkeypatch):
    """The pause falls after the adapter's check, while the connection is made: the check before each socket write
    still stops the request, so nothing reaches the platform (fault b once caught a reply written 60 ms after the
    holder resumed from a pause there)."""
    import time

    import urllib3

    from shared.errors import LeaseLost

    connect = urllib3.connection.HTTPConnection.connect

    def paused_connect(self):  # the process is stopped right here, for longer than its check counts
        connect(self)
        time.sleep(0.2)

    monkeypatch.setattr(urllib3.connection.HTTPConnection, "connect", paused_connect)
    with StandIn(default=Reply(body={"id": "m1"})) as server:
        sender = HttpSender({})
        with pytest.raises(LeaseLost):
            sender.post(server.base + "/send", {"a": 1}, id_of, before_attempt=lambda: time.monotonic() + 0.1)
        time.sleep(0.1)
        assert server.requests == []


def test_a_retry_is_logged_with_the_host_only():
    """The path of a send URL may hold a bot token (Telegram) or a chat id (Discord DMs): never logged."""
    from structlog.testing import capture_logs

    with StandIn(Reply(500, b"oops"), default=Reply(body={"id": "m"})) as server:
        sender = HttpSender({})
        no_sleep(sender)
        with capture_logs() as logs:
            assert sender.post(server.base + "/api/v10/channels/1290000000000000001/messages?wait=true", {}, id_of).ok
    [retry] = [e for e in logs if e["event"] == "outbound.retry"]
    assert retry["url"] == server.base and retry["error"] == "http 500: oops"


def test_proxies_and_the_ca_bundle_come_from_the_environment_read_once(monkeypatch):
    """requests would read the environment on every request; the sender reads it once per host, and still honours
    HTTPS_PROXY / NO_PROXY and REQUESTS_CA_BUNDLE."""
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/our-bundle.pem")
    sender = HttpSender({})
    assert sender.session.trust_env is False and sender.session.verify == "/etc/ssl/certs/our-bundle.pem"
    assert sender._proxies_for("https://graph.facebook.com/v21.0/1/messages")["https"] == "http://proxy.example:3128"
    assert "https" not in sender._proxies_for("https://internal.example/send")
    monkeypatch.setenv("HTTPS_PROXY", "http://other.example:3128")  # read once: a running worker keeps its view
    assert sender._proxies_for("https://graph.facebook.com/x")["https"] == "http://proxy.example:3128"


def test_many_concurrent_sends_to_one_host_keep_their_connections(caplog):
    """A gevent pool sends many replies at once to one host: every connection goes back to the pool for the next
    send, none is thrown away (urllib3 warns "Connection pool is full, discarding connection") to be set up again."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    concurrent = 150  # more than the 64 a default-sized pool keeps
    everyone_in = threading.Barrier(concurrent, timeout=30)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the connection is returned to the client's pool

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            everyone_in.wait()  # hold every answer until all the requests are open at once
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args) -> None:
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 512
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    sender, results = HttpSender({}, sleep=no_sleep), []
    try:
        with caplog.at_level("WARNING", logger="urllib3.connectionpool"):
            threads = [threading.Thread(target=lambda: results.append(
                sender.post(f"http://127.0.0.1:{server.server_address[1]}/send", {}, id_of))) for _ in range(concurrent)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
    finally:
        sender.session.close()
        server.shutdown()
        server.server_close()
    assert len(results) == concurrent and all(r.ok and r.attempts == 1 for r in results)
    assert [r.getMessage() for r in caplog.records if "pool is full" in r.getMessage()] == []
