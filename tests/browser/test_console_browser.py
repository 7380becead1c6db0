"""The operator console in real headless Chromium, against the real stack (conftest.py): a visitor asks the web chat
for a person, two operators race to take the conversation over, the winner sees the visitor's messages arrive
without a reload, replies (the visitor's page shows it), and hands the conversation back to the Agent.

The console's screenshot goes where the others go (CHATSESSIONS_SCREENSHOTS, e.g. docs/img, for the README).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import requests
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from shared.config import DEFAULT_HANDOFF_NOTICE

from .conftest import OPERATORS
from .test_webchat_browser import ChatPage, screenshot, session_key

pytestmark = pytest.mark.integration

TIMEOUT = 60


def login(name: str) -> dict[str, str]:
    """HTTP basic auth as one of conftest's operator accounts (sent on every request the browser makes)."""
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{OPERATORS[name][1]}".encode()).decode()}


class Console:
    def __init__(self, driver: Any, url: str):
        self.driver, self.url = driver, url

    def open(self, path: str) -> Console:
        self.driver.get(f"{self.url}/admin{path}")
        return self

    def main(self) -> str:
        return self.driver.find_element(By.TAG_NAME, "main").text

    def click(self, element_id: str) -> None:
        self.driver.find_element(By.ID, element_id).click()

    def wait(self, predicate: Any, what: str) -> Any:
        try:
            # A page being replaced (a form's answer) or a live part just refreshed: look again at the next poll.
            return WebDriverWait(self.driver, TIMEOUT, poll_frequency=0.2,
                                 ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                                 ).until(lambda _d: predicate())
        except TimeoutException:
            pytest.fail(f"timed out after {TIMEOUT}s waiting for {what}; the page shows: "
                        f"{self.driver.page_source[-3000:]}", pytrace=False)

    def mark(self) -> None:
        """Mark this page load: a reload would lose the mark."""
        self.driver.execute_script("window.samePage = true")

    def same_page(self) -> bool:
        return self.driver.execute_script("return window.samePage === true")


def test_an_operator_takes_a_conversation_over_replies_and_hands_it_back(stack, chromium, tmp_path):
    user = ChatPage(chromium(), stack.url).open()
    user.send("my order 63003 has not arrived")
    assert "63003" in user.wait_replies(1)[0]
    key = session_key(user.visitor())
    maria = Console(chromium(headers=login("maria")), stack.url).open("/console")
    joao = Console(chromium(headers=login("joao")), stack.url)
    assert "maria · operator" in maria.driver.find_element(By.TAG_NAME, "nav").text

    # The visitor asks for a person: one notice, and the waiting queue shows the session without a reload.
    maria.mark()
    user.send("/human")
    assert user.wait_replies(2)[-1] == DEFAULT_HANDOFF_NOTICE
    maria.wait(lambda: key in maria.driver.find_element(By.ID, "live-console").text, "the waiting queue")
    assert maria.same_page() and "Waiting for a person (1)" in maria.main()

    # Both operators open it; Maria takes it over first, João is told who has it.
    joao.open(f"/sessions/{key}")
    maria.wait(lambda: maria.driver.find_element(By.LINK_TEXT, key).click() or True, "the link to the session")
    maria.wait(lambda: maria.driver.find_elements(By.ID, "takeover"), "the session page")
    maria.click("takeover")
    maria.wait(lambda: "You have this conversation" in maria.main(), "the takeover")
    joao.click("takeover")
    joao.wait(lambda: "maria has this conversation" in joao.main(), "João's refusal")
    assert stack.session(key)["operator"] == "maria"

    # While Maria has it the visitor's messages are stored and appear live; the Agent does not answer.
    maria.mark()
    user.send("are you there?")
    maria.wait(lambda: "are you there?" in maria.driver.find_element(By.ID, "live-transcript").text,
               "the visitor's message in the live transcript")
    assert maria.same_page()

    # Maria's reply reaches the visitor's page with her name, and its delivery shows in her console.
    maria.driver.find_element(By.ID, "reply-text").send_keys("Hi, Maria here: order 63003 ships today.")
    maria.click("send-reply")
    assert user.wait_replies(3)[-1] == "maria: Hi, Maria here: order 63003 ships today."
    maria.wait(lambda: any("Hi, Maria here" in li.text and "sent" in li.text for li in
                           maria.driver.find_elements(By.CSS_SELECTOR, "#live-transcript li.assistant")),
               "the reply's delivery")
    assert len(user.lines("agent")) == 3  # no Agent reply to "are you there?"
    maria.driver.set_window_size(1100, 900)
    screenshot(maria.driver, "console.png", tmp_path)

    # A viewer cannot act; a POST without the account's CSRF token is refused (over plain HTTP, as a script would).
    csrf = maria.driver.find_element(By.NAME, "csrf").get_attribute("value")
    for who, form in (("vera", {"key": key, "csrf": csrf, "text": "hi"}), ("maria", {"key": key, "text": "hi"})):
        refused = requests.post(f"{stack.url}/admin/console/reply", data=form, timeout=10,
                                auth=(who, OPERATORS[who][1]), allow_redirects=False)
        assert refused.status_code == 403, (who, refused.status_code, refused.text)

    # Handed back, the Agent answers again and sees the whole generation.
    maria.click("handback")
    maria.wait(lambda: "Handed back" in maria.main(), "the hand-back")
    user.send("where is my order?")
    assert "63003" in user.wait_replies(4)[-1]

    audit = stack.cli("audit", "--session", key, "--json")
    assert audit.returncode == 0, audit.stderr
    assert [(e["actor"], e["action"], e["via"]) for e in json.loads(audit.stdout)["entries"]] == [
        ("maria", "returned", "console"), ("maria", "reply", "console"), ("maria", "taken_over", "console")]
