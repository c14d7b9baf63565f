"""Clients' background work: recognised, answered without persona or memory, never stored.

Front ends send more than the person's messages: Open WebUI asks the chat model for titles,
tags and follow-ups after each reply; SillyTavern sends "quiet" prompts (summaries,
expression labels, impersonation). Stored, they would become the companion's history,
memories and, through `homefire finetune`, its voice. A request is kept out when it names
the utility model, asks `store: false`, or its last message matches a known task pattern
(`tasks.patterns`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel

from serve.config import TasksConfig
from store.history import History

SYSTEM_ROLES = ("system", "developer")


@dataclass(frozen=True)
class Handling:
    """How one chat request is answered."""

    store: bool                  # history, memory and training data take it
    utility: bool = False        # no persona, no memory: the served model as the messages ask
    why: str | None = None       # why it is not stored: store_false | utility_model | task
    client: str | None = None    # the client whose task pattern matched


class Tasks:
    def __init__(self, config: TasksConfig):
        self.model = config.model
        self.patterns = [(p.client, re.compile(p.pattern)) for p in config.patterns]

    def client_of(self, text: str) -> str | None:
        """The client whose background task `text` (a request's last message) is, if any."""
        text = text.lstrip()
        return next((client for client, pattern in self.patterns if pattern.search(text)), None)

    def handling(self, model: str, store: bool | None, last_message: str) -> Handling:
        if model == self.model:
            return Handling(store=False, utility=True, why="utility_model")
        if client := self.client_of(last_message):
            return Handling(store=False, utility=True, why="task", client=client)
        if store is False:
            return Handling(store=False, why="store_false")
        return Handling(store=True)


def utility_turns(messages: list[tuple[str, str]]) -> tuple[list[str], list[tuple[str, str]]]:
    """(system texts, turns) for a utility request: the system messages before the first
    turn stay system; a later one is an instruction in its place (SillyTavern ends its quiet
    prompts with one), so it becomes the user's."""
    system, turns = [], []
    for role, text in messages:
        if role in SYSTEM_ROLES and not turns:
            system.append(text)
        else:
            turns.append(("user" if role in SYSTEM_ROLES else role, text))
    return system, turns


class TaskConversation(BaseModel):
    id: str
    title: str | None
    created_at: float
    client: str          # whose task pattern its first message matches
    first_message: str   # its beginning


def task_conversations(history: History, tasks: Tasks, companion_key: str) -> list[TaskConversation]:
    """The user's conversations with the companion that began with a client's background task
    (stored before Homefire recognised them, or by a client with patterns of its own)."""
    found = []
    for conversation, first in history.first_messages(companion_key):
        if first and (client := tasks.client_of(first)):
            found.append(TaskConversation(id=conversation.id, title=conversation.title,
                                          created_at=conversation.created_at, client=client,
                                          first_message=first[:200]))
    return found
