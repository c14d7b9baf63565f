"""Imported conversations into a companion's history and memory, all or nothing.

Two phases, so a long import never holds the database: the export is read and checked
into a staging SQLite file beside the data (bounded memory, no lock held), then copied in
by batches of short transactions, invisible (owned by a user id nobody has) until one
short transaction hands them to their user. A failure in either phase leaves the history
as it was.

Re-imports add only what is new: a conversation is matched by its export id, and by the
chain hash of its messages (store/history.py) against what is stored. A stored
conversation that the export continues is extended; one the export repeats is left
alone; one that diverged (an edited turn) is kept, and the export's version is added
beside it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memory.imports import Export, Imported, ImportFailed, Notes
from memory.remember import group_text, memory_spans, span_text
from store.companions import CompanionStore, visible_id
from store.db import Database, Progress
from store.history import History, chain_root, chains, group_root
from store.staging import COPY_BATCH, ExportCommit, ExportStaging
from store.users import LOCAL, Users


@dataclass
class ImportResult:
    formats: list[str]
    conversations_added: int = 0       # new to this companion (forks of edited ones included)
    conversations_extended: int = 0    # stored before, continued by this export
    conversations_unchanged: int = 0   # nothing new in them
    conversations_empty: int = 0       # nothing left to import once machinery was dropped
    messages_added: int = 0
    memories_added: int = 0
    first_at: float | None = None
    last_at: float | None = None
    suggested_persona: list[str] = field(default_factory=list)
    user_profile: list[str] = field(default_factory=list)
    attachments: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def tally(self, conv: Imported, added: int | None = None) -> None:
        """Count `added` of conv's messages (all by default) and widen the date range."""
        times = [t for t in (conv.created_at, *(m.created_at for m in conv.messages)) if t]
        if times:
            self.first_at = min(self.first_at or times[0], *times)
            self.last_at = max(self.last_at or times[0], *times)
        self.messages_added += len(conv.messages) if added is None else added

    def take_notes(self, notes: Notes) -> None:
        self.suggested_persona, self.user_profile = notes.persona, notes.profile
        self.attachments, self.dropped = notes.attachments, dict(notes.dropped.most_common())


def preview(export: Export, on_conversation: Callable[[Imported], None] | None = None) -> ImportResult:
    """What the export holds, read and checked; nothing is written."""
    notes, result = Notes(), ImportResult(export.formats)
    for conv in export.conversations(notes):
        if not conv.messages:
            result.conversations_empty += 1
            continue
        result.conversations_added += 1
        result.tally(conv)
        if on_conversation:
            on_conversation(conv)
    result.take_notes(notes)
    return result


