"""A companion bundle's rows (serve/bundle.py is the file format): what an export reads of one
member's companion, the staged SQLite file a bundle is checked into record by record, and the
import's write of it: the history in batches of short transactions under a hidden owner, handed
to its member in one short transaction (store/staging.py), then the memories in batches.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from store.companions import CompanionStore, visible_id
from store.db import Database, Progress
from store.groups import MAX_MEMBERS, ReplyOrder
from store.history import ReplyMeta, chain_root, chains, group_root
from store.staging import COPY_BATCH, HANDOFF_S, hidden_owner
from store.summaries import Summaries


class BundleError(ValueError):
    """A bundle that cannot be imported; the message names the file and the member."""


class BundleConflict(BundleError):
    """The bundle's companion id is another companion's here."""


# -- the records of history.jsonl and memories.jsonl -------------------------------------------

class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class MessageRecord(ReplyMeta):   # what the engine reported about a reply, as history keeps it
    model_config = ConfigDict(extra="ignore")

    id: int
    role: str
    content: str
    created_at: float
    forgotten: bool = False        # its memory was deleted: it is not remembered again


class SummaryRecord(_Record):   # a running summary (store/summaries.py) of the messages up to `through`
    through: int
    text: str = Field(min_length=1)
    edited: bool = False
    created_at: float
    updated_at: float


class ConversationRecord(_Record):
    id: str
    title: str | None = None
    source: str = "live"
    origin: str | None = None
    original_id: str | None = None
    created_at: float
    updated_at: float
    messages: list[MessageRecord]
    summaries: list[SummaryRecord] = []
    # A group chat: its companions' ids (the bundle's own first), its reply order, its saved group;
    # each message's `speaker` is one of the companions.
    companions: list[str] | None = Field(None, min_length=2, max_length=MAX_MEMBERS)
    reply_order: ReplyOrder | None = None   # a group chat's; natural if it says none
    group: str | None = None


class MemoryRecord(_Record):
    id: int
    kind: Literal["exchange", "fact"]
    text: str
    asked: str | None = None
    source: str
    pinned: bool = False
    created_at: float
    updated_at: float
    conversation_id: str | None = None
    reply_id: int | None = None


def _check_roles(conv: ConversationRecord) -> None:
    for m in conv.messages:
        if m.role not in ("user", "assistant"):
            raise ValueError(f"message {m.id}: role {m.role!r} is neither 'user' nor 'assistant'")
        if m.speaker is not None and m.speaker not in (conv.companions or ()):
            raise ValueError(f"message {m.id}: its speaker {m.speaker!r} is not one of the conversation's "
                             "companions")


# A bundle's history and memories, checked record by record into a SQLite file of their own
# (bounded memory, whatever the bundle's size); import_bundle fills the last columns with where
# each went here.
STAGED = """
CREATE TABLE conversations (n INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, title TEXT, source TEXT,
    origin TEXT, original_id TEXT, created_at REAL, updated_at REAL, messages INTEGER,
    companions TEXT, reply_order TEXT, grp TEXT,   -- a group chat's (JSON of its companions' ids)
    -- its conversation here; new to it, or how many messages it had and the last one's chain
    target TEXT, new INTEGER, stored INTEGER, expect TEXT);
CREATE TABLE messages (n INTEGER PRIMARY KEY, conversation INTEGER NOT NULL, id INTEGER NOT NULL UNIQUE,
    role TEXT, content TEXT, created_at REAL, tokens INTEGER, prompt_tokens INTEGER, model TEXT,
    adapter TEXT, sampling TEXT, finish_reason TEXT, truncated INTEGER, forgotten INTEGER,
    memories_used TEXT, stored INTEGER, speaker TEXT);
CREATE INDEX messages_of ON messages(conversation, n);
CREATE TABLE memories (n INTEGER PRIMARY KEY, id INTEGER NOT NULL UNIQUE, kind TEXT, text TEXT, asked TEXT,
    source TEXT, pinned INTEGER, created_at REAL, updated_at REAL, conversation_id TEXT, reply_id INTEGER,
    stored INTEGER);
