"""Turning what was said into memories: which messages each memory holds (memory_spans), how
it reads (span_text), and remembering what a conversation said since its last memory."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from store.users import DEFAULT_USER_NAME

if TYPE_CHECKING:   # the CLI imports this without Chroma and torch
    from memory.store import MemoryStore


def exchange_text(asked: str, reply: str, companion_name: str, user: str = DEFAULT_USER_NAME) -> str:
    """How an exchange reads as a memory."""
    return span_text([("user", asked), ("assistant", reply)], companion_name, user)


def span_text(said: list[tuple[str, str]], companion_name: str, user: str = DEFAULT_USER_NAME) -> str:
    """How a memory reads: each message on its own line after its speaker's name."""
    return "\n".join(f"{user if role == 'user' else companion_name}: {text}" for role, text in said)


def memory_spans(roles: list[str], settled: bool, greeting: bool = False) -> list[list[int]]:
    """Which messages (indices into `roles`) each memory holds, oldest first.

    A memory ends at a reply of the companion and holds the user's messages before it, with
    any companion message that answered no one (an opening, a second reply) as context.
    What follows the last reply waits for the next one, unless the conversation is `settled`
    (an import, a start-up): then it is a memory too. With `greeting`, `roles` begin a live
    conversation, whose companion messages before the user's first are the card's greeting:
    the same in every conversation, it made every first memory alike (and a question asked
    after a greeting recalled them all), so it is in none.
    """
    spans, run = [], []
    for i, role in enumerate(roles):
        greeting = greeting and role != "user"
        if not greeting:
            run.append(i)
        if role == "assistant" and any(roles[j] == "user" for j in run):
            spans.append(run)
            run = []
    if run and settled:
        spans.append(run)
    return spans


def remember_new(store: MemoryStore, conversation_id: str, companion_name: str, settled: bool = False,
                 source: str = "live") -> int:
    """Remember the conversation's messages that no memory holds yet, a span at a time
    (memory_spans); returns how many memories were added. Messages after a deleted
    memory's are never taken back into one."""
    rows = store.rows.unremembered(conversation_id)
    if not rows:
        return 0
    called = store.rows.called_in(conversation_id)
    # A group chat: every member remembers what it heard there, each reply under its speaker's name.
    members = store.rows.members_of(conversation_id)
    greeting = source == "live" and not store.rows.begins_before(conversation_id, rows[0]["id"])
    added = 0
    for span in memory_spans([r["role"] for r in rows], settled, greeting):
        said = [(rows[i]["role"], rows[i]["content"]) for i in span]
        asked = next((text for role, text in reversed(said) if role == "user"), None)
        if asked is None and source != "imported":
            continue   # a greeting alone is the card's, not something said
        end = rows[span[-1]]
        if members:
            text = group_text([(rows[i]["role"], rows[i]["content"], rows[i]["speaker"]) for i in span],
                              members, called)
        else:
            text = span_text(said, companion_name, called)
        for companion_key in members or [end["companion_id"]]:
            if store.add_exchange(companion_key, conversation_id, end["id"], asked, text, end["created_at"],
                                  source):
                added += 1
    return added


def group_text(said: list[tuple[str, str, str | None]], members: dict[str, str],
               user: str = DEFAULT_USER_NAME) -> str:
    """How a group chat's messages read as a memory: each after its speaker's name."""
    first = next(iter(members.values()))
    return "\n".join(f"{user}: {text}" if role == "user" else f"{members.get(speaker or '', first)}: {text}"
                     for role, text, speaker in said)

def repair(store: MemoryStore) -> int:
    """At start-up: remember what no memory holds yet (exchanges committed just before a
    crash, messages no reply followed); returns how many memories were added."""
    rows = store.rows.unremembered_conversations()
    return sum(remember_new(store, row["id"], json.loads(row["card"])["name"], settled=True,
                            source="imported" if row["source"] == "imported" else "live")
               for row in rows)

