"""What every export format is read into: conversations of user and assistant turns."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from dateutil import parser as dateparser


@dataclass(slots=True)
class Turn:
    role: str                   # user | assistant
    content: str
    created_at: float | None
    speaker: str | None = None  # a group chat's reply: the character's name (SillyTavern)


@dataclass(slots=True)
class Imported:
    """One conversation as the export shows it: original id, the kept thread only."""

    id: str
    title: str | None
    source: str                 # the format: chatgpt, claude, characterai, sillytavern, jsonl
    created_at: float | None
    messages: list[Turn]

    @property
    def characters(self) -> list[str]:
        """The names that reply, in the order they first do: more than one in a group chat."""
        return list(dict.fromkeys(t.speaker for t in self.messages if t.role == "assistant" and t.speaker))

    def as_json(self) -> dict:
        return {"id": self.id, "title": self.title, "source": self.source, "created_at": self.created_at,
                "messages": [{"role": m.role, "content": m.content, "created_at": m.created_at}
                             for m in self.messages]}


@dataclass
class Notes:
    """What an export says besides its messages, and what was left out and why."""

    persona: list[str] = field(default_factory=list)    # the user's instructions to the assistant
    profile: list[str] = field(default_factory=list)    # what the user said about themselves
    attachments: int = 0                                 # images and files: no text to import
    dropped: Counter = field(default_factory=Counter)   # reason -> messages left out

    def suggest(self, persona: str | None = None, profile: str | None = None) -> None:
        # Exports repeat the same custom instructions in every conversation: keep each once.
        if persona and persona.strip() and persona.strip() not in self.persona:
            self.persona.append(persona.strip())
        if profile and profile.strip() and profile.strip() not in self.profile:
            self.profile.append(profile.strip())


_SILLYTAVERN_DATE = re.compile(
    r"(\d{4})-(\d{1,2})-(\d{1,2}) ?@(\d{1,2})h ?(\d{1,2})m ?(\d{1,2})s(?: ?(\d{1,3})ms)?")


def to_epoch(value: object) -> float | None:
    """Seconds since the epoch from the many ways exports write time; None if unknown."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
        return seconds / 1000 if seconds > 1e11 else seconds   # milliseconds
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if match := _SILLYTAVERN_DATE.fullmatch(text):   # "2023-8-10 @12h 34m 56s 789ms"
        y, mo, d, h, mi, s, ms = (int(g or 0) for g in match.groups())
        return datetime(y, mo, d, h, mi, s, ms * 1000).timestamp()
    try:
        return to_epoch(float(text))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:
            moment = dateparser.parse(text)   # "August 10, 2023 12:34pm"
        except (ValueError, OverflowError):
            return None
    return moment.timestamp()   # without a zone: local time, as the app that wrote it showed it
