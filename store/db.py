"""SQLite, the source of truth: one writing connection in WAL mode, a reading connection per
thread, and versioned schema migrations.

Reads outside a transaction go to the thread's own connection: in WAL mode a reader never
waits for a writer, so checking a key or reading history never queues behind a long write
(an import's commit). Reads inside a transaction use the writing connection, and see its
writes.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# What long work reports as it goes: (done, total), in its own units (rows, bytes, memories).
Progress = Callable[[int, int], None]

# Append only: each entry moves the schema one version up (PRAGMA user_version).
MIGRATIONS: list[str] = [
    """
    CREATE TABLE companions (
        id TEXT PRIMARY KEY,
        card TEXT NOT NULL,             -- the Companion, as JSON
        source TEXT NOT NULL,           -- config | api | card
        source_path TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        companion_id TEXT NOT NULL REFERENCES companions(id) ON DELETE CASCADE,
        title TEXT,
        source TEXT NOT NULL DEFAULT 'live',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX conversations_by_companion ON conversations(companion_id, updated_at);
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        created_at REAL NOT NULL,
        tokens INTEGER,                 -- content length in tokens (completion tokens of a reply)
        prompt_tokens INTEGER,          -- replies: the prompt the engine saw
        model TEXT,
        adapter TEXT,
        sampling TEXT,                  -- replies: JSON of the sampling parameters used
        finish_reason TEXT,
        truncated INTEGER NOT NULL DEFAULT 0,
        chain TEXT NOT NULL             -- hash of the conversation up to this message
    );
    CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
    CREATE INDEX messages_by_chain ON messages(chain);
    """,
    """
    CREATE TABLE memories (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        companion_id TEXT NOT NULL REFERENCES companions(id) ON DELETE CASCADE,
        conversation_id TEXT REFERENCES conversations(id) ON DELETE CASCADE,
        reply_id INTEGER UNIQUE REFERENCES messages(id) ON DELETE CASCADE,
        kind TEXT NOT NULL CHECK (kind IN ('exchange', 'fact')),
        text TEXT NOT NULL,
        asked TEXT,                     -- exchanges: the user's words, to skip what is in the prompt
        source TEXT NOT NULL,           -- live | imported | user
        pinned INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,       -- when it was said
        updated_at REAL NOT NULL,
        chunks INTEGER NOT NULL DEFAULT 0   -- vectors in the index; 0 = not indexed yet
    );
    CREATE INDEX memories_by_companion ON memories(companion_id, created_at);
    CREATE INDEX memories_to_index ON memories(chunks) WHERE chunks = 0;
    ALTER TABLE messages ADD COLUMN memories TEXT;   -- replies: JSON of the memories used
    ALTER TABLE messages ADD COLUMN forgotten INTEGER NOT NULL DEFAULT 0;  -- its memory was deleted
    """,
    """
    ALTER TABLE conversations ADD COLUMN origin TEXT;       -- imported: the export's format
    ALTER TABLE conversations ADD COLUMN original_id TEXT;  -- imported: the export's conversation id
    CREATE INDEX conversations_by_origin ON conversations(companion_id, origin, original_id)
        WHERE original_id IS NOT NULL;
    """,
    """
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        key_hash TEXT NOT NULL UNIQUE,  -- SHA-256 of the API key; the key itself is never stored
        admin INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        revoked_at REAL
    );
    ALTER TABLE companions ADD COLUMN owner TEXT;   -- NULL: shared with every user
    ALTER TABLE conversations ADD COLUMN user_id TEXT NOT NULL DEFAULT 'local';
    ALTER TABLE memories ADD COLUMN user_id TEXT NOT NULL DEFAULT 'local';
    CREATE INDEX conversations_by_user ON conversations(user_id, companion_id, updated_at);
    CREATE INDEX memories_by_user ON memories(user_id, companion_id, created_at);
    """,
    # A user's own companions move into the user's namespace: stored as OWNER.ID.
    """
    PRAGMA defer_foreign_keys = ON;
    UPDATE conversations SET companion_id = (SELECT owner || '.' || id FROM companions
                                             WHERE companions.id = conversations.companion_id)
        WHERE companion_id IN (SELECT id FROM companions WHERE owner IS NOT NULL);
    UPDATE memories SET companion_id = (SELECT owner || '.' || id FROM companions
                                        WHERE companions.id = memories.companion_id)
        WHERE companion_id IN (SELECT id FROM companions WHERE owner IS NOT NULL);
    UPDATE companions SET id = owner || '.' || id WHERE owner IS NOT NULL;
    """,
    # What companions call the user ({{user}}, memories); NULL: "User".
    """
    ALTER TABLE users ADD COLUMN display_name TEXT;
    """,
    # A conversation's memories by key: the start-up repair, each reply's remember and the
    # user's-words lookup scanned every memory of every user once per conversation without
    # it (bench/memory.py: 32.6 s against 0.03 s at 10,000 conversations, 4.9 s at 5,000).
    """
    CREATE INDEX memories_by_conversation ON memories(conversation_id, reply_id);
    """,
    # Memories gained a second vector (the user's own words): the next start embeds every
    # memory again, with a progress bar, replacing its old vectors.
    """
    UPDATE memories SET chunks = 0;
    """,
    # The server's fine-tuning jobs (serve/finetunes.py): one runs at a time, oldest first.
    """
    CREATE TABLE finetune_jobs (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,        -- who asked; whose history it learns from
        companion_id TEXT NOT NULL,   -- the companion's key
        kind TEXT NOT NULL,           -- train | eval | drift | migrate
        state TEXT NOT NULL,          -- queued running evaluating done failed cancelled interrupted
        settings TEXT NOT NULL,       -- JSON: the fine-tuning settings it runs with
        switch TEXT NOT NULL,         -- auto | always | never
        until_message INTEGER NOT NULL,   -- the history it learns from ends at this message id
        version TEXT,                 -- the adapter version it writes (or evaluates)
        progress TEXT NOT NULL DEFAULT '{}',   -- JSON: the latest step, losses, speed
        result TEXT,                  -- JSON: metrics, voice report, whether it was switched to
        error TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        ended_at REAL
    );
    CREATE INDEX finetune_jobs_by_state ON finetune_jobs(state, created_at);
    CREATE INDEX finetune_jobs_by_user ON finetune_jobs(user_id, created_at);
    """,
    # Where each user's imported bundle conversations went (serve/bundle.py): an id from a
    # file never decides which conversation its messages join.
    """
    CREATE TABLE bundle_origins (
        user_id TEXT NOT NULL,
        companion_id TEXT NOT NULL,
        origin_id TEXT NOT NULL,       -- the conversation's id in the bundle (a fork: ID + NUL + n)
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        PRIMARY KEY (user_id, companion_id, origin_id)
    );
    CREATE INDEX bundle_origins_by_conversation ON bundle_origins(conversation_id);
    """,
    # Jobs that compare a voice with another setup (drift) or carry it to another base model
    # (migrate): what they compare with, or move to (serve/finetunes.py).
    """
    ALTER TABLE finetune_jobs ADD COLUMN target TEXT;   -- JSON: against, model, probes, max_new_tokens
    """,
    # Which embedder made the memory index, and the one a re-embedding is building
    # (memory/reembed.py); generation N's collections are named g{N}-u-..., 0's u-...
    """
    CREATE TABLE memory_index (
        generation INTEGER PRIMARY KEY,
        embedder TEXT NOT NULL,          -- its identity (memory/embedder.py: identity)
        setting TEXT,                    -- memory.embedder as it was set (NULL: the bundled one)
        state TEXT NOT NULL CHECK (state IN ('serving', 'building')),
        created_at REAL NOT NULL
    );
    """,
    # The lorebook entries a reply's prompt carried (serve/lore.py), named in its metadata.
    """
    ALTER TABLE messages ADD COLUMN lore TEXT;   -- replies: JSON [{entry, name, why, where}]
    """,
    # Running summaries of long conversations (store/summaries.py): what the turns that no
    # longer fit the context said, keyed by the chain of the messages they cover.
    """
    CREATE TABLE summaries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        through_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,  -- the last it covers
        turns INTEGER NOT NULL,         -- how many non-empty messages, from the first, it covers
        chain TEXT NOT NULL,            -- their chain: a history that begins with them can use it
        text TEXT NOT NULL,
        edited INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX summaries_by_chain ON summaries(chain);
    CREATE INDEX summaries_by_conversation ON summaries(conversation_id);
    """,
    # Group chats (store/groups.py): a conversation's member companions and its reply order, who
    # spoke each reply, and saved groups. A reply in a group is remembered by every member who
    # heard it, so a memory's key is its reply and its companion (the table is made again for it).
    """
    CREATE TABLE conversation_members (
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        companion_id TEXT NOT NULL REFERENCES companions(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        PRIMARY KEY (conversation_id, companion_id)
    );
    CREATE INDEX members_by_companion ON conversation_members(companion_id);
    ALTER TABLE conversations ADD COLUMN reply_order TEXT;  -- groups: manual | round_robin | natural
    ALTER TABLE conversations ADD COLUMN group_id TEXT;     -- groups: the saved group it began from
    ALTER TABLE messages ADD COLUMN speaker TEXT;           -- group replies: the companion's key
    CREATE TABLE groups (
        user_id TEXT NOT NULL,
        id TEXT NOT NULL,
        name TEXT NOT NULL,
        members TEXT NOT NULL,          -- JSON: the companions' keys, in order
        reply_order TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (user_id, id)
    );
    CREATE TABLE memories_new (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        companion_id TEXT NOT NULL REFERENCES companions(id) ON DELETE CASCADE,
        conversation_id TEXT REFERENCES conversations(id) ON DELETE CASCADE,
        reply_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
        kind TEXT NOT NULL CHECK (kind IN ('exchange', 'fact')),
        text TEXT NOT NULL,
        asked TEXT,
        source TEXT NOT NULL,
        pinned INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        chunks INTEGER NOT NULL DEFAULT 0,
        user_id TEXT NOT NULL DEFAULT 'local',
        UNIQUE (reply_id, companion_id)
    );
    INSERT INTO memories_new (id, companion_id, conversation_id, reply_id, kind, text, asked, source,
                              pinned, created_at, updated_at, chunks, user_id)
        SELECT id, companion_id, conversation_id, reply_id, kind, text, asked, source, pinned,
               created_at, updated_at, chunks, user_id FROM memories;
    -- A deleted memory's id is never given again (its vectors were keyed by it).
    CREATE TEMP TABLE memories_seq AS SELECT seq FROM sqlite_sequence WHERE name = 'memories';
    DROP TABLE memories;
    ALTER TABLE memories_new RENAME TO memories;
    INSERT INTO sqlite_sequence (name, seq) SELECT 'memories', 0
        WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'memories');
    UPDATE sqlite_sequence SET seq = MAX(COALESCE(seq, 0), COALESCE((SELECT seq FROM temp.memories_seq), 0))
        WHERE name = 'memories';
    DROP TABLE temp.memories_seq;
    CREATE INDEX memories_by_companion ON memories(companion_id, created_at);
    CREATE INDEX memories_to_index ON memories(chunks) WHERE chunks = 0;
    CREATE INDEX memories_by_user ON memories(user_id, companion_id, created_at);
    CREATE INDEX memories_by_conversation ON memories(conversation_id, reply_id);
    """,
]


def copy_database(source: Path, target: Path) -> tuple[str, dict]:
    """SQLite's online backup of `source` into `target` in one step: one read transaction, so
    the copy is the database at one moment (WAL: writers go on meanwhile); readable by its owner
    only. Returns the copy's integrity check ("ok") and its rows per table, with its schema."""
    src = sqlite3.connect(source, timeout=30)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
        check = dst.execute("PRAGMA integrity_check").fetchone()[0]
        counts = {table: dst.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                  for table in ("users", "companions", "conversations", "messages", "memories")}
        counts["schema"] = dst.execute("PRAGMA user_version").fetchone()[0]
    finally:
        src.close()
        dst.close()
    os.chmod(target, 0o600)
    return check, counts


