"""Group chats: who answers next (the reply order), and the conversation as one member heard it.

Each reply is the speaker's own turn: its card, its adapter, its memories with this user
(serve/chat.py). The others' messages reach its prompt as lines with their names, on the
user's side of the conversation, so the model writes for the speaker alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from serve.chat import Turn
from store.companions import Companion
from store.history import Message
from store.persona import substitute
from store.users import DEFAULT_USER_NAME, LOCAL

NOTE = ("This is a group chat: {user} talks with {names}. You are {char}. Write {char}'s next "
        "message only, in {char}'s own voice, without a name in front; the others' messages come "
        "after their names, and you never write theirs or {user}'s.")
ABOUT = "{name}: {description}"
ABOUT_CHARS = 200   # of each other member's description, so the others are known by more than a name


class NeedsSpeaker(ValueError):
    """A manual group chat: the user names who answers."""


class NotAMember(LookupError):
    def __init__(self, asked: str, members: Sequence[Companion]):
        super().__init__(f"speaker: {asked!r} is not in this group chat; its companions are "
                         + ", ".join(f"{c.id} ({c.name})" for c in members))


@dataclass
class GroupChat:
    """A group conversation's member companions, in order, and its reply order."""

    members: list[Companion]
    order: str

    def member(self, asked: str) -> Companion:
        """The member a client names by id or by name (any case)."""
        wanted = asked.strip().casefold()
        for companion in self.members:
            if wanted in (companion.id.casefold(), companion.name.casefold()):
                return companion
        raise NotAMember(asked, self.members)

    def speaker_of(self, message: Message) -> Companion | None:
        """Who spoke a stored reply (None: no member now, or a user's message)."""
        if message.role != "assistant":
            return None
        said_by = message.speaker or self.members[0].id
        return next((c for c in self.members if c.id == said_by), None)

    def next_speaker(self, past: Sequence[Message], said: str | None) -> Companion:
        """Who answers `said` (None: no new message) after `past`, by the reply order."""
        if self.order == "manual":
            raise NeedsSpeaker("speaker: this group chat replies in manual order; name the companion who "
                               "answers (one of " + ", ".join(c.id for c in self.members) + ")")
        spoken = [s.key for m in past if (s := self.speaker_of(m)) is not None]
        if self.order == "natural" and said:
            named = addressed(self.members, said)
            if named is not None:
                return named
        if self.order == "round_robin":
            keys = [c.key for c in self.members]
            last = next((k for k in reversed(spoken) if k in keys), None)
            return self.members[(keys.index(last) + 1) % len(keys) if last else 0]
        # Natural, with nobody named: who has not spoken for longest (never, first).
        last_spoke = {key: index for index, key in enumerate(spoken)}
        return min(self.members, key=lambda c: last_spoke.get(c.key, -1))

    def heard_by(self, speaker: Companion, past: Sequence[Message], said: str | None,
                 user: str) -> list[dict]:
        """The conversation as `speaker` takes it in: its own replies as the assistant's, the
        user's messages and the other members' as named lines; ends with a message to answer."""
        turns = []
        for m in past:
            if not m.content:
                continue
            by = self.speaker_of(m)
            if m.role == "user":
                turns.append({"role": "user", "content": f"{user}: {m.content}"})
            elif by is not None and by.key == speaker.key:
                # What its prompt showed is shown there again, so the engine's cached prefix holds.
                turns.append({"role": "assistant", "content": m.content,
                              "shown_ids": [u["id"] for u in m.memories_used or ()]})
            else:
                name = by.name if by else (m.speaker or "someone")
                turns.append({"role": "user", "content": f"{name}: {m.content}"})
        if said:
            turns.append({"role": "user", "content": f"{user}: {said}"})
        elif not turns or turns[-1]["role"] == "assistant":
            turns.append({"role": "user", "content": f"({user} waits for {speaker.name} to go on.)"})
        return turns

    def turn(self, speaker: Companion, past: Sequence[Message], said: str | None, overrides: dict,
             extra_system: Sequence[str] = (), api: str = "native", user: str = LOCAL,
             called: str = DEFAULT_USER_NAME) -> Turn:
        """The speaker's reply to plan: the conversation as it heard it, the group's note, and
        stop strings where the model would go on as someone else ("\nOwl:")."""
        others = [c.name for c in self.members if c.key != speaker.key] + [called]
        stop = [*(overrides.get("stop") or ()), *(f"\n{name}:" for name in others)]
        return Turn(speaker, self.heard_by(speaker, past, said, called), overrides | {"stop": stop},
                    [*extra_system, self.note(speaker, called)], api, user, called, group=True,
                    names=(*(c.name for c in self.members), called))

    def note(self, speaker: Companion, user: str) -> str:
        """The system note that makes the prompt a group chat, with who the others are."""
        others = [c for c in self.members if c.key != speaker.key]
        names = ", ".join(c.name for c in self.members[:-1]) + f" and {self.members[-1].name}"
        about = [ABOUT.format(name=c.name, description=_short(substitute(c.description, c, user)))
                 for c in others if c.description.strip()]
        return "\n".join([NOTE.format(user=user, names=names, char=speaker.name), *about])


def addressed(members: Sequence[Companion], said: str) -> Companion | None:
    """The member `said` names first (its name, its first name or its id, as a word), if any."""
    found = []
    for companion in members:
        names = {companion.name, companion.name.split()[0], companion.id}
        for name in names:
            match = re.search(rf"(?<!\w){re.escape(name)}(?!\w)", said, re.IGNORECASE)
            if match:
                found.append((match.start(), companion))
    return min(found, key=lambda f: f[0])[1] if found else None


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ABOUT_CHARS else text[:ABOUT_CHARS].rsplit(" ", 1)[0] + " ..."
