"""Long conversations for the tests of running summaries (serve/summaries.py): more than the
embedded model's 4,096-token context, and the wait for a fold to be written."""

from __future__ import annotations

import time

import httpx

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def long_conversation(turns: int = 84) -> list[dict]:
    """Messages of about a hundred tokens each: together more than the 4,096-token context."""
    said = []
    for i in range(turns):
        day = DAYS[i % 7]
        if i % 2 == 0:
            said.append({"role": "user", "content": (
                f"On {day} of week {i // 14 + 1} I worked in the allotment again: I planted row {i} with "
                f"tomatoes, watered the beans, fixed the fence by the shed and talked with my neighbour Ada "
                f"about her bees, the weather and the price of seed potatoes at the market this year.")})
        else:
            said.append({"role": "assistant", "content": (
                f"That sounds like a full {day}! Row {i - 1} of tomatoes will love this sun. How are Ada's "
                f"bees doing, and did the fence hold up after the wind? Tell me more about the seed "
                f"potatoes; last time you said the market had a new stall near the bakery.")})
    return said


def wait_for_summary(http: httpx.Client, conversation: str, not_id: int | None = None,
                     timeout: float = 600) -> dict:
    """The conversation's summary once a fold has written it (a fold is one generation of the
    engine, in the background: a state to wait for, whatever the machine's speed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = http.get(f"/api/v1/conversations/{conversation}/summary").json()
        if state["summary"] and state["summary"]["id"] != not_id and not state["folding"]:
            return state["summary"]
        time.sleep(0.5)
    raise AssertionError(f"no summary of {conversation} was written in {timeout} s: {state}")