CREATE TABLE summaries (conversation INTEGER NOT NULL, through INTEGER NOT NULL, text TEXT, edited INTEGER,
    created_at REAL, updated_at REAL);
CREATE TABLE picture (data BLOB);
"""


def stage_conversation(conn: sqlite3.Connection, line: bytes) -> None:
    """One line of history.jsonl, checked, into the staged file (ValueError: why not)."""
    conv = ConversationRecord.model_validate_json(line.decode("utf-8"))
    _check_roles(conv)
    if conn.execute("SELECT 1 FROM conversations WHERE id = ?", (conv.id,)).fetchone():
        raise ValueError(f"conversation {conv.id!r} is in the history twice")
    group = ((json.dumps(conv.companions), conv.reply_order or "natural", conv.group) if conv.companions
             else (None,) * 3)
    n = conn.execute("INSERT INTO conversations (id, title, source, origin, original_id, created_at, "
                     "updated_at, messages, companions, reply_order, grp) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (conv.id, conv.title, conv.source, conv.origin, conv.original_id, conv.created_at,
                      conv.updated_at, len(conv.messages), *group)).lastrowid
    for m in conv.messages:
        if conn.execute("SELECT 1 FROM messages WHERE id = ?", (m.id,)).fetchone():
            raise ValueError(f"message {m.id} is in the history twice")
        conn.execute(
            "INSERT INTO messages (conversation, id, role, content, created_at, tokens, prompt_tokens, "
            "model, adapter, sampling, finish_reason, truncated, forgotten, memories_used, speaker) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (n, m.id, m.role, m.content, m.created_at, m.tokens, m.prompt_tokens, m.model, m.adapter,
             json.dumps(m.sampling) if m.sampling is not None else None, m.finish_reason, int(m.truncated),
             int(m.forgotten), json.dumps(m.memories_used) if m.memories_used is not None else None,
             m.speaker))
    said = {m.id for m in conv.messages}
    for summary in conv.summaries:
        if summary.through not in said:
            raise ValueError(f"summaries: message {summary.through} is not one of this conversation's")
        conn.execute("INSERT INTO summaries VALUES (?, ?, ?, ?, ?, ?)", (n, summary.through, summary.text,
                     int(summary.edited), summary.created_at, summary.updated_at))


def stage_memory(conn: sqlite3.Connection, line: bytes) -> None:
    """One line of memories.jsonl, checked, into the staged file (ValueError: why not)."""
    memory = MemoryRecord.model_validate_json(line.decode("utf-8"))
    if conn.execute("SELECT 1 FROM memories WHERE id = ?", (memory.id,)).fetchone():
        raise ValueError(f"memory {memory.id} is in the file twice")
    conn.execute("INSERT INTO memories (id, kind, text, asked, source, pinned, created_at, updated_at, "
                 "conversation_id, reply_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (memory.id, memory.kind, memory.text, memory.asked, memory.source, int(memory.pinned),
                  memory.created_at, memory.updated_at, memory.conversation_id, memory.reply_id))


def open_staged(path: Path) -> sqlite3.Connection:
    """A connection to a bundle's staged file (autocommit: BEGIN and COMMIT are explicit)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def create_staged(conn: sqlite3.Connection) -> None:
    """The staged file's tables (a new file, written once: no journal)."""
    conn.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + STAGED)


@contextmanager
def staging(conn: sqlite3.Connection) -> Iterator[None]:
    """The staged file's one transaction: every record of the bundle is written in it."""
    conn.execute("BEGIN")
    yield
    conn.execute("COMMIT")


def stage_picture(conn: sqlite3.Connection, picture: bytes) -> None:
    conn.execute("INSERT INTO picture VALUES (?)", (picture,))


def staged_picture(conn: sqlite3.Connection) -> bytes | None:
    row = conn.execute("SELECT data FROM picture").fetchone()
    return row[0] if row else None


