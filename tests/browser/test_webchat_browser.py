"""The web chat page and the session browser in real headless Chromium, against the real stack (conftest.py):
page -> gunicorn ingress -> Redis partition queues -> worker pools -> PostgreSQL -> reply box -> page.

Screenshots of both pages are written to a temporary directory, or to CHATSESSIONS_SCREENSHOTS (e.g. docs/img,
for docs/webchat.md) when that is set.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from ingress.webchat import cookie_name
from integration.conftest import SECRETS
from shared.channels.webchat import visitor_pseudonym

from .conftest import ADMIN_TOKEN, EMBED, WEB, WEB_TITLE

pytestmark = pytest.mark.integration

COOKIE = cookie_name(secure=True)  # the stack runs with the production default, SECURE_COOKIES on
REPLY_TIMEOUT = 60
NEW_SESSION_REPLY = "Started a new conversation."  # workers.turn.NEW_SESSION_REPLY starts with this

# Two visitors, each with facts of their own: a leak between the sessions would show in the demo Agent's replies.
SCRIPTS = {
    "alice": [("Hi, my order 41001 has not arrived", "thanks, I noted order 41001"),
              ("my name is Alice", "Nice to meet you, Alice!"),
              ("what is my name?", "Your name is Alice."),
              ("where is my order?", "Alice, your order 41001 is on its way")],
    "bob": [("Hi, my order 52002 has not arrived", "thanks, I noted order 52002"),
            ("my name is Bob", "Nice to meet you, Bob!"),
            ("what is my name?", "Your name is Bob."),
            ("where is my order?", "Bob, your order 52002 is on its way")],
}
FACTS = {"alice": {"Alice", "41001"}, "bob": {"Bob", "52002"}}


def session_key(visitor: str) -> str:
    """The documented key format (shared.channels.base.session_key), spelled out."""
    return f"{WEB}:dm:{visitor}"


# -- the page, as a visitor uses it ----------------------------------------------------------------------------------

class ChatPage:
    def __init__(self, driver: Any, url: str):
        self.driver = driver
        self.url = f"{url}/chat/{WEB}"

    def open(self) -> ChatPage:
        self.driver.get(self.url)
        self.wait(lambda d: d.find_element(By.ID, "text").is_displayed(), "the message box")
        return self

    def wait(self, predicate: Any, what: str, timeout: float = REPLY_TIMEOUT) -> Any:
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(predicate)
        except TimeoutException:
            pytest.fail(f"timed out after {timeout}s waiting for {what}; the page shows: {self.log()}", pytrace=False)

    def send(self, text: str) -> None:
        box = self.driver.find_element(By.ID, "text")
        box.send_keys(text)
        self.driver.find_element(By.ID, "send").click()

    def new_conversation(self) -> None:
        self.driver.find_element(By.ID, "new").click()

    def lines(self, kind: str) -> list[str]:
        return [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, f"#log .msg.{kind}")]

    def log(self) -> list[tuple[str, str]]:
        return [(e.get_attribute("class"), e.text) for e in self.driver.find_elements(By.CSS_SELECTOR, "#log li")]

    def wait_replies(self, count: int) -> list[str]:
        self.wait(lambda _d: len(self.lines("agent")) >= count, f"{count} replies")
        return self.lines("agent")

    def visitor(self) -> str:
        """The visitor's pseudonym (what the stack stores and shows), from the cookie the server signed."""
        cookie = self.driver.get_cookie(COOKIE)
        assert cookie is not None and cookie["httpOnly"] and cookie["secure"], cookie
        assert cookie["path"] == "/" and cookie["sameSite"] == "Lax" and not cookie["domain"].startswith("."), cookie
        pseudonym = visitor_pseudonym(SECRETS["SECRET_KEY"], cookie["value"])
        assert pseudonym is not None and pseudonym not in cookie["value"], cookie
        return pseudonym


@pytest.fixture(scope="module")
def pages(stack, chromium) -> dict[str, ChatPage]:
    """Two browsers (two profiles: two visitors) on the chat page, kept for the module."""
    return {name: ChatPage(chromium(), stack.url).open() for name in SCRIPTS}