class Importer:
    def __init__(self, db: Database, staging_dir: Path, user: str = LOCAL, batch: int = COPY_BATCH):
        self.db = db
        self.staging_dir = staging_dir
        self.user = user   # whose history the export becomes
        self.called = Users(db).called(user)   # their name in the memories' text
        self.history = History(db, user)
        self.batch = batch
        self.holds: list[float] = []   # seconds each write transaction of the commit held the database

    def run(self, export: Export, companion_id: str, companion_name: str,
            progress: Progress | None = None, dry_run: bool = False) -> ImportResult:
        """Import what is new; with dry_run, only count it."""
        return self.run_with(lambda path: self.stage(export, companion_id, companion_name, path, progress),
                             companion_id, export.path, dry_run)

    def run_with(self, stage: Callable[[Path], ImportResult], companion_id: str, label: str,
                 dry_run: bool = False) -> ImportResult:
        """Fill a new staging file with `stage(path)`, then commit it (unless dry_run)."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        path = self.staging_dir / f"import-{uuid.uuid4().hex}.db"
        try:
            result = stage(path)
            if not dry_run:
                self._commit(path, companion_id, label)
            return result
        finally:
            for leftover in (path, path.with_name(path.name + "-journal")):
                leftover.unlink(missing_ok=True)

    def stage(self, export: Export, companion_id: str, name: str, path: Path,
              progress: Progress | None) -> ImportResult:
        """Read and check the export into the staging file at `path`; reads the database only."""
        notes, result = Notes(), ImportResult(export.formats)
        staging = ExportStaging(path)
        try:
            seen: set[tuple[str, str]] = set()
            root = chain_root(visible_id(companion_id))
            for count, conv in enumerate(export.conversations(notes), start=1):
                if (conv.source, conv.id) in seen:   # listed twice in one export: once is enough
                    continue
                seen.add((conv.source, conv.id))
                if not conv.messages:
                    result.conversations_empty += 1
                else:
                    self._stage_one(staging, conv, companion_id, name, root, result)
                if progress and count % 200 == 0:
                    progress(export.done, export.size)
            staging.finish()
        finally:
            staging.close()
        if progress:
            progress(export.size, export.size)
        result.take_notes(notes)
        return result

    def members(self, conv: Imported, companion_id: str) -> dict[str, tuple[str, str]]:
        """A group chat's characters: {name: (companion key, name)}, the importing companion
        first; each must be one of the user's companions (by name), else nothing is imported."""
        mine = {c.name.casefold(): c for c in CompanionStore(self.db).list(self.user)}
        missing = [n for n in conv.characters if n.casefold() not in mine]
        where = f"conversation {conv.title or conv.id!r} is a group chat of {', '.join(conv.characters)}"
        if missing:
            raise ImportFailed(where, "no companion of yours is called " + ", ".join(missing)
                               + ": create or import them first (nothing was imported)")
        found = {n: (mine[n.casefold()].key, mine[n.casefold()].name) for n in conv.characters}
        if companion_id not in {key for key, _ in found.values()}:
            raise ImportFailed(where, f"the companion it is imported into ({visible_id(companion_id)}) is "
                                      "not one of them; import it into one of theirs (nothing was imported)")
        return dict(sorted(found.items(), key=lambda item: item[1][0] != companion_id))

    def _stage_one(self, staging: ExportStaging, conv: Imported, companion_id: str, name: str,
                   root: str, result: ImportResult) -> None:
        # A group chat (SillyTavern's, several characters replying) is a conversation with them all;
        # its chains begin at its own root (store/history.py: its original id).
        members = self.members(conv, companion_id) if len(conv.characters) > 1 else {}
        if members:
            root = group_root(conv.id)
        hashes = chains(root, [(turn.role, turn.content) for turn in conv.messages])
        position = {chain: i for i, chain in enumerate(hashes)}
        target, start = None, 0
        for stored, last in self.history.imported_as(companion_id, conv.source, conv.id):
            if last == hashes[-1] or self.history.holds_chain(stored, hashes[-1]):
                result.conversations_unchanged += 1   # the export holds nothing this one lacks
                return
            if last in position and position[last] + 1 > start:
                target, start = stored, position[last] + 1
        now = time.time()
        times = [t.created_at or conv.created_at or now for t in conv.messages]
        if target is None:
            target = uuid.uuid4().hex
            result.conversations_added += 1
        else:
            result.conversations_extended += 1
        created = conv.created_at or times[0]
        # Every message in a memory, whatever its neighbours (memory_spans); what is stored
        # already has its memories.
        memories = []
        keys = {n: key for n, (key, _) in members.items()}
        names = {key: shown for key, shown in members.values()}
        for span in memory_spans([t.role for t in conv.messages], settled=True):
            if span[-1] >= start:
                said = [(conv.messages[i].role, conv.messages[i].content) for i in span]
                asked = next((text for role, text in reversed(said) if role == "user"), None)
                if members:   # every member heard it
                    text = group_text([(t.role, t.content, keys.get(t.speaker or ""))
                                       for t in (conv.messages[i] for i in span)], names, self.called)
                    memories += [(target, hashes[span[-1]], text, asked, times[span[-1]], key)
                                 for key in names]
                else:
                    memories.append((target, hashes[span[-1]], span_text(said, name, self.called), asked,
                                     times[span[-1]], None))
        staging.add((target, conv.title, conv.source, conv.id, created, max(times), int(start == 0),
                     hashes[start - 1] if start else None, json.dumps(list(names)) if members else None),
                    [(target, t.role, t.content, times[i], hashes[i], int(start == 0),
                      keys.get(t.speaker or "") if members and t.role == "assistant" else None)
                     for i, t in enumerate(conv.messages) if i >= start], memories)
        result.tally(conv, added=len(conv.messages) - start)
        result.memories_added += len(memories)

    def _commit(self, path: Path, companion_id: str, label: str) -> None:
        commit = ExportCommit(self.db, path, self.user, self.batch)
        try:
            commit.run(companion_id, ImportFailed, label)
        finally:
            self.holds += commit.holds