def staged_conversations(conn: sqlite3.Connection) -> list[ConversationRecord]:
    """The staged history as records (for a look at a small bundle: it is all read into memory)."""
    return [ConversationRecord.model_validate(dict(c) | {
        "companions": json.loads(c["companions"]) if c["companions"] else None, "group": c["grp"],
        "messages": [
        dict(m) | {"sampling": json.loads(m["sampling"]) if m["sampling"] else None,
                   "memories_used": json.loads(m["memories_used"]) if m["memories_used"] else None}
        for m in conn.execute("SELECT * FROM messages WHERE conversation = ? ORDER BY n", (c["n"],))]})
        for c in conn.execute("SELECT * FROM conversations ORDER BY n")]


@dataclass
class ImportReport:
    companion: str
    created: bool = False                  # a new companion (else one it matched was added to)
    conversations_added: int = 0
    conversations_extended: int = 0
    conversations_unchanged: int = 0
    messages_added: int = 0
    memories_added: int = 0
    adapters_added: list[str] = field(default_factory=list)
    adapters_known: list[str] = field(default_factory=list)   # already here (same weights)
    adapters_refused: str | None = None    # why the bundle's adapters were not brought in
    adapter_in_use: str | None = None      # the version to speak through (the bundle's, here)
    card_kept: str | None = None           # a config-file companion: its card stays; how the bundle differs
    message: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


class BundleRows:
    """One member's rows with one companion, as a bundle carries them: read by an export,
    written by an import; the only way a bundle reaches them."""

    def __init__(self, db: Database, key: str, user: str):
        self.db, self.key, self.user = db, key, user

    def conversations(self) -> list[dict]:
        """Every conversation with its messages, as history.jsonl carries them."""
        found = []
        for c in self.db.query("SELECT id, title, source, origin, original_id, created_at, updated_at, "
                               "reply_order, group_id FROM conversations WHERE companion_id = ? AND "
                               "user_id = ? ORDER BY created_at, id", (self.key, self.user)):
            group = {}
            if c["reply_order"]:   # a group chat it began: with the ids of its companions
                group = {"reply_order": c["reply_order"], "group": c["group_id"], "companions": [
                    visible_id(r[0]) for r in self.db.query("SELECT companion_id FROM conversation_members "
                                                            "WHERE conversation_id = ? ORDER BY position",
                                                            (c["id"],))]}
            messages = []
            for m in self.db.query("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id",
                                   (c["id"],)):
                messages.append({
                    "id": m["id"], "role": m["role"], "content": m["content"], "created_at": m["created_at"],
                    "tokens": m["tokens"], "prompt_tokens": m["prompt_tokens"], "model": m["model"],
                    "adapter": m["adapter"], "sampling": json.loads(m["sampling"]) if m["sampling"] else None,
                    "finish_reason": m["finish_reason"], "truncated": bool(m["truncated"]),
                    "memories_used": json.loads(m["memories"]) if m["memories"] else None,
                    "forgotten": bool(m["forgotten"]),
                    "speaker": visible_id(m["speaker"]) if m["speaker"] else None})
            summaries = [dict(s) | {"edited": bool(s["edited"])} for s in self.db.query(
                "SELECT through_id AS through, text, edited, created_at, updated_at FROM summaries "
                "WHERE conversation_id = ? ORDER BY id", (c["id"],))]
            found.append({k: c[k] for k in ("id", "title", "source", "origin", "original_id", "created_at",
                                            "updated_at")}
                         | group | {"messages": messages, "summaries": summaries})
        return found

    def memories(self) -> list[dict]:
        """Every memory, as memories.jsonl carries them (no vectors: they are rebuilt)."""
        rows = self.db.query("SELECT id, kind, text, asked, source, pinned, created_at, updated_at, "
                             "conversation_id, reply_id FROM memories WHERE companion_id = ? AND user_id = ? "
                             "ORDER BY id", (self.key, self.user))
        return [dict(r) | {"pinned": bool(r["pinned"])} for r in rows]

    def write(self, staged: sqlite3.Connection, report: ImportReport, batch: int = COPY_BATCH,
              progress: Progress | None = None, new_companion: bool = False) -> None:
        """The staged history, then the memories, as this member's (see _Writer). If the history
        fails, nothing of it stays, nor the companion when the import made it (new_companion)."""
        writer = _Writer(self.db, staged, self.key, self.user, report, batch, progress)
        try:
            writer.history()
        except BaseException:
            with self.db.transaction() as conn:
                conn.execute("DELETE FROM conversations WHERE user_id = ?", (writer.hidden,))
                if new_companion:
                    conn.execute("DELETE FROM companions WHERE id = ?", (self.key,))
            raise
        writer.summaries()
        writer.memories()