def screenshot(driver: Any, name: str, tmp_path: Path) -> Path:
    target = Path(os.environ.get("CHATSESSIONS_SCREENSHOTS") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    path = target / name
    assert driver.save_screenshot(str(path)), path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 500, (width, height)
    return path


def test_two_browsers_chat_at_once_and_each_sees_only_its_own_conversation(stack, pages, tmp_path):
    errors: list[BaseException] = []

    def play(name: str) -> None:
        page = pages[name]
        try:
            for n, (text, _) in enumerate(SCRIPTS[name], 1):
                page.send(text)
                page.wait_replies(n)  # a visitor waits for the answer before asking the next thing
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=play, args=(name,)) for name in SCRIPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=4 * REPLY_TIMEOUT)
    if errors:
        raise errors[0]

    for name, page in pages.items():
        other = next(n for n in SCRIPTS if n != name)
        assert page.lines("user") == [text for text, _ in SCRIPTS[name]], page.log()
        replies = page.lines("agent")
        assert len(replies) == len(SCRIPTS[name]), page.log()
        for reply, (_, expected) in zip(replies, SCRIPTS[name]):
            assert expected in reply, (name, reply, expected)
        leaked = {fact for fact in FACTS[other] if any(fact in line for _, line in page.log())}
        assert not leaked, f"{name}'s page shows {other}'s {leaked}: {page.log()}"

    # Each browser is its own session, stored in order, every reply sent.
    visitors = {name: page.visitor() for name, page in pages.items()}
    assert len(set(visitors.values())) == 2
    for name, visitor in visitors.items():
        rows = stack.wait_settled(session_key(visitor), len(SCRIPTS[name]))
        users = [m for m in rows if m["role"] == "user"]
        assert [m["text"] for m in users] == [text for text, _ in SCRIPTS[name]]
        assert [m["ingress_seq"] for m in users] == [1, 2, 3, 4]
        assert {m["sender_id"] for m in users} == {visitor}
        assert all(m["delivery_status"] == "sent" for m in rows if m["role"] == "assistant")
    screenshot(pages["alice"].driver, "webchat.png", tmp_path)


def test_a_reload_shows_the_conversation_and_keeps_the_session(stack, pages):
    page = pages["bob"]
    visitor = page.visitor()
    page.open()
    page.wait(lambda _d: len(page.lines("agent")) >= 1, "the conversation to come back after a reload")
    assert page.visitor() == visitor
    page.wait(lambda _d: len(page.lines("agent")) == len(SCRIPTS["bob"]), "every earlier reply")
    assert page.lines("user") == [text for text, _ in SCRIPTS["bob"]]
    page.send("what is my name?")  # the same session, with its context
    assert page.wait_replies(len(SCRIPTS["bob"]) + 1)[-1] == "Your name is Bob."
    assert stack.session(session_key(visitor))["generation"] == 1


def test_new_conversation_starts_a_new_session_without_the_old_context(stack, chromium):
    page = ChatPage(chromium(), stack.url).open()
    visitor = page.visitor()
    page.send("my name is Carol")
    assert page.wait_replies(1) == ["Nice to meet you, Carol! How can I help?"]
    page.new_conversation()
    page.wait(lambda _d: any(NEW_SESSION_REPLY in r for r in page.lines("agent")), "the new conversation's reply")
    assert page.lines("user") == [] and "Carol" not in str(page.log())  # the page starts over
    assert page.driver.find_elements(By.CSS_SELECTOR, "#log .divider")
    page.send("what is my name?")
    page.wait(lambda _d: len(page.lines("agent")) >= 2, "the answer after the new conversation")
    assert page.lines("agent")[-1] == "You haven't told me your name yet."

    key = session_key(visitor)
    stack.wait_settled(key, 3)
    assert stack.session(key)["generation"] == 2
    assert stack.events(key) == ["created", "new_session"]
    # A reload shows the current conversation only.
    page.open()
    page.wait(lambda _d: len(page.lines("agent")) >= 2, "the current conversation after a reload")
    assert page.lines("user") == ["what is my name?"]


def test_a_message_is_sent_once_even_if_the_page_retries(stack, chromium):
    """The page keeps a message's id across retries; a POST repeated by the browser is deduplicated."""
    page = ChatPage(chromium(), stack.url).open()
    visitor = page.visitor()
    script = """
        const done = arguments[arguments.length - 1];
        const url = arguments[0];
        const post = () => fetch(url, {method: "POST", credentials: "same-origin",
            headers: {"Content-Type": "application/json"}, body: JSON.stringify({id: "retried-0001", text: "hello"})})
            .then(r => r.json());
        (async () => [await post(), await post(), await post()])().then(done, e => done(String(e)));
    """
    results = page.driver.execute_async_script(script, f"/chat/{WEB}/messages")
    assert [r["duplicate"] for r in results] == [False, True, True], results
    rows = stack.wait_settled(session_key(visitor), 1)
    assert [m["text"] for m in rows if m["role"] == "user"] == ["hello"]
    page.open()
    page.wait(lambda _d: len(page.lines("agent")) >= 1, "the reply")
    assert page.lines("user") == ["hello"] and len(page.lines("agent")) == 1


