"""Companions: persona cards (our YAML files, the API, imported cards) stored in SQLite."""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from store.db import Database
from store.lorebook import Lorebook

Source = Literal["config", "api", "card"]


class Sampling(BaseModel):
    """Sampling defaults for a companion; a request may override them within limits."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    temperature: float = Field(0.8, ge=0, le=2)
    """Randomness of replies: 0 is deterministic, 1 is the model's own distribution."""
    top_p: float = Field(0.95, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to this."""
    repetition_penalty: float = Field(1.05, gt=0, le=2)
    """Values above 1 discourage repeating earlier tokens."""
    max_tokens: int = Field(256, ge=1, le=32768)
    """Longest reply in tokens; requests asking for more are clamped to this."""

    def drawn(self, fitted: dict | None = None, asked: dict | None = None) -> dict:
        """What a reply is drawn with: these values, then a tuned version's fitted sampling
        (finetune/sampling.py), then a request's own. max_tokens stays the ceiling: a client
        or the fitting may ask for less, never more."""
        fitted, asked = fitted or {}, asked or {}
        params = {key: fitted.get(key, getattr(self, key))
                  for key in ("temperature", "top_p", "repetition_penalty")}
        params.update({k: v for k, v in asked.items() if v is not None and k != "max_tokens"})
        params["max_tokens"] = min(asked.get("max_tokens") or fitted.get("max_tokens") or self.max_tokens,
                                   self.max_tokens)
        return params


class Companion(BaseModel):
    """A persona card: Character Card V2/V3 fields plus Homefire's own."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    """Stable handle: the `model` name clients ask for."""
    name: str = Field(min_length=1, max_length=200)
    """Display name, substituted for {{char}}."""
    description: str = ""
    """Who the companion is."""
    personality: str = ""
    """A short summary of temperament."""
    scenario: str = ""
    """The situation the conversation takes place in."""
    first_mes: str = ""
    """Greeting that opens a new conversation."""
    mes_example: str = ""
    """Example dialogue showing the voice."""
    system_prompt: str = ""
    """Replaces the default system instruction when set."""
    post_history_instructions: str = ""
    """Reminder placed after the conversation history, just before the reply."""
    alternate_greetings: list[str] = []
    """Other greetings a client may offer instead of first_mes."""
    base_model: str | None = None
    """Model this persona is meant for; None means whatever the server runs."""
    sampling: Sampling = Sampling()
    """Sampling defaults."""
    adapter: str | None = None
    """LoRA adapter version the companion speaks through (filled by fine-tuning)."""
    character_book: Lorebook | None = None
    """What the companion knows of its world: entries put in the prompt when the recent messages
    name their keys (a card's lorebook, SillyTavern's world info)."""

    _key: str | None = PrivateAttr(None)
    _stored: int | None = PrivateAttr(None)   # hash of the stored JSON: the same card, the same hash

    @property
    def key(self) -> str:
        """Where its data is kept: the id of a shared companion, OWNER.ID of a user's own."""
        return self._key or self.id

    def stored_as(self, key: str) -> Companion:
        self._key = key
        return self

    @property
    def stored_hash(self) -> int | None:
        """Changes when the stored card does (None: not read from the store); a cache key."""
        return self._stored

    @classmethod
    def from_row(cls, row) -> Companion:
        companion = cls.model_validate_json(row["card"]).stored_as(row["id"])
        companion._stored = hash(row["card"])
        return companion


class ParsedCards:
    """Cards as last parsed, by their stored JSON: a companion is read on every request, and a
    card with a big lorebook takes milliseconds to validate. Each caller gets its own copy."""

    def __init__(self, size: int = 256):
        self.size, self.cards, self.lock = size, OrderedDict(), threading.Lock()

    def load(self, row) -> Companion:
        with self.lock:
            parsed = self.cards.get(row["card"])
            if parsed is not None:
                self.cards.move_to_end(row["card"])
        if parsed is None:
            parsed = Companion.from_row(row)
            with self.lock:
                self.cards[row["card"]] = parsed
                while len(self.cards) > self.size:
                    self.cards.popitem(last=False)
        return parsed.model_copy(deep=False).stored_as(row["id"])


def key_for(companion_id: str, owner: str | None) -> str:
    """A user's own companions live in that user's namespace; ids and user names hold no '.'."""
    return f"{owner}.{companion_id}" if owner else companion_id


def visible_id(key: str) -> str:
    """The id its owner knows a companion by."""
    return key.rpartition(".")[2]


class CompanionError(ValueError):
    """A persona card or companion file is invalid; the message says where."""


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:64]
    return slug or "companion"


def format_validation_error(err: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()
    )


def load_companion_file(path: Path) -> Companion:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CompanionError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise CompanionError(f"{path}: expected a mapping of persona fields at the top level")
    data.setdefault("id", path.stem)
    try:
        return Companion.model_validate(data)
    except ValidationError as err:
        raise CompanionError(f"{path}: {format_validation_error(err)}") from err


