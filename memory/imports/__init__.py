"""Chat exports from other services, read into conversations: `open_export(path)`.

Formats: ChatGPT (zip or conversations.json), Claude.ai, Character.AI (CAI Tools),
SillyTavern (.jsonl chats) and plain JSONL. Detected from content; `fmt` forces one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath

from memory.imports.formats import FORMATS, READERS, sniff
from memory.imports.model import Imported, Notes, Turn, to_epoch
from memory.imports.source import ImportFailed, Member, members

__all__ = ["FORMATS", "Export", "ImportFailed", "Imported", "Notes", "Turn", "open_export", "to_epoch"]


@dataclass
class Export:
    path: str
    parts: list[tuple[str, Member]]   # (format, file) in reading order

    @property
    def formats(self) -> list[str]:
        return sorted({fmt for fmt, _ in self.parts})

    @property
    def size(self) -> int:
        return sum(member.size for _, member in self.parts)

    @property
    def done(self) -> int:
        return sum(member.done for _, member in self.parts)

    def conversations(self, notes: Notes) -> Iterator[Imported]:
        for fmt, member in self.parts:
            yield from READERS[fmt](member, notes)


@contextmanager
def open_export(path: str, fmt: str | None = None, label: str | None = None) -> Iterator[Export]:
    """The export at `path`, its format detected (or `fmt`); `label` names it in errors."""
    label = label or path
    if fmt is not None and fmt not in FORMATS:
        raise ImportFailed(label, f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    with members(path, label) as found:
        yield Export(label, _choose(label, found, fmt))


def _choose(path: str, found: list[Member], fmt: str | None) -> list[tuple[str, Member]]:
    # An archive from ChatGPT or Claude holds one conversations.json among other files.
    named = sorted((m for m in found if PurePosixPath(m.name).name == "conversations.json"),
                   key=lambda m: m.name.count("/"))
    candidates = named[:1] if len(found) > 1 and named else found
    parts = []
    for member in candidates:
        if member.size == 0:
            continue
        if fmt is None:
            detected = sniff(member)
            if detected is not None:
                parts.append((detected, member))
        elif len(found) == 1 or member.name.lower().endswith((".json", ".jsonl")):
            parts.append((fmt, member))
    if not parts:
        what = "an empty file" if found and all(m.size == 0 for m in found) else "no export Homefire knows"
        raise ImportFailed(path, f"{what}: expected a ChatGPT or Claude export (zip or "
                                 "conversations.json), a CAI Tools .json, a SillyTavern .jsonl chat, "
                                 "or JSONL of {\"messages\": [...]}; --format forces one of "
                                 f"{', '.join(FORMATS)}")
    return parts
