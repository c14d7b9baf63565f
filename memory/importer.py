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

import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memory.imports import Export, Imported, ImportFailed, Notes
from memory.remember import memory_spans, span_text
from store.companions import visible_id
from store.db import Database, Progress
from store.history import chain_root, chains
from store.users import LOCAL, Users

# Rows of an import that is not done yet belong to this user id plus a random suffix; user
# names cannot start with "~", so no query of anyone's sees them.
HIDDEN = "~import-"
# Rows copied per transaction: each holds the database for tens of milliseconds (a 60,000
# conversation import held it for 4.7 s in one transaction; bench/import_commit.py).
COPY_BATCH = 2000
HANDOFF_S = 0.005

STAGING = """
CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT, origin TEXT, original_id TEXT,
    created_at REAL, updated_at REAL, new INTEGER, expect_chain TEXT);
CREATE TABLE messages (conversation_id TEXT, role TEXT, content TEXT, created_at REAL, chain TEXT,
    new INTEGER);  -- of a new conversation (else it extends a stored one)
CREATE TABLE memories (conversation_id TEXT, reply_chain TEXT, text TEXT, asked TEXT, created_at REAL);
"""


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


def remove_leftovers(run_dir: Path, db: Database | None = None) -> int:
    """Delete staging files, uploads and unfinished rows that an interrupted import left (hold
    the data lock); returns how many files and conversations."""
    leftovers = [*run_dir.glob("import-*.db*"), *(run_dir / "uploads").glob("*")]
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    if db is None:
        return len(leftovers)
    with db.transaction() as conn:
        rows = conn.execute("DELETE FROM conversations WHERE user_id LIKE ?", (HIDDEN + "%",)).rowcount
    return len(leftovers) + rows


