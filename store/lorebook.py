"""A companion's lorebook (Character Card V2/V3 `character_book`, SillyTavern's "world info"):
entries of what the character knows about its world, each put in the prompt when the recent
messages name one of its keys (serve/lore.py decides which and where).

Cards come from many front ends, so a book keeps every field it came with, known or not, and
gives back exactly those (a field it did not have is not added on export); unknown fields and
decorators are kept, and `unsupported` lists the decorators Homefire does not act on.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_serializer

# Decorators (a V3 entry's first lines, `@@name value`) that serve/lore.py acts on.
SUPPORTED_DECORATORS = frozenset({
    "depth", "scan_depth", "activate_only_after", "activate_only_every", "activate", "dont_activate",
    "additional_keys", "exclude_keys",
})


class _KeepsWhatCame(BaseModel):
    """Dumps the fields that were given (and the ones the specs require), with any unknown ones."""

    _always: ClassVar[tuple[str, ...]] = ()

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)

    @model_serializer(mode="wrap")
    def _given(self, handler):
        data = handler(self)
        keep = self.model_fields_set | set(self.__pydantic_extra__ or ()) | set(self._always)
        return {key: value for key, value in data.items() if key in keep}


class LoreEntry(_KeepsWhatCame):
    """One entry: what it says, and when it is put in the prompt."""

    _always: ClassVar[tuple[str, ...]] = ("keys", "content", "extensions", "enabled", "insertion_order")

    keys: list[str] = []
    """Words that put the entry in the prompt when one appears in the recent messages."""
    content: str = ""
    """What the prompt gains; may open with V3 decorators (`@@depth 4`)."""
    extensions: dict[str, Any] = {}
    """Front ends' own settings (SillyTavern: position, depth, selectiveLogic, ...), kept as is."""
    enabled: bool = True
    """A disabled entry is never used."""
    insertion_order: int | float = 100
    """Lower goes earlier in the prompt."""
    case_sensitive: bool | None = None
    """Keys match case-sensitively (default: not)."""
    use_regex: bool | None = None
    """Keys are regular expressions (V3). A key written /like this/i is one in any case."""
    constant: bool | None = None
    """Always used, keys or not."""
    name: str | None = None
    """A label for people; never in the prompt."""
    priority: int | float | None = None
    """Over the token budget, the lowest priority goes first."""
    id: int | str | None = None
    """The front end's id for the entry."""
    comment: str | None = None
    """A note for people; never in the prompt."""
    selective: bool | None = None
    """Also require one of secondary_keys."""
    secondary_keys: list[str] | None = None
    """See selective."""
    position: str | None = None
    """before_char or after_char: before or after the character's description."""

    def label(self, index: int) -> str:
        """What a person calls the entry: its name, comment, first key, or its place."""
        first_key = self.keys[0] if self.keys else ""
        return (self.name or self.comment or first_key or f"entry {index + 1}").strip()

    def handle(self, index: int) -> str:
        """Stable within a book: its id, else its place."""
        return str(self.id) if self.id is not None and str(self.id) != "" else f"#{index}"


class Lorebook(_KeepsWhatCame):
    """A card's `character_book`."""

    _always: ClassVar[tuple[str, ...]] = ("entries",)

    name: str | None = None
    """The book's title."""
    description: str | None = None
    """A note for people."""
    scan_depth: int | None = Field(None, ge=0, le=1000)
    """How many of the newest messages are searched for keys (default 2)."""
    token_budget: int | None = Field(None, ge=0, le=1_000_000)
    """Most tokens the entries of one reply may take (default 512)."""
    recursive_scanning: bool | None = None
    """An entry's content may put other entries in too."""
    extensions: dict[str, Any] = {}
    """Front ends' own settings, kept as is."""
    entries: list[LoreEntry] = Field(default_factory=list, max_length=5000)
    """The entries."""


def decorators(content: str) -> tuple[list[tuple[str, str, bool]], str]:
    """The V3 decorators that open an entry's content, as (name, value, is_fallback), and the
    content without them (the newlines around them trimmed too)."""
    found, lines = [], content.split("\n")
    start = next((i for i, line in enumerate(lines) if not line.strip().startswith("@@")), len(lines))
    for line in lines[:start]:
        stripped = line.strip()
        name, _, value = stripped.lstrip("@").partition(" ")
        found.append((name.strip(), value.strip(), stripped.startswith("@@@")))
    return found, "\n".join(lines[start:]).strip("\n")


def chosen(found: list[tuple[str, str, bool]]) -> tuple[dict[str, str], list[str]]:
    """The decorators acted on ({name: value}; the first of a name wins, a fallback counts only
    when what it follows is not supported) and the ones kept but not acted on."""
    acted, ignored, previous_unsupported = {}, [], False
    for name, value, fallback in found:
        supported = name in SUPPORTED_DECORATORS
        if fallback and not previous_unsupported:
            continue
        if supported:
            acted.setdefault(name, value)
            previous_unsupported = False
        else:
            ignored.append(f"@@{name}" + (f" {value}" if value else ""))
            previous_unsupported = True
    return acted, ignored


def unsupported(book: Lorebook | None) -> list[str]:
    """'LABEL: @@name value' for each decorator the book's entries carry that is kept, not acted on."""
    out = []
    for index, entry in enumerate(book.entries if book else ()):
        _, ignored = chosen(decorators(entry.content)[0])
        out += [f"{entry.label(index)}: {d}" for d in ignored]
    return out


def without_decorators(book: Lorebook) -> Lorebook:
    """The book as a V2 card carries it: V2 front ends would show decorators as text."""
    copy = book.model_copy(deep=True)
    for entry in copy.entries:
        entry.content = decorators(entry.content)[1]
    return copy