def integrity(path: Path) -> str:
    """PRAGMA integrity_check of the database file at `path`: "ok", or what is wrong."""
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


class SchemaError(RuntimeError):
    """The database was written by a newer Homefire, or a migration failed."""


class EventLoopBlocked(RuntimeError):
    """A coroutine called SQLite directly: every other request would wait for it."""


class Database:
    """One writing SQLite connection shared by the process, serialised by a lock; a reading
    connection per thread."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.conn = self._connect()
        self.conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed reply survives power loss, not only a process crash.
        self.conn.execute("PRAGMA synchronous=FULL")
        self._migrate()
        self._local = threading.local()       # .reader, .writing (transaction depth)
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        # Set by a server once it serves: then SQLite on the event loop is an error (tests).
        self.forbid_event_loop = False

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    def _reader(self) -> sqlite3.Connection:
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = self._connect()
            reader.execute("PRAGMA query_only=ON")
            with self._readers_lock:
                self._readers.append(reader)
        return reader

    def _off_event_loop(self) -> None:
        if self.forbid_event_loop:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return
            raise EventLoopBlocked("SQLite was called on the event loop; run it in a worker thread")

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise SchemaError(
                f"{self.path} has schema version {version}, newer than this Homefire "
                f"understands ({len(MIGRATIONS)}); upgrade Homefire"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            # executescript commits first, so the version bump rides in the same script.
            self.conn.executescript(f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._off_event_loop()
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            self._local.writing = getattr(self._local, "writing", 0) + 1
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            finally:
                self._local.writing -= 1
            self.conn.execute("COMMIT")

    @contextmanager
    def attached(self, path: Path, name: str) -> Iterator[sqlite3.Connection]:
        """A transaction that can also read the database file at `path` as `name`."""
        with self._lock:
            self.conn.execute("ATTACH DATABASE ? AS " + name, (str(path),))
            try:
                with self.transaction() as conn:
                    yield conn
            finally:
                self.conn.execute(f"DETACH DATABASE {name}")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        self._off_event_loop()
        if getattr(self._local, "writing", 0):   # inside this thread's transaction: see its writes
            with self._lock:
                return self.conn.execute(sql, params).fetchall()
        return self._reader().execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self.conn.close()
        with self._readers_lock:
            for reader in self._readers:
                reader.close()
            self._readers.clear()
