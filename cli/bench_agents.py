"""Agents for `chatsessions bench` and `chatsessions loadgen` runs (bind them with agent = "cli.bench_agents:Name").

Every reply contains the message text, so the load generator can tell which message a reply answers.
"""

from __future__ import annotations

import os
import time

from workers.agents import Conversation, DemoAgent

SLOW_S = float(os.environ.get("BENCH_AGENT_DELAY_S", "0.2"))


class DemoEcho:
    """The demo Agent's work (it reads the whole history), with the message echoed so the reply identifies it."""

    def __init__(self) -> None:
        self.demo = DemoAgent()

    def reply(self, conversation: Conversation) -> str:
        return f"{self.demo.reply(conversation)} | echo: {conversation.message.text}"


class SlowEcho:
    """An Agent that takes BENCH_AGENT_DELAY_S (default 200 ms) per turn, like a call to an LLM API, then echoes."""

    def reply(self, conversation: Conversation) -> str:
        time.sleep(SLOW_S)
        return f"echo: {conversation.message.text}"