class CompanionStore:
    """Companions: shared ones (owner NULL: persona files, admins' API companions), stored
    under their id, and each user's own, stored under OWNER.ID, so two users may each have a
    `luna` and neither learns of the other's. A viewer sees the shared ones and their own; an
    id of theirs hides a shared one of the same id. `viewer` None is the operator, who names
    companions by key."""

    def __init__(self, db: Database):
        self.db = db
        self.parsed = ParsedCards()

    def _visible(self, viewer: str, where: str = "", params: tuple = ()) -> list[Companion]:
        rows = self.db.query(
            f"SELECT id, card FROM companions WHERE (owner IS NULL OR owner = ?) {where} "
            "ORDER BY owner IS NULL, id", (viewer, *params))
        seen, found = set(), []
        for row in rows:   # the viewer's own first: they shadow shared ones of the same id
            companion = self.parsed.load(row)
            if companion.id not in seen:
                seen.add(companion.id)
                found.append(companion)
        return sorted(found, key=lambda c: c.id)

    def list(self, viewer: str | None = None) -> list[Companion]:
        if viewer is not None:
            return self._visible(viewer)
        rows = self.db.query("SELECT id, card FROM companions ORDER BY id")
        return [self.parsed.load(r) for r in rows]

    def ids(self, viewer: str | None = None) -> list[str]:
        return [c.id if viewer is not None else c.key for c in self.list(viewer)]

    def get(self, companion_id: str, viewer: str | None = None) -> Companion | None:
        """The companion `viewer` knows by this id (theirs first, then a shared one)."""
        if viewer is not None:
            found = self._visible(viewer, "AND id IN (?, ?)", (companion_id, key_for(companion_id, viewer)))
            return found[0] if found else None
        rows = self.db.query("SELECT id, card FROM companions WHERE id = ?", (companion_id,))
        return self.parsed.load(rows[0]) if rows else None

    def origin(self, key: str) -> tuple[Source, str | None, str | None] | None:
        """(source, source path, owner) of the companion stored as `key`, or None."""
        rows = self.db.query("SELECT source, source_path, owner FROM companions WHERE id = ?", (key,))
        return (rows[0]["source"], rows[0]["source_path"], rows[0]["owner"]) if rows else None

    def put(self, companion: Companion, source: Source, source_path: str | None = None,
            owner: str | None = None) -> Companion:
        """Create or replace the companion in its owner's namespace (None: shared)."""
        now, key = time.time(), key_for(companion.id, owner)
        with self.db.transaction() as conn:
            conn.execute(
                """INSERT INTO companions (id, card, source, source_path, owner, created_at, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(id) DO UPDATE SET card = excluded.card, source = excluded.source,
                       source_path = excluded.source_path, updated_at = excluded.updated_at""",
                (key, companion.model_dump_json(), source, source_path, owner, now, now),
            )
        return companion.model_copy().stored_as(key)

    def held_by_others(self, key: str, user: str) -> tuple[int, int]:
        """How many conversations and memories with this companion belong to users other than
        `user` (a companion is deleted with its rows: theirs must not go with it)."""
        row = self.db.query("""SELECT
            (SELECT COUNT(*) FROM conversations WHERE companion_id = ? AND user_id != ?),
            (SELECT COUNT(*) FROM memories WHERE companion_id = ? AND user_id != ?)""",
                            (key, user, key, user))
        return row[0][0], row[0][1]

    def delete(self, key: str) -> bool:
        with self.db.transaction() as conn:
            return conn.execute("DELETE FROM companions WHERE id = ?", (key,)).rowcount > 0

    def sync_dir(self, directory: Path) -> list[Companion]:
        """Store every persona file of directory (see load_dir) as a shared companion; a user's
        own companion of the same id is a different row and is never touched."""
        loaded = load_dir(directory)
        for companion, path in loaded:
            shared_file = ("config", str(path), None)
            stored = self.get(companion.id)   # compared by fields: the stored one knows its key
            if stored is None or stored.model_dump() != companion.model_dump() \
                    or self.origin(companion.id) != shared_file:
                self.put(companion, "config", str(path))
        return [companion for companion, _ in loaded]


def load_dir(directory: Path) -> list[tuple[Companion, Path]]:
    """Load every *.yaml persona in directory; any invalid file stops the load."""
    if not directory.is_dir():
        raise CompanionError(f"{directory}: the companions directory does not exist")
    files = sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))
    loaded, seen = [], {}
    for path in files:
        companion = load_companion_file(path)
        if companion.id in seen:
            raise CompanionError(f"{path}: id {companion.id!r} is also used by {seen[companion.id]}")
        seen[companion.id] = path
        loaded.append((companion, path))
    return loaded
