"""Memories' rows in SQLite, the truth the vector index (memory/store.py) is built from.

`MemoryRows` is one user's view: every read and write of a member's memories names them in
SQL. What works for every user at once (indexing what is pending, the consistency check, the
start-up repair's search for what no memory holds yet) says so in its name.
"""

from __future__ import annotations

import json
import time
from typing import Literal

from pydantic import BaseModel

from store.companions import visible_id
from store.db import Database
from store.users import DEFAULT_USER_NAME, LOCAL

Kind = Literal["exchange", "fact"]
COLUMNS = ("id, companion_id, conversation_id, kind, text, source, pinned, created_at, updated_at, "
           "chunks, asked")


class Memory(BaseModel):
    id: int
    companion_id: str
    conversation_id: str | None
    kind: Kind
    text: str
    source: str
    pinned: bool
    created_at: float
    updated_at: float
    indexed: bool


def as_memory(row) -> Memory:
    data = {k: row[k] for k in ("id", "conversation_id", "kind", "text", "source", "created_at",
                                "updated_at")}
    data["companion_id"] = visible_id(row["companion_id"])
    return Memory(**data, pinned=bool(row["pinned"]), indexed=row["chunks"] > 0)


class MemoryRows:
    def __init__(self, db: Database, user: str = LOCAL):
        self.db = db
        self.user = user

    # -- writes ------------------------------------------------------------------------

    def add_exchange(self, companion_id: str, conversation_id: str, reply_id: int, asked: str | None,
                     text: str, created_at: float, source: str = "live") -> int:
        """A memory of messages ending with `reply_id` (one memory per ending message), owned by
        whoever owns the conversation; its id, or 0 if that message has one already."""
        with self.db.transaction() as conn:
            cur = conn.execute(
                """INSERT OR IGNORE INTO memories (user_id, companion_id, conversation_id, reply_id, kind,
                       text, asked, source, created_at, updated_at)
                   SELECT user_id, ?, ?, ?, 'exchange', ?, ?, ?, ?, ? FROM conversations WHERE id = ?""",
                (companion_id, conversation_id, reply_id, text, asked, source, created_at, time.time(),
                 conversation_id))
            return cur.lastrowid if cur.rowcount else 0

    def add_fact(self, companion_id: str, text: str, pinned: bool = False) -> int:
        now = time.time()
        with self.db.transaction() as conn:
            return conn.execute(
                """INSERT INTO memories (user_id, companion_id, kind, text, source, pinned, created_at,
                       updated_at) VALUES (?, ?, 'fact', ?, 'user', ?, ?, ?)""",
                (self.user, companion_id, text, int(pinned), now, now)).lastrowid

    def edit(self, memory: Memory, text: str | None, pinned: bool | None) -> bool:
        """Change the user's memory; True if its words changed (its vectors must go)."""
        reworded = text is not None and text != memory.text
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE memories SET text = ?, pinned = ?, updated_at = ?, chunks = ? WHERE id = ? "
                "AND user_id = ?",
                (text if text is not None else memory.text,
                 int(pinned if pinned is not None else memory.pinned), time.time(),
                 0 if reworded else int(memory.indexed), memory.id, self.user))
        return reworded

    def delete(self, memory_id: int) -> None:
        """Delete the user's memory; its reply is marked forgotten, so no repair remembers it again."""
        with self.db.transaction() as conn:
            conn.execute("UPDATE messages SET forgotten = 1 WHERE id = (SELECT reply_id FROM memories "
                         "WHERE id = ? AND user_id = ?)", (memory_id, self.user))
            conn.execute("DELETE FROM memories WHERE id = ? AND user_id = ?", (memory_id, self.user))

    def replace_reply(self, old_id: int, new_id: int, new_text: str, renamed: tuple[str, str] | None = None
                      ) -> tuple[list[tuple[str, int]], bool, bool] | None:
        """A reply of the user's made again (new_id) takes the place of old_id, which is deleted,
        in one transaction. The old reply's memories (one, or one for each member of a group chat
        who heard it) move to the new one with their ids, pins and the user's edits; their words
        take the new reply's where they still end with the old one's. Returns ((companion key,
        memory id) of each memory reworded, whether the old reply had a memory, whether it was
        forgotten), or None if old_id is no reply of the user's. `renamed`: (old name, new name) of a
        group chat's reply said again by another member, whose name then stands before it."""
        rows = self.db.query(
            """SELECT m.content, m.forgotten, x.companion_id, x.id AS memory_id, x.text
               FROM messages m JOIN conversations c ON c.id = m.conversation_id
               LEFT JOIN memories x ON x.reply_id = m.id
               WHERE m.id = ? AND m.role = 'assistant' AND c.user_id = ?""", (old_id, self.user))
        if not rows:
            return None
        reworded = []
        with self.db.transaction() as conn:
            for old in rows:
                if old["memory_id"] is None:
                    continue
                text = None
                if old["content"] and old["text"].endswith(old["content"]):
                    head = old["text"][:-len(old["content"])]
                    if renamed and head.endswith(f"{renamed[0]}: "):
                        head = f"{head[:-len(renamed[0]) - 2]}{renamed[1]}: "
                    text = head + new_text
                    reworded.append((old["companion_id"], old["memory_id"]))
                conn.execute("UPDATE memories SET reply_id = ?, text = COALESCE(?, text), updated_at = ?, "
                             "chunks = CASE WHEN ? IS NULL THEN chunks ELSE 0 END WHERE id = ?",
                             (new_id, text, time.time(), text, old["memory_id"]))
            if rows[0]["forgotten"]:
                conn.execute("UPDATE messages SET forgotten = 1 WHERE id = ?", (new_id,))
            conn.execute("DELETE FROM messages WHERE id = ?", (old_id,))
        return reworded, rows[0]["memory_id"] is not None, bool(rows[0]["forgotten"])

    def conversation_memories(self, conversation_id: str) -> tuple[str, list[int]] | None:
        """(companion key, ids of its memories) of one of the user's conversations, or None."""
        rows = self.db.query("SELECT companion_id FROM conversations WHERE id = ? AND user_id = ?",
                             (conversation_id, self.user))
        if not rows:
            return None
        ids = [r["id"] for r in self.db.query("SELECT id FROM memories WHERE conversation_id = ? AND "
                                              "user_id = ?", (conversation_id, self.user))]
        return rows[0]["companion_id"], ids

    def delete_conversation(self, conversation_id: str) -> None:
        """The user's conversation with its messages and memories (the schema's cascade)."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM conversations WHERE id = ? AND user_id = ?",
                         (conversation_id, self.user))

    # -- reads -------------------------------------------------------------------------

    def get(self, memory_id: int) -> Memory | None:
        rows = self.db.query(f"SELECT {COLUMNS} FROM memories WHERE id = ? AND user_id = ?",
                             (memory_id, self.user))
        return as_memory(rows[0]) if rows else None

    def list(self, companion_id: str, limit: int = 50, offset: int = 0,
             kind: Kind | None = None) -> list[Memory]:
        where, params = "user_id = ? AND companion_id = ?", [self.user, companion_id]
        if kind:
            where, params = where + " AND kind = ?", [*params, kind]
        rows = self.db.query(f"SELECT {COLUMNS} FROM memories WHERE {where} "
                             "ORDER BY pinned DESC, created_at DESC, id DESC LIMIT ? OFFSET ?",
                             (*params, limit, offset))
        return [as_memory(r) for r in rows]

    def by_ids(self, memory_ids: list[int]) -> dict:
        """{id: row} of those of the user's memories that exist. `+user_id` keeps SQLite from
        scanning the user's every memory through its index (14 ms at 100k memories)."""
        found = {}
        for start in range(0, len(memory_ids), 500):
            batch = memory_ids[start:start + 500]
            marks = ",".join("?" * len(batch))
            for r in self.db.query(f"SELECT {COLUMNS} FROM memories WHERE id IN ({marks}) AND +user_id = ?",
                                   (*batch, self.user)):
                found[r["id"]] = r
        return found

    def said_at(self, companion_id: str) -> dict[int, float]:
        """{id: created_at} of the user's every memory with the companion."""
        return dict(self.db.query("SELECT id, created_at FROM memories WHERE user_id = ? AND "
                                  "companion_id = ?", (self.user, companion_id)))

    def indexed_count(self) -> int:
        return self.db.query("SELECT COUNT(*) FROM memories WHERE user_id = ? AND chunks > 0",
                             (self.user,))[0][0]

    # -- the index's bookkeeping -------------------------------------------------------

    def _pending_where(self, imported: bool, mine: bool) -> tuple[str, tuple]:
        which = "chunks = 0" + ("" if imported else " AND source != 'imported'")
        return (which + " AND user_id = ?", (self.user,)) if mine else (which, ())

    def pending_count(self, imported: bool = True, mine: bool = False) -> int:
        """Memories not in the index yet: everyone's, or with `mine` this user's."""
        which, params = self._pending_where(imported, mine)
        return self.db.query(f"SELECT COUNT(*) FROM memories WHERE {which}", params)[0][0]

    def pending(self, limit: int, imported: bool = True, mine: bool = False) -> list:
        """The oldest `limit` of them, with whose they are."""
        which, params = self._pending_where(imported, mine)
        return self.db.query("SELECT id, user_id, companion_id, conversation_id, kind, pinned, created_at, "
                             f"text FROM memories WHERE {which} ORDER BY id LIMIT ?", (*params, limit))

    def everyones(self, after: int, limit: int) -> list:
        """Everyone's memories after id `after`, `limit` of them in id order (re-embedding)."""
        return self.db.query("SELECT id, user_id, companion_id, conversation_id, kind, pinned, created_at, "
                             "text FROM memories WHERE id > ? ORDER BY id LIMIT ?", (after, limit))

    def everyones_count(self) -> int:
        return self.db.query("SELECT COUNT(*) FROM memories")[0][0]

    def set_chunks(self, counts: dict[int, int]) -> None:
        """How many vectors each memory now has in the index."""
        with self.db.transaction() as conn:
            conn.executemany("UPDATE memories SET chunks = ? WHERE id = ?",
                             [(n, memory_id) for memory_id, n in counts.items()])

    def unindex(self, everyone: bool = False) -> None:
        """The user's memories (or everyone's) are in no index any more: all are pending."""
        with self.db.transaction() as conn:
            conn.execute("UPDATE memories SET chunks = 0" + ("" if everyone else " WHERE user_id = ?"),
                         () if everyone else (self.user,))

    def chunks_by_collection(self) -> list:
        """(user_id, companion_id, n): how many vectors each user's collection should hold."""
        return self.db.query("SELECT user_id, companion_id, SUM(chunks) AS n FROM memories WHERE chunks > 0 "
                             "GROUP BY user_id, companion_id")

    def users_words(self, exchanges: dict[int, str]) -> dict[int, list[str]]:
        """{memory id: the user messages each exchange holds}, for exchanges {id: text} of
        anyone's (the indexer's): only messages since the memory before it, and only those the
        memory's text still holds, so a deleted neighbour's words never come back."""
        said: dict[int, list[str]] = {}
        for r in self.db.query(
                f"""SELECT mem.id, x.content FROM memories mem JOIN messages x
                      ON x.conversation_id = mem.conversation_id AND x.role = 'user' AND x.id <= mem.reply_id
                    WHERE mem.id IN ({','.join('?' * len(exchanges))}) AND x.id > COALESCE(
                        (SELECT MAX(p.reply_id) FROM memories p WHERE p.conversation_id = mem.conversation_id
                         AND p.reply_id < mem.reply_id), 0)
                    ORDER BY x.id""", list(exchanges)):
            if f": {r['content']}" in exchanges[r["id"]]:
                said.setdefault(r["id"], []).append(r["content"])
        return said

    # -- what no memory holds yet (remembering, and the start-up repair for everyone) ----

    def unremembered(self, conversation_id: str) -> list:
        """The conversation's messages after the last one a memory holds (or one deleted with
        its memory): (companion_id, id, role, content, created_at, speaker), oldest first."""
        return self.db.query(
            """SELECT c.companion_id, m.id, m.role, m.content, m.created_at, m.speaker FROM messages m
               JOIN conversations c ON c.id = m.conversation_id
               WHERE m.conversation_id = ?1 AND m.truncated = 0 AND m.content != '' AND m.id > COALESCE(
                   (SELECT MAX(x.id) FROM messages x WHERE x.conversation_id = ?1 AND (x.forgotten = 1
                        OR x.id IN (SELECT reply_id FROM memories WHERE conversation_id = ?1))), 0)
               ORDER BY m.id""", (conversation_id,))

    def members_of(self, conversation_id: str) -> dict[str, str]:
        """A group chat's members: {companion key: name}, in order; {} for one companion's."""
        return {r["companion_id"]: json.loads(r["card"])["name"] for r in self.db.query(
            "SELECT m.companion_id, c.card FROM conversation_members m JOIN companions c "
            "ON c.id = m.companion_id WHERE m.conversation_id = ? ORDER BY m.position", (conversation_id,))}

    def called_in(self, conversation_id: str) -> str:
        """What the companion calls the conversation's owner."""
        rows = self.db.query("SELECT u.display_name FROM conversations c LEFT JOIN users u "
                             "ON u.name = c.user_id WHERE c.id = ?", (conversation_id,))
        return (rows[0][0] if rows else None) or DEFAULT_USER_NAME

    def begins_before(self, conversation_id: str, message_id: int) -> bool:
        """Does the conversation hold a message before this one?"""
        return bool(self.db.query("SELECT 1 FROM messages WHERE conversation_id = ? AND id < ? LIMIT 1",
                                  (conversation_id, message_id)))

    def unremembered_conversations(self) -> list:
        """Everyone's conversations with messages no memory holds yet: (id, source, card)."""
        return self.db.query(
            """SELECT c.id, c.source, co.card FROM conversations c
               JOIN companions co ON co.id = c.companion_id
               WHERE (SELECT MAX(id) FROM messages WHERE conversation_id = c.id AND truncated = 0
                          AND content != '')
                     > COALESCE((SELECT MAX(m.id) FROM messages m WHERE m.conversation_id = c.id
                                 AND (m.forgotten = 1 OR m.id IN (SELECT reply_id FROM memories
                                                                  WHERE conversation_id = c.id))), 0)""")