IN = "IN (SELECT value FROM json_each(?))"   # a list of values, passed as one JSON parameter


class _Writer:
    """The staged history and memories of a bundle written as `user`'s, `batch` rows per
    transaction, with a moment between transactions for the other members' writes.

    Each batch is a handful of statements, whatever its size: a statement gives up the
    interpreter lock, and a server thread that is streaming tokens may keep it for a switch
    interval (5 ms) before it comes back, so row-at-a-time statements would take minutes."""

    def __init__(self, db: Database, staged: sqlite3.Connection, key: str, user: str, report: ImportReport,
                 batch: int, progress: Progress | None):
        self.db, self.staged, self.key, self.user = db, staged, key, user
        self.report, self.batch, self.progress = report, batch, progress
        self.hidden = hidden_owner()   # the owner of what is not handed over yet
        self.root = chain_root(visible_id(key))
        self.origins: list[tuple[str, str]] = []      # found by an id older Homefires derived
        self.members: dict[str, str] = {}             # group chats' companions: id in the bundle -> key
        self.total = staged.execute("SELECT (SELECT COUNT(*) FROM messages) + (SELECT COUNT(*) FROM memories)"
                                    ).fetchone()[0]
        self.done = 0

    def _step(self, rows: int) -> None:
        self.done += rows
        if self.progress:
            self.progress(self.done, self.total)
        # A lock is no queue: released and taken straight back, it would keep a waiting reply's
        # commit out for batch after batch. This moment lets it in first.
        time.sleep(HANDOFF_S)

    def _batches(self, sql: str, weight: Callable[[sqlite3.Row], int] = lambda _: 1) -> Iterator[list]:
        """The rows of `sql` (which ends in `n > ? ORDER BY n LIMIT ?`) in lists of about `batch`
        by `weight`, at least one row each; each list is read when the one before is written."""
        after = 0
        while rows := self.staged.execute(sql, (after, self.batch)).fetchall():
            taken, load = [], 0
            for row in rows:
                taken.append(row)
                load += weight(row)
                if load >= self.batch:
                    break
            yield taken
            after = taken[-1]["n"]

    def _stage(self, table: str, columns: str, values: list[tuple]) -> None:
        self.staged.execute("BEGIN")
        self.staged.executemany(f"UPDATE {table} SET {columns} WHERE n = ?", values)
        self.staged.execute("COMMIT")

    # -- history -------------------------------------------------------------------------------

    def history(self) -> None:
        """Where each conversation goes is found in this user's own records (bundle_origins),
        never from its id alone: a conversation already here is continued only if it is this
        user's, with this companion, and what it holds begins like the bundle's (an older
        bundle adds nothing; a diverged one is kept beside it as a fork). A new one keeps the
        bundle's id where that is one of ours and free, and gets a new id otherwise."""
        self.members = self._group_members()
        for convs in self._batches("SELECT n, id, title, source, origin, original_id, created_at, "
                                   "updated_at, messages, companions, reply_order, grp FROM conversations "
                                   "WHERE n > ? ORDER BY n LIMIT ?", lambda c: c["messages"] or 1):
            said = {c["n"]: [] for c in convs}
            for m in self.staged.execute(
                    "SELECT n, conversation, role, content, created_at, tokens, prompt_tokens, model, "
                    "adapter, sampling, finish_reason, truncated, forgotten, speaker FROM messages "
                    "WHERE conversation BETWEEN ? AND ? ORDER BY n", (convs[0]["n"], convs[-1]["n"])):
                said[m["conversation"]].append(m)
            placed = self._place(convs, said)
            new = [(conv, target, origin) for conv, (target, origin, _) in zip(convs, placed, strict=True)
                   if origin is not None]
            rows, ns = self._messages([(target, self._root(conv, target), said[conv["n"]])
                                       for conv, target, _ in new])
            with self.db.transaction() as conn:
                conn.executemany("INSERT INTO conversations (id, companion_id, title, source, origin, "
                                 "original_id, created_at, updated_at, user_id, reply_order, group_id) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 [(target, self.key, conv["title"], conv["source"], conv["origin"],
                                   conv["original_id"], conv["created_at"], conv["updated_at"], self.hidden,
                                   conv["reply_order"], conv["grp"]) for conv, target, _ in new])
                conn.executemany("INSERT INTO conversation_members (conversation_id, companion_id, position) "
                                 "VALUES (?, ?, ?)",
                                 [(target, self.members[i], position) for conv, target, _ in new
                                  if conv["companions"]
                                  for position, i in enumerate(json.loads(conv["companions"]))])
                conn.executemany("INSERT INTO bundle_origins (user_id, companion_id, origin_id, "
                                 "conversation_id) VALUES (?, ?, ?, ?)",
                                 [(self.hidden, self.key, origin, target) for _, target, origin in new])
                first = _insert(conn, "messages", MESSAGE_INSERT, rows)
            stored_ids = list(zip(itertools.count(first), ns, strict=False))
            for conv, (_, origin, stored) in zip(convs, placed, strict=True):
                if origin is None:   # the messages it has here already
                    stored_ids += [(s["id"], m["n"]) for m, s in zip(said[conv["n"]], stored, strict=False)]
            self._stage("messages", "stored = ?", stored_ids)
            self._stage("conversations", "target = ?, new = ?, stored = ?, expect = ?",
                        [(target, origin is not None, len(stored), stored[-1]["chain"] if stored else None,
                          conv["n"]) for conv, (target, origin, stored) in zip(convs, placed, strict=True)])
            self._step(sum(c["messages"] for c in convs))
        self._hand_over()

    def _place(self, convs: list[sqlite3.Row], said: dict[int, list[sqlite3.Row]]
               ) -> list[tuple[str, str | None, list[sqlite3.Row]]]:
        """For each conversation: (its conversation here, its origin id if that is new, the
        messages stored there)."""
        ids = [c["id"] for c in convs]
        origins = dict(self.db.query(f"SELECT origin_id, conversation_id FROM bundle_origins WHERE "
                                     f"user_id = ? AND companion_id = ? AND origin_id {IN}",
                                     (self.user, self.key, json.dumps(ids))))
        # A bundle made here, coming home: a conversation of its id (or of an id older Homefires
        # derived from it) that is this user's, with this companion.
        candidates = {i: [i, *(hashlib.sha256(text.encode()).hexdigest()[:32]
                               for text in (f"bundle\0{i}", f"{i}\0{self.user}\0{self.key}"))]
                      for i in ids if i not in origins}
        mine = {row[0] for row in self.db.query(
            f"SELECT id FROM conversations WHERE user_id = ? AND companion_id = ? AND id {IN}",
            (self.user, self.key, json.dumps([c for cs in candidates.values() for c in cs])))}
        for i, cs in candidates.items():
            if found := next((c for c in cs if c in mine), None):
                origins[i] = found
                self.origins.append((i, found))
        stored = self._stored(set(origins.values()))
        taken = {row[0] for row in self.db.query(f"SELECT id FROM conversations WHERE id {IN}",
                                                 (json.dumps(ids),))}
        placed = []
        for conv in convs:
            bundled = [(m["role"], m["content"]) for m in said[conv["n"]]]
            origin, target = conv["id"], origins.get(conv["id"])
            here = stored.get(target, [])
            # The conversation, then each fork of it kept beside it, until one this bundle's
            # version begins like (or none is left: then it is new).
            for fork in itertools.count(1):
                common = min(len(here), len(bundled))
                if target is None or [(s["role"], s["content"]) for s in here[:common]] == bundled[:common]:
                    break
                origin = f"{conv['id']}\0{fork}"
                found = self.db.query("SELECT conversation_id FROM bundle_origins WHERE user_id = ? AND "
                                      "companion_id = ? AND origin_id = ?", (self.user, self.key, origin))
                target = found[0][0] if found else None
                here = self._stored({target}).get(target, []) if target else []
            if target is not None:
                if len(here) < len(bundled):
                    self.report.conversations_extended += 1
                else:
                    self.report.conversations_unchanged += 1
                placed.append((target, None, here))
            else:
                self.report.conversations_added += 1
                free = re.fullmatch(r"[0-9a-f]{32}", conv["id"]) and conv["id"] not in taken
                placed.append((conv["id"] if free else uuid.uuid4().hex, origin, []))
        return placed

    def _group_members(self) -> dict[str, str]:
        """{companion id in the bundle: its key here} for the group chats' companions; the bundle's
        own is this companion (whatever id it came in as). Each must be one of the user's
        companions here, else nothing is imported and the message says which are missing."""
        found, missing = {}, {}
        owns = [row[0] for row in self.staged.execute(
            "SELECT DISTINCT json_extract(companions, '$[0]') FROM conversations "
            "WHERE companions IS NOT NULL")]
        if not owns:
            return {}
        if len(owns) > 1:
            raise BundleError("history.jsonl: its group chats begin with different companions "
                              f"({', '.join(owns)}); a bundle's own companion comes first in each")
        found[owns[0]] = self.key
        store = CompanionStore(self.db)
        for n, ids in self.staged.execute("SELECT n, companions FROM conversations "
                                          "WHERE companions IS NOT NULL"):
            for i in json.loads(ids):
                if i not in found and i not in missing:
                    companion = store.get(i, self.user)
                    if companion is None:
                        missing[i] = n
                    else:
                        found[i] = companion.key
        if missing:
            raise BundleError(f"history.jsonl: {len(missing)} companion(s) of its group chats are not here: "
                              f"{', '.join(missing)}; create or import them first (nothing was imported)")
        return found

    def _root(self, conv: sqlite3.Row, target: str) -> str:
        """Where a conversation's chain begins here (a group chat's: store/history.py)."""
        if conv["companions"] is None:
            return self.root
        return group_root(conv["grp"] or conv["original_id"] or target)

    def _stored(self, targets: set[str]) -> dict[str, list[sqlite3.Row]]:
        found: dict[str, list[sqlite3.Row]] = {t: [] for t in targets}
        for row in self.db.query(f"SELECT conversation_id, id, role, content, chain FROM messages WHERE "
                                 f"conversation_id {IN} ORDER BY conversation_id, id",
                                 (json.dumps(list(targets)),)):
            found[row["conversation_id"]].append(row)
        return found

    def _messages(self, said: list[tuple[str, str, list[sqlite3.Row]]]) -> tuple[list[tuple], list[int]]:
        """The rows that write each (conversation here, chain so far, messages), chained on; and
        the staged n of each."""
        rows, ns = [], []
        for target, previous, messages in said:
            for m, chain in zip(messages, chains(previous, [(m["role"], m["content"]) for m in messages]),
                                strict=True):
                rows.append((target, m["role"], m["content"], m["created_at"], m["tokens"],
                             m["prompt_tokens"], m["model"], m["adapter"], m["sampling"], m["finish_reason"],
                             m["truncated"], chain, m["forgotten"],
                             self.members.get(m["speaker"]) if m["speaker"] else None))
                ns.append(m["n"])
        self.report.messages_added += len(rows)
        return rows, ns

    def _hand_over(self) -> None:
        """One short transaction: what continues stored conversations, after the check that they
        did not change meanwhile, and the new conversations handed to their user."""
        extended = self.staged.execute("SELECT n, target, stored, expect, updated_at FROM conversations "
                                       "WHERE NOT new AND stored < messages").fetchall()
        rows, ns = self._messages([(c["target"], c["expect"] or self.root, self.staged.execute(
            "SELECT * FROM messages WHERE conversation = ? ORDER BY n LIMIT -1 OFFSET ?",
            (c["n"], c["stored"])).fetchall()) for c in extended])
        with self.db.transaction() as conn:
            last = dict(conn.execute(
                f"SELECT conversation_id, chain FROM messages WHERE id IN (SELECT MAX(id) FROM messages "
                f"WHERE conversation_id {IN} GROUP BY conversation_id)",
                (json.dumps([c["target"] for c in extended]),)).fetchall())
            if any(last.get(c["target"]) != c["expect"] for c in extended):
                raise BundleError("a conversation the bundle continues changed while it was being "
                                  "imported; nothing was imported; import the bundle again")
            first = _insert(conn, "messages", MESSAGE_INSERT, rows)
            conn.executemany("UPDATE conversations SET updated_at = MAX(updated_at, ?) WHERE id = ?",
                             [(c["updated_at"], c["target"]) for c in extended])
            conn.execute("UPDATE conversations SET user_id = ? WHERE user_id = ?", (self.user, self.hidden))
            conn.execute("UPDATE bundle_origins SET user_id = ? WHERE user_id = ?", (self.user, self.hidden))
            conn.executemany("INSERT OR IGNORE INTO bundle_origins (user_id, companion_id, origin_id, "
                             "conversation_id) VALUES (?, ?, ?, ?)",
                             [(self.user, self.key, origin, target) for origin, target in self.origins])
        self._stage("messages", "stored = ?", list(zip(itertools.count(first), ns, strict=False)))

    # -- summaries -----------------------------------------------------------------------------

    def summaries(self) -> None:
        """The conversations' running summaries, keyed by the messages they cover as stored here
        (one a conversation here has already is kept as it is: it may have been edited since)."""
        rows = self.staged.execute("SELECT s.*, c.target FROM summaries s JOIN conversations c ON "
                                   "c.n = s.conversation ORDER BY s.rowid").fetchall()
        keep = Summaries(self.db, self.user)
        for s in rows:
            said = self.staged.execute("SELECT role, content, stored FROM messages WHERE conversation = ? "
                                       "AND n <= (SELECT n FROM messages WHERE id = ?) ORDER BY n",
                                       (s["conversation"], s["through"])).fetchall()
            keep.add(s["target"], self.key, [(m["role"], m["content"]) for m in said], said[-1]["stored"],
                     s["text"], edited=bool(s["edited"]), when=(s["created_at"], s["updated_at"]),
                     replace=False)

    # -- memories ------------------------------------------------------------------------------

    def memories(self) -> None:
        """The memories, in their order there (so near-ties rank as they did), then which
        memories each reply's prompt showed, under their ids here."""
        for memories in self._batches(
                """SELECT s.n, s.kind, s.text, s.asked, s.source, s.pinned, s.created_at, s.updated_at,
                          s.reply_id, s.conversation_id, m.stored AS reply, c.target AS conversation
                   FROM memories s LEFT JOIN messages m ON m.id = s.reply_id
                   LEFT JOIN conversations c ON c.id = s.conversation_id
                   WHERE s.n > ? ORDER BY s.n LIMIT ?"""):
            known, new, same = self._known(memories)
            with self.db.transaction() as conn:
                first = _insert(conn, "memories", MEMORY_INSERT, [
                    (self.user, self.key, m["conversation"], m["reply"], m["kind"], m["text"], m["asked"],
                     m["source"], m["pinned"], m["created_at"], m["updated_at"]) for m in new])
            self.report.memories_added += len(new)
            known += [(first + i, m["n"]) for i, m in enumerate(new)]
            known += [(first + i, n) for n, i in same]
            self._stage("memories", "stored = ?", known)
            self._step(len(memories))
        for replies in self._batches("SELECT n, stored, memories_used FROM messages WHERE memories_used "
                                     "IS NOT NULL AND stored IS NOT NULL AND n > ? ORDER BY n LIMIT ?"):
            used = {r["stored"]: [u for u in json.loads(r["memories_used"])
                                  if isinstance(u, dict) and isinstance(u.get("id"), int)] for r in replies}
            asked = json.dumps([u["id"] for us in used.values() for u in us])
            ids = dict(self.staged.execute(
                f"SELECT id, stored FROM memories WHERE stored IS NOT NULL AND id {IN}", (asked,)).fetchall())
            with self.db.transaction() as conn:
                conn.executemany("UPDATE messages SET memories = ? WHERE id = ? AND memories IS NULL",
                                 [(json.dumps([u | {"id": ids[u["id"]]} for u in us if u["id"] in ids]),
                                   reply) for reply, us in used.items()])
            self._step(0)

    def _known(self, memories: list[sqlite3.Row]
               ) -> tuple[list[tuple[int, int]], list[sqlite3.Row], list[tuple[int, int]]]:
        """(stored id, staged n) of those here already; those to add; (staged n, index among those
        to add) of repeats within the batch. A memory whose reply or conversation is not in the
        bundle is none of them (skipped rather than orphaned), nor is one the user deleted here."""
        replies = json.dumps([m["reply"] for m in memories if m["reply"] is not None])
        forgotten = {row[0] for row in self.db.query(f"SELECT id FROM messages WHERE forgotten AND id {IN}",
                                                     (replies,))}
        here = {("reply", row[0]): row[1] for row in self.db.query(
            f"SELECT reply_id, id FROM memories WHERE reply_id {IN}", (replies,))}
        here |= {(row["kind"], row["text"], row["created_at"]): row["id"] for row in self.db.query(
            f"SELECT id, kind, text, created_at FROM memories WHERE user_id = ? AND companion_id = ? AND "
            f"reply_id IS NULL AND created_at {IN}",
            (self.user, self.key, json.dumps([m["created_at"] for m in memories if m["reply"] is None])))}
        known, new, same, adding = [], [], [], {}
        for m in memories:
            if (m["reply_id"] is not None and m["reply"] is None) or (m["conversation_id"] and
                                                                       m["conversation"] is None):
                continue
            if m["reply"] in forgotten:
                continue
            key = ("reply", m["reply"]) if m["reply"] is not None else (m["kind"], m["text"], m["created_at"])
            if key in here:
                known.append((here[key], m["n"]))
            elif key in adding:
                same.append((m["n"], adding[key]))
            else:
                adding[key] = len(new)
                new.append(m)
        return known, new, same


MESSAGE_INSERT = """INSERT INTO messages (conversation_id, role, content, created_at, tokens, prompt_tokens,
    model, adapter, sampling, finish_reason, truncated, chain, forgotten, speaker)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
MEMORY_INSERT = """INSERT INTO memories (user_id, companion_id, conversation_id, reply_id, kind, text, asked,
    source, pinned, created_at, updated_at, chunks) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)"""


def _insert(conn: sqlite3.Connection, table: str, sql: str, rows: list[tuple]) -> int:
    """Insert `rows` into an AUTOINCREMENT table inside a write transaction; returns the first
    one's id (the others follow it: no one else writes while the transaction holds the lock)."""
    def last() -> int:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
        return row[0] if row else 0

    first = last() + 1
    conn.executemany(sql, rows)
    if rows and last() != first + len(rows) - 1:
        raise RuntimeError(f"{table}: the new rows' ids are not consecutive; nothing was imported")
    return first
