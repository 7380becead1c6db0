"""Agents for the fault suite; the workers load them as "tests.faults.agents:PoisonEcho" (PYTHONPATH = repo root)."""

from __future__ import annotations

import time

from workers.agents import Conversation

POISON = "poison"
SLOW = "slow"
SLOW_S = 1.0  # a long Agent call: how long the Agent thinks about a text containing "slow"


class PoisonError(RuntimeError):
    """What the poison Agent raises: a stand-in for an Agent bug triggered by one message."""


class PoisonEcho:
    """Echoes like the built-in echo Agent, but raises for any text that contains "poison" and takes SLOW_S
    seconds over a text that contains "slow" (so a paused worker is caught in the middle of a turn)."""

    def reply(self, conversation: Conversation) -> str:
        text = conversation.message.text
        if POISON in text:
            raise PoisonError(f"the agent cannot handle this message ({len(text)} chars)")
        if SLOW in text:
            time.sleep(SLOW_S)
        return f"echo: {text}"
