"""A large write of history that never holds the database long: what a chat-export import and
a bundle bring is read into a staging SQLite file of its own first, then copied in by batches
of short transactions under an owner nobody has (HIDDEN and a random suffix: no user name
starts with "~", so no query of anyone's sees the rows), then given to its member in one short
transaction. A failure before that deletes the hidden rows; a crash leaves them to
`remove_leftovers` at the next start.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path

from store.db import Database

HIDDEN = "~import-"
# Rows copied per transaction: each holds the database for tens of milliseconds (a 60,000
# conversation import held it for 4.7 s in one transaction; bench/import_commit.py).
COPY_BATCH = 2000
# A lock is no queue: released and taken straight back, it would keep a waiting reply's commit
# out for batch after batch. This moment between batches lets it in first.
HANDOFF_S = 0.005

# The staging file of a chat-export import (memory/importer.py fills it).
IMPORT_STAGING = """
CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT, origin TEXT, original_id TEXT,
    created_at REAL, updated_at REAL, new INTEGER, expect_chain TEXT,
    members TEXT);  -- a group chat: JSON of its companions' keys, the importing one first
CREATE TABLE messages (conversation_id TEXT, role TEXT, content TEXT, created_at REAL, chain TEXT,
    new INTEGER,    -- of a new conversation (else it extends a stored one)
    speaker TEXT);  -- a group chat's reply: its companion's key