class Importer:
    def __init__(self, db: Database, staging_dir: Path, user: str = LOCAL, batch: int = COPY_BATCH):
        self.db = db
        self.staging_dir = staging_dir
        self.user = user   # whose history the export becomes
        self.called = Users(db).called(user)   # their name in the memories' text
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
        staging = sqlite3.connect(path, isolation_level=None)
        try:
            staging.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + STAGING)
            staging.execute("BEGIN")
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
            # What extends stored conversations is found at once in the short final transaction.
            staging.execute("CREATE INDEX extending_messages ON messages(new) WHERE NOT new")
            staging.execute("CREATE INDEX extended_conversations ON conversations(new) WHERE NOT new")
            staging.execute("COMMIT")
        finally:
            staging.close()
        if progress:
            progress(export.size, export.size)
        result.take_notes(notes)
        return result

    def _stage_one(self, staging: sqlite3.Connection, conv: Imported, companion_id: str, name: str,
                   root: str, result: ImportResult) -> None:
        hashes = chains(root, [(turn.role, turn.content) for turn in conv.messages])
        position = {chain: i for i, chain in enumerate(hashes)}
        target, start = None, 0
        for row in self.db.query(
            "SELECT id, (SELECT chain FROM messages WHERE conversation_id = c.id ORDER BY id DESC LIMIT 1)"
            " AS last FROM conversations c WHERE companion_id = ? AND origin = ? AND original_id = ?"
            " AND user_id = ?", (companion_id, conv.source, conv.id, self.user),
        ):
            if row["last"] == hashes[-1] or self.db.query(
                    "SELECT 1 FROM messages WHERE conversation_id = ? AND chain = ?",
                    (row["id"], hashes[-1])):
                result.conversations_unchanged += 1   # the export holds nothing this one lacks
                return
            if row["last"] in position and position[row["last"]] + 1 > start:
                target, start = row["id"], position[row["last"]] + 1
        now = time.time()
        times = [t.created_at or conv.created_at or now for t in conv.messages]
        if target is None:
            target = uuid.uuid4().hex
            result.conversations_added += 1
        else:
            result.conversations_extended += 1
        created = conv.created_at or times[0]
        staging.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (target, conv.title, conv.source, conv.id, created, max(times),
                         int(start == 0), hashes[start - 1] if start else None))
        staging.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                            [(target, t.role, t.content, times[i], hashes[i], int(start == 0))
                             for i, t in enumerate(conv.messages) if i >= start])
        # Every message in a memory, whatever its neighbours (memory_spans); what is stored
        # already has its memories.
        memories = []
        for span in memory_spans([t.role for t in conv.messages], settled=True):
            if span[-1] >= start:
                said = [(conv.messages[i].role, conv.messages[i].content) for i in span]
                asked = next((text for role, text in reversed(said) if role == "user"), None)
                memories.append((target, hashes[span[-1]], span_text(said, name, self.called), asked,
                                 times[span[-1]]))
        staging.executemany("INSERT INTO memories VALUES (?, ?, ?, ?, ?)", memories)
        result.tally(conv, added=len(conv.messages) - start)
        result.memories_added += len(memories)

    def _commit(self, path: Path, companion_id: str, label: str) -> None:
        hidden = f"{HIDDEN}{uuid.uuid4().hex}"
        try:
            # New conversations and their messages, a batch at a time, owned by a user id no
            # one can have: no query sees them yet, and other users' writes run in between.
            self._in_batches(path, "conversations", self.batch, """
                INSERT INTO conversations (id, user_id, companion_id, title, source, origin,
                    original_id, created_at, updated_at)
                SELECT id, ?, ?, title, 'imported', origin, original_id, created_at, updated_at
                FROM staged.conversations WHERE new AND rowid BETWEEN ? AND ? ORDER BY rowid""",
                             (hidden, companion_id))
            self._in_batches(path, "messages", self.batch, """
                INSERT INTO messages (conversation_id, role, content, created_at, chain)
                SELECT conversation_id, role, content, created_at, chain FROM staged.messages
                WHERE new AND rowid BETWEEN ? AND ? ORDER BY rowid""", ())
            # One short transaction makes the import visible: the check that nothing changed
            # meanwhile, the new conversations handed to their user, the stored ones extended.
            started = time.perf_counter()
            with self.db.attached(path, "staged") as conn:
                changed = conn.execute(
                    """SELECT COUNT(*) FROM staged.conversations s WHERE NOT s.new AND s.expect_chain
                       IS NOT (SELECT chain FROM messages WHERE conversation_id = s.id
                               ORDER BY id DESC LIMIT 1)""").fetchone()[0]
                if changed:
                    raise ImportFailed(label, f"{changed} conversation(s) changed while the export was "
                                              "being read; nothing was imported; run the import again")
                conn.execute("UPDATE conversations SET user_id = ? WHERE user_id = ?", (self.user, hidden))
                conn.execute(
                    """UPDATE conversations SET updated_at = MAX(updated_at, (SELECT updated_at FROM
                           staged.conversations s WHERE s.id = conversations.id))
                       WHERE id IN (SELECT id FROM staged.conversations WHERE NOT new)""")
                conn.execute(
                    """INSERT INTO messages (conversation_id, role, content, created_at, chain)
                       SELECT conversation_id, role, content, created_at, chain FROM staged.messages
                       WHERE NOT new ORDER BY rowid""")
            self.holds.append(time.perf_counter() - started)
        except BaseException:
            with self.db.transaction() as conn:   # messages go with their conversations
                conn.execute("DELETE FROM conversations WHERE user_id = ?", (hidden,))
            raise
        # Then the memories, a batch at a time. Stopped half-way (a crash), the start-up repair
        # remembers the rest, as it does for live replies.
        self._in_batches(path, "memories", self.batch, """
            INSERT OR IGNORE INTO memories (user_id, companion_id, conversation_id, reply_id, kind,
                text, asked, source, created_at, updated_at)
            SELECT ?, ?, s.conversation_id, m.id, 'exchange', s.text, s.asked, 'imported',
                   s.created_at, ?
            FROM staged.memories s JOIN messages m
              ON m.conversation_id = s.conversation_id AND m.chain = s.reply_chain
            WHERE s.rowid BETWEEN ? AND ?""", (self.user, companion_id, time.time()))

    def _in_batches(self, path: Path, table: str, size: int, sql: str, params: tuple) -> None:
        """Run `sql` (ending in `rowid BETWEEN ? AND ?`) over the staged table, `size` rows per
        transaction."""
        with sqlite3.connect(path) as staged:
            last = staged.execute(f"SELECT MAX(rowid) FROM {table}").fetchone()[0] or 0
        for first in range(1, last + 1, size):
            started = time.perf_counter()
            with self.db.attached(path, "staged") as conn:
                conn.execute(sql, (*params, first, first + size - 1))
            self.holds.append(time.perf_counter() - started)
            # A lock is no queue: released and taken straight back, it would keep a waiting
            # reply's commit out for batch after batch. This moment lets it in first.
            time.sleep(HANDOFF_S)