def test_another_site_can_embed_the_chat_its_channel_allows_and_no_other(stack, chromium):
    """A customer's page on another site (http://localhost:<port>; the stack is http://127.0.0.1) with two iframes:
    the channel whose frame_ancestors lists that site chats inside its frame (its visitor cookie, SameSite=None and
    Partitioned, comes back there); the default channel ('self' only) is refused by the browser."""
    host = ThreadingHTTPServer(("127.0.0.1", 0), _page_handler(
        f'<iframe id="allowed" src="{stack.url}/chat/{EMBED}" width="600" height="500"></iframe>'
        f'<iframe id="refused" src="{stack.url}/chat/{WEB}" width="300" height="200"></iframe>'))
    threading.Thread(target=host.serve_forever, daemon=True).start()
    try:
        driver = chromium()
        driver.get(f"http://localhost:{host.server_address[1]}/")
        page = ChatPage(driver, stack.url)
        driver.switch_to.frame("allowed")
        page.wait(lambda d: d.find_element(By.ID, "text").is_displayed(), "the embedded chat")
        page.send("my name is Dora")
        assert page.wait_replies(1) == ["Nice to meet you, Dora! How can I help?"]
        page.send("what is my name?")  # the same visitor, so the same session: the cookie came back in the frame
        assert page.wait_replies(2)[-1] == "Your name is Dora."
        driver.switch_to.default_content()
        driver.switch_to.frame("refused")
        assert driver.find_elements(By.ID, "text") == []  # blocked by frame-ancestors 'self'
    finally:
        host.shutdown()
        host.server_close()
    [session] = stack.query("SELECT key FROM sessions WHERE channel_id = %s", EMBED)
    rows = stack.wait_settled(session["key"], 2)
    assert [m["text"] for m in rows if m["role"] == "user"] == ["my name is Dora", "what is my name?"]


def _page_handler(body: str) -> type[BaseHTTPRequestHandler]:
    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server interface
            data = f"<!doctype html><title>Acme shop</title><h1>Acme shop</h1>{body}".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_args: Any) -> None:
            pass

    return Page


# -- the session browser ---------------------------------------------------------------------------------------------

def statuses(driver: Any, path: str) -> list[int]:
    """HTTP statuses the browser received for `path` (from the DevTools network log)."""
    found = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.responseReceived":
            response = message["params"]["response"]
            if response["url"].split("?")[0].endswith(path):
                found.append(response["status"])
    return found


def test_session_browser_needs_the_token(stack, pages, chromium):
    for headers in (None, {"Authorization": "Bearer not-the-token"}):
        driver = chromium(headers=headers, network_log=True)
        driver.get(f"{stack.url}/admin/sessions")
        # Chromium holds the 401 for a login prompt: nothing of the page is shown.
        assert statuses(driver, "/admin/sessions") == [401]
        assert "web:dm:" not in driver.page_source and "Sessions" not in driver.page_source


def test_session_browser_lists_both_sessions_and_shows_a_transcript(stack, pages, chromium, tmp_path):
    visitors = {name: page.visitor() for name, page in pages.items()}
    for name, visitor in visitors.items():  # the chats of the first test (or at least one message each)
        if not stack.messages(session_key(visitor)):
            pages[name].send(SCRIPTS[name][0][0])
        stack.wait_settled(session_key(visitor), 1)
    driver = chromium(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    driver.get(f"{stack.url}/admin/")
    assert driver.find_element(By.TAG_NAME, "h1").text == "Channels"
    channels = [row.text for row in driver.find_elements(By.CSS_SELECTOR, "table.channels tbody tr")]
    assert any(row.startswith(f"{WEB} webchat demo") for row in channels), channels

    driver.find_element(By.LINK_TEXT, WEB).click()  # the channel's sessions
    WebDriverWait(driver, 10).until(lambda d: "channel=web" in d.current_url)
    listed = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "table.sessions tbody td:first-child a")]
    for visitor in visitors.values():
        assert session_key(visitor) in listed, listed
    rows = {r.find_element(By.CSS_SELECTOR, "td a").text: r.text
            for r in driver.find_elements(By.CSS_SELECTOR, "table.sessions tbody tr")}
    assert all(" active " in rows[session_key(v)] for v in visitors.values()), rows

    driver.find_element(By.LINK_TEXT, session_key(visitors["alice"])).click()
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "ol.transcript"))
    text = driver.find_element(By.TAG_NAME, "main").text
    assert "Generation 1 (current)" in text and "created" in text
    assert "Hi, my order 41001 has not arrived" in text and "41001" in text and "Bob" not in text

    # The screenshot shows a session with two generations when there is one (the "New conversation" test's).
    renewed = stack.query("SELECT key FROM sessions WHERE channel_id = %s AND generation = 2 ORDER BY id", WEB)
    if renewed:
        driver.get(f"{stack.url}/admin/sessions/{renewed[0]['key']}")
        assert "Generation 2 (current)" in driver.find_element(By.TAG_NAME, "main").text
    driver.set_window_size(1100, 1000)
    screenshot(driver, "session-browser.png", tmp_path)

    # Search by user id: the visitor's pseudonym (shown in the session key) finds the session.
    box = driver.find_element(By.ID, "user")
    box.send_keys(visitors["bob"])
    box.submit()
    WebDriverWait(driver, 10).until(lambda d: "/admin/users" in d.current_url)
    assert session_key(visitors["bob"]) in driver.find_element(By.TAG_NAME, "main").text
    assert ADMIN_TOKEN not in driver.page_source


def test_session_browser_with_basic_auth_in_the_url(stack, chromium):
    driver = chromium()
    host = stack.url.removeprefix("http://")
    driver.get(f"http://lead:{ADMIN_TOKEN}@{host}/admin/sessions?channel={WEB}")
    assert driver.find_element(By.TAG_NAME, "h1").text == f"Sessions of {WEB}"
    assert "web:dm:" in driver.page_source and WEB_TITLE not in driver.page_source