CREATE TABLE memories (conversation_id TEXT, reply_chain TEXT, text TEXT, asked TEXT, created_at REAL,
    companion_id TEXT);  -- a group chat's: each member's own (else the importing companion's)
"""


def hidden_owner() -> str:
    return f"{HIDDEN}{uuid.uuid4().hex}"


def drop_hidden(db: Database, owner: str) -> None:
    """Delete what a write under `owner` copied before it failed (messages go with their
    conversations)."""
    with db.transaction() as conn:
        conn.execute("DELETE FROM conversations WHERE user_id = ?", (owner,))


def remove_leftovers(run_dir: Path, db: Database | None = None) -> int:
    """Delete staging files, uploads and hidden rows that an interrupted import left (hold the
    data lock); returns how many files and conversations."""
    leftovers = [*run_dir.glob("import-*.db*"), *(run_dir / "uploads").glob("*")]
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    if db is None:
        return len(leftovers)
    with db.transaction() as conn:
        rows = conn.execute("DELETE FROM conversations WHERE user_id LIKE ?", (HIDDEN + "%",)).rowcount
    return len(leftovers) + rows


class ExportStaging:
    """A chat export's staging file (IMPORT_STAGING), filled in one transaction of its own (no
    journal: a file cut short is deleted whole)."""

    def __init__(self, path: Path):
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + IMPORT_STAGING)
        self.conn.execute("BEGIN")

    def add(self, conversation: tuple, messages: list[tuple], memories: list[tuple]) -> None:
        """A conversation (id, title, origin, original_id, created_at, updated_at, new,
        expect_chain, members) with its messages (conversation_id, role, content, created_at, chain,
        new, speaker) and memories (conversation_id, reply_chain, text, asked, created_at,
        companion_id)."""
        self.conn.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", conversation)
        self.conn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)", messages)
        self.conn.executemany("INSERT INTO memories VALUES (?, ?, ?, ?, ?, ?)", memories)

    def finish(self) -> None:
        # What extends stored conversations is found at once in the short final transaction.
        self.conn.execute("CREATE INDEX extending_messages ON messages(new) WHERE NOT new")
        self.conn.execute("CREATE INDEX extended_conversations ON conversations(new) WHERE NOT new")
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


class ExportCommit:
    """A chat export's staging file (IMPORT_STAGING) copied into the database for `user`."""

    def __init__(self, db: Database, path: Path, user: str, batch: int = COPY_BATCH):
        self.db, self.path, self.user, self.batch = db, path, user, batch
        self.holds: list[float] = []   # seconds each write transaction held the database

    def run(self, companion_id: str, changed_meanwhile: type[Exception], label: str) -> None:
        """New conversations and their messages a batch at a time, hidden; then one short
        transaction that checks nothing changed meanwhile (else `changed_meanwhile`, and nothing
        stays), hands them over and extends the stored ones; then the memories a batch at a time
        (stopped half-way, the start-up repair remembers the rest, as for live replies)."""
        hidden = hidden_owner()
        try:
            self._in_batches("conversations", """
                INSERT INTO conversations (id, user_id, companion_id, title, source, origin,
                    original_id, created_at, updated_at, reply_order)
                SELECT id, ?, ?, title, 'imported', origin, original_id, created_at, updated_at,
                    CASE WHEN members IS NULL THEN NULL ELSE 'natural' END
                FROM staged.conversations WHERE new AND rowid BETWEEN ? AND ? ORDER BY rowid""",
                             (hidden, companion_id))
            self._in_batches("conversations", """
                INSERT INTO conversation_members (conversation_id, companion_id, position)
                SELECT s.id, j.value, j.key FROM staged.conversations s, json_each(s.members) j
                WHERE s.new AND s.members IS NOT NULL AND s.rowid BETWEEN ? AND ?""", ())
            self._in_batches("messages", """
                INSERT INTO messages (conversation_id, role, content, created_at, chain, speaker)
                SELECT conversation_id, role, content, created_at, chain, speaker FROM staged.messages
                WHERE new AND rowid BETWEEN ? AND ? ORDER BY rowid""", ())
            started = time.perf_counter()
            with self.db.attached(self.path, "staged") as conn:
                changed = conn.execute(
                    """SELECT COUNT(*) FROM staged.conversations s WHERE NOT s.new AND s.expect_chain
                       IS NOT (SELECT chain FROM messages WHERE conversation_id = s.id
                               ORDER BY id DESC LIMIT 1)""").fetchone()[0]
                if changed:
                    raise changed_meanwhile(label, f"{changed} conversation(s) changed while the "
                                                   "export was being read; nothing was imported; run "
                                                   "the import again")
                conn.execute("UPDATE conversations SET user_id = ? WHERE user_id = ?", (self.user, hidden))
                conn.execute(
                    """UPDATE conversations SET updated_at = MAX(updated_at, (SELECT updated_at FROM
                           staged.conversations s WHERE s.id = conversations.id))
                       WHERE id IN (SELECT id FROM staged.conversations WHERE NOT new)""")
                conn.execute(
                    """INSERT INTO messages (conversation_id, role, content, created_at, chain, speaker)
                       SELECT conversation_id, role, content, created_at, chain, speaker FROM staged.messages
                       WHERE NOT new ORDER BY rowid""")
            self.holds.append(time.perf_counter() - started)
        except BaseException:
            drop_hidden(self.db, hidden)
            raise
        self._in_batches("memories", """
            INSERT OR IGNORE INTO memories (user_id, companion_id, conversation_id, reply_id, kind,
                text, asked, source, created_at, updated_at)
            SELECT ?, COALESCE(s.companion_id, ?), s.conversation_id, m.id, 'exchange', s.text, s.asked,
                   'imported', s.created_at, ?
            FROM staged.memories s JOIN messages m
              ON m.conversation_id = s.conversation_id AND m.chain = s.reply_chain
            WHERE s.rowid BETWEEN ? AND ?""", (self.user, companion_id, time.time()))

    def _in_batches(self, table: str, sql: str, params: tuple) -> None:
        """Run `sql` (ending in `rowid BETWEEN ? AND ?`) over the staged table, `batch` rows per
        transaction."""
        with sqlite3.connect(self.path) as staged:
            last = staged.execute(f"SELECT MAX(rowid) FROM {table}").fetchone()[0] or 0
        for first in range(1, last + 1, self.batch):
            started = time.perf_counter()
            with self.db.attached(self.path, "staged") as conn:
                conn.execute(sql, (*params, first, first + self.batch - 1))
            self.holds.append(time.perf_counter() - started)
            time.sleep(HANDOFF_S)
