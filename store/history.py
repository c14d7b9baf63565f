"""Durable chat history: conversations and their messages in SQLite.

Every message carries a chain hash of the conversation up to it, so a client that resends
the whole conversation (as OpenAI-style clients do) can be matched to what is stored.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, PrivateAttr

from store.companions import visible_id
from store.db import Database
from store.groups import Group
from store.users import LOCAL

Role = Literal["user", "assistant"]


class ReplyMeta(BaseModel):
    """What the engine reported about a reply, stored beside its text."""

    tokens: int | None = None
    prompt_tokens: int | None = None
    model: str | None = None
    adapter: str | None = None
    sampling: dict | None = None
    finish_reason: str | None = None
    truncated: bool = False
    memories_used: list[dict] | None = None   # replies: [{id, text, score, why}] put in the prompt
    lore_used: list[dict] | None = None       # replies: the lorebook entries [{entry, name, why, where}]
    speaker: str | None = None                # group replies: the companion who spoke (its id)


class Message(ReplyMeta):
    id: int
    conversation_id: str
    role: Role
    content: str
    created_at: float


class Conversation(BaseModel):
    id: str
    companion_id: str               # as its user knows it (the store keeps the key, store.companions)
    title: str | None
    source: str                     # live | imported
    origin: str | None = None       # imported: the export's format (chatgpt, claude, ...)
    original_id: str | None = None  # imported: the export's id for it
    created_at: float
    updated_at: float
    companions: list[str] | None = None   # a group chat: its member companions' ids, in order
    reply_order: str | None = None        # a group chat: manual | round_robin | natural
    group: str | None = None              # a group chat begun from a saved group: its id

    _companion_key: str = PrivateAttr("")
    _member_keys: list[str] = PrivateAttr(default_factory=list)

    @property
    def member_keys(self) -> list[str]:
        """A group chat's members' keys, in order; one companion's conversation: its companion."""
        return self._member_keys or [self.companion_key]

    @property
    def companion_key(self) -> str:
        """The key its companion's data is stored under."""
        return self._companion_key or self.companion_id

    def stored_with(self, companion_key: str) -> Conversation:
        self._companion_key = companion_key
        return self


class UnknownConversation(LookupError):
    """No such conversation for this user (or it was deleted meanwhile)."""

    def __init__(self, conversation_id: str):
        super().__init__(f"no conversation with id {conversation_id!r}")


def chain_hash(previous: str, role: str, content: str) -> str:
    return hashlib.sha256(f"{previous}\x00{role}\x00{content}".encode()).hexdigest()[:32]


def chains(root: str, turns: list[tuple[str, str]]) -> list[str]:
    """The chain hash of each of `turns` ((role, content), oldest first) from `root`."""
    found, previous = [], root
    for role, content in turns:
        previous = chain_hash(previous, role, content)
        found.append(previous)
    return found


def chain_root(companion_id: str) -> str:
    """Where the chains of a companion's conversations begin; a group chat's begin at its
    saved group's ("group:ID"), or its own id's: no stored turn of another matches them."""
    return hashlib.sha256(f"homefire\x00{companion_id}".encode()).hexdigest()[:32]


def group_root(group_or_conversation: str) -> str:
    return chain_root(f"group:{group_or_conversation}")


class History:
    """One user's conversations: every read and write is limited to rows that user owns."""

    def __init__(self, db: Database, user: str = LOCAL):
        self.db = db
        self.user = user

    def create_conversation(
        self, companion_id: str, title: str | None = None, source: str = "live",
        members: list[str] | None = None, reply_order: str | None = None, group: str | None = None,
    ) -> Conversation:
        """A conversation with one companion, or with `members` (their keys, the first being
        `companion_id`) in a group chat that replies in `reply_order`."""
        with self.db.transaction() as conn:
            return self._insert_conversation(conn, companion_id, title, source, members, reply_order, group)

    def _insert_conversation(self, conn, companion_id: str, title: str | None, source: str,
                             members: list[str] | None = None, reply_order: str | None = None,
                             group: str | None = None) -> Conversation:
        now = time.time()
        assert not members or (members[0] == companion_id and reply_order), "a group's host is its first"
        conversation = Conversation(
            id=uuid.uuid4().hex, companion_id=visible_id(companion_id), title=title, source=source,
            created_at=now, updated_at=now, reply_order=reply_order if members else None,
            companions=[visible_id(k) for k in members] if members else None, group=group,
        )
        conn.execute(
            "INSERT INTO conversations (id, companion_id, title, source, created_at, updated_at, user_id,"
            " reply_order, group_id) VALUES (:id, :companion_id, :title, :source, :created_at, :updated_at,"
            " :user_id, :reply_order, :group)",
            conversation.model_dump() | {"user_id": self.user, "companion_id": companion_id},
        )
        for position, key in enumerate(members or ()):
            conn.execute("INSERT INTO conversation_members (conversation_id, companion_id, position) "
                         "VALUES (?, ?, ?)", (conversation.id, key, position))
        conversation._member_keys = list(members or ())
        return conversation.stored_with(companion_id)

    def get_conversation(self, conversation_id: str) -> Conversation | None:
        rows = self.db.query(f"SELECT {_CONVERSATION} FROM conversations WHERE id = ? AND user_id = ?",
                             (conversation_id, self.user))
        return _conversation(rows[0]) if rows else None

    def list_conversations(
        self, companion_id: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[Conversation]:
        where, params = ("", ())
        if companion_id:   # its own conversations, and the group chats it is in
            where, params = ("AND (companion_id = ? OR id IN (SELECT conversation_id FROM "
                             "conversation_members WHERE companion_id = ?))", (companion_id, companion_id))
        rows = self.db.query(
            f"SELECT {_CONVERSATION} FROM conversations WHERE user_id = ? {where} "
            "ORDER BY updated_at DESC, id LIMIT ? OFFSET ?",
            (self.user, *params, limit, offset),
        )
        return [_conversation(r) for r in rows]

    def rename_conversation(self, conversation_id: str, title: str | None) -> bool:
        with self.db.transaction() as conn:
            cur = conn.execute("UPDATE conversations SET title = ? WHERE id = ? AND user_id = ?",
                               (title, conversation_id, self.user))
            return cur.rowcount > 0

    def delete_conversation(self, conversation_id: str) -> bool:
        with self.db.transaction() as conn:
            cur = conn.execute("DELETE FROM conversations WHERE id = ? AND user_id = ?",
                               (conversation_id, self.user))
            return cur.rowcount > 0

    def spoken(self, companion_id: str, until: int | None = None) -> list[tuple[str, list[dict]]]:
        """(conversation id, [{role, content}]) of every conversation with the companion that
        holds a reply, imported and live, oldest first, without cut-off replies or empty turns.
        `until`: only messages up to this id (the history as it was when a training began)."""
        spoken = []
        # A group chat is left out: its replies are in several voices.
        for conv in self.db.query("SELECT id FROM conversations WHERE companion_id = ? AND user_id = ? AND "
                                  "reply_order IS NULL ORDER BY created_at, id", (companion_id, self.user)):
            rows = self.db.query("SELECT role, content FROM messages WHERE conversation_id = ? AND "
                                 "truncated = 0 AND id <= ? ORDER BY id",
                                 (conv["id"], until if until is not None else 2**62))
            messages = [{"role": r["role"], "content": r["content"]} for r in rows if r["content"].strip()]
            if any(m["role"] == "assistant" for m in messages):
                spoken.append((conv["id"], messages))
        return spoken

    def imported_as(self, companion_id: str, origin: str, original_id: str) -> list[tuple[str, str | None]]:
        """(id, its last message's chain) of the user's conversations with the companion that
        an export's conversation `original_id` from `origin` came in as (an edited one forks)."""
        rows = self.db.query(
            "SELECT id, (SELECT chain FROM messages WHERE conversation_id = c.id ORDER BY id DESC LIMIT 1)"
            " AS last FROM conversations c WHERE companion_id = ? AND origin = ? AND original_id = ?"
            " AND user_id = ?", (companion_id, origin, original_id, self.user))
        return [(r["id"], r["last"]) for r in rows]

    def holds_chain(self, conversation_id: str, chain: str) -> bool:
        """Does the user's conversation hold a message with this chain hash?"""
        return bool(self.db.query(
            "SELECT 1 FROM messages m JOIN conversations c ON c.id = m.conversation_id WHERE "
            "m.conversation_id = ? AND m.chain = ? AND c.user_id = ?", (conversation_id, chain, self.user)))

    def first_messages(self, companion_id: str) -> list[tuple[Conversation, str | None]]:
        """Every conversation with the companion, oldest first, with its first user message."""
        rows = self.db.query(
            f"""SELECT {_CONVERSATION}, (SELECT content FROM messages WHERE conversation_id = conversations.id
                   AND role = 'user' ORDER BY id LIMIT 1) AS first FROM conversations
               WHERE companion_id = ? AND user_id = ? ORDER BY created_at, id""",
            (companion_id, self.user))
        return [(_conversation(r), r["first"]) for r in rows]

    def messages(self, conversation_id: str) -> list[Message]:
        rows = self.db.query(
            "SELECT m.* FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE m.conversation_id = ? AND c.user_id = ? ORDER BY m.id", (conversation_id, self.user)
        )
        return [_message(r) for r in rows]

    def append(
        self, conversation_id: str, role: Role, content: str, meta: ReplyMeta | None = None
    ) -> Message:
        with self.db.transaction() as conn:
            return self._append(conn, conversation_id, role, content, meta or ReplyMeta())

    def _append(self, conn, conversation_id: str, role: Role, content: str, meta: ReplyMeta) -> Message:
        now = time.time()
        conv = conn.execute(
            "SELECT companion_id, reply_order, group_id, original_id FROM conversations WHERE id = ? "
            "AND user_id = ?",
            (conversation_id, self.user),
        ).fetchone()
        if conv is None:
            raise UnknownConversation(conversation_id)
        last = conn.execute(
            "SELECT chain FROM messages WHERE conversation_id = ? ORDER BY id DESC LIMIT 1",
            (conversation_id,),
        ).fetchone()
        if last:
            previous = last["chain"]
        elif conv["reply_order"]:   # a saved group's, an imported one's (memory/importer.py), its own
            previous = group_root(conv["group_id"] or conv["original_id"] or conversation_id)
        else:
            previous = chain_root(visible_id(conv["companion_id"]))
        cur = conn.execute(
            """INSERT INTO messages (conversation_id, role, content, created_at, tokens,
                   prompt_tokens, model, adapter, sampling, finish_reason, truncated, memories, lore,
                   chain, speaker)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                conversation_id, role, content, now, meta.tokens, meta.prompt_tokens,
                meta.model, meta.adapter,
                json.dumps(meta.sampling) if meta.sampling is not None else None,
                meta.finish_reason, int(meta.truncated),
                json.dumps(meta.memories_used) if meta.memories_used is not None else None,
                json.dumps(meta.lore_used) if meta.lore_used else None,
                chain_hash(previous, role, content), meta.speaker,
            ),
        )
        conn.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
        return _message(conn.execute("SELECT * FROM messages WHERE id = ?", (cur.lastrowid,)).fetchone())

    def memories_shown(self, companion_id: str, turns: list[tuple[Role, str]]) -> dict[int, list[int]]:
        """{index of a reply among `turns`: ids of the memories its prompt showed}, for the
        replies stored in the user's conversations with the companion (matched by chain)."""
        wanted = {chain: i for i, chain in enumerate(chains(chain_root(visible_id(companion_id)), turns))
                  if turns[i][0] == "assistant"}
        shown: dict[int, list[int]] = {}
        batch_chains = list(wanted)
        for start in range(0, len(batch_chains), 500):   # under SQLite's parameter limit
            batch = batch_chains[start:start + 500]
            for row in self.db.query(
                f"""SELECT m.chain, m.memories FROM messages m
                    JOIN conversations c ON c.id = m.conversation_id
                    WHERE m.chain IN ({",".join("?" * len(batch))}) AND m.memories IS NOT NULL
                      AND c.companion_id = ? AND c.user_id = ?""", (*batch, companion_id, self.user)):
                ids = [m["id"] for m in json.loads(row["memories"])]
                if ids:
                    shown[wanted[row["chain"]]] = ids
        return shown

    def speakers(self, group_id: str, turns: list[tuple[Role, str]]) -> list[str | None]:
        """Who spoke each of `turns` (a resent group chat with the saved group `group_id`): the
        stored speaker's key of each reply found by its chain, else None."""
        hashes = chains(group_root(group_id), turns)
        found: dict[str, str] = {}
        for start in range(0, len(hashes), 500):   # under SQLite's parameter limit
            batch = hashes[start:start + 500]
            for row in self.db.query(
                f"""SELECT m.chain, m.speaker FROM messages m JOIN conversations c ON c.id = m.conversation_id
                    WHERE m.chain IN ({",".join("?" * len(batch))}) AND m.speaker IS NOT NULL
                      AND c.user_id = ?""", (*batch, self.user)):
                found[row["chain"]] = row["speaker"]
        return [found.get(chain) if role == "assistant" else None
                for chain, (role, _) in zip(hashes, turns, strict=True)]

    def record_resent(
        self, companion_id: str, turns: list[tuple[Role, str]], group: Group | None = None,
        speakers: list[str | None] = (),
    ) -> tuple[str, list[Message]]:
        """Store a resent conversation, keeping only what is new; return (conversation id, added).

        The longest stored prefix of `turns` is found by chain hash. If it ends at the tail
        of its conversation, the rest is appended there; otherwise (a regenerated or edited
        turn) the turns start a new conversation, so no stored branch is rewritten. A group
        chat with a saved `group` (companion_id: its first member) is one of that group's, and
        `speakers` are its turns' speakers' keys.
        """
        root = group_root(group.id) if group else chain_root(visible_id(companion_id))
        hashes = chains(root, turns)
        position = {chain: i + 1 for i, chain in enumerate(hashes)}
        conversation_id, matched = None, 0
        # Matched and appended in one write transaction: two identical resends at once (an SDK
        # retry, a double click) must find each other's turns rather than both appending.
        with self.db.transaction() as conn:
            for start in range(0, len(hashes), 500):  # stay under SQLite's parameter limit
                batch = hashes[start : start + 500]
                rows = conn.execute(
                    f"""SELECT m.chain, m.conversation_id FROM messages m
                        JOIN conversations c ON c.id = m.conversation_id
                        WHERE m.chain IN ({",".join("?" * len(batch))}) AND c.companion_id = ?
                          AND c.user_id = ? AND m.id = (SELECT MAX(id) FROM messages
                                      WHERE conversation_id = m.conversation_id)
                        ORDER BY c.updated_at DESC""",
                    (*batch, companion_id, self.user),
                ).fetchall()
                for row in rows:
                    if position[row["chain"]] > matched:
                        conversation_id, matched = row["conversation_id"], position[row["chain"]]
            if conversation_id is None:
                conversation_id = self._insert_conversation(
                    conn, companion_id, group.name if group else None, "live", group.keys if group else None,
                    group.reply_order if group else None, group.id if group else None).id
            speakers = list(speakers) or [None] * len(turns)
            added = [
                self._append(conn, conversation_id, role, content, ReplyMeta(speaker=speakers[i]))
                for i, (role, content) in enumerate(turns[matched:], start=matched)
            ]
        return conversation_id, added


_CONVERSATION = ("id, companion_id, title, source, origin, original_id, created_at, updated_at, "
                 "reply_order, group_id, (SELECT json_group_array(companion_id) FROM (SELECT companion_id "
                 "FROM conversation_members WHERE conversation_id = conversations.id ORDER BY position))"
                 " AS members")


def _conversation(row) -> Conversation:
    data = dict(row)
    members = json.loads(data.pop("members") or "[]") if data["reply_order"] else []
    data["group"] = data.pop("group_id")
    found = Conversation(**data | {"companion_id": visible_id(row["companion_id"]),
                                   "companions": [visible_id(k) for k in members] or None})
    found._member_keys = members
    return found.stored_with(row["companion_id"])


def _message(row) -> Message:
    data = dict(row)
    for internal in ("chain", "forgotten"):
        data.pop(internal)
    data["truncated"] = bool(data["truncated"])
    data["sampling"] = json.loads(data["sampling"]) if data["sampling"] else None
    memories = data.pop("memories")
    data["memories_used"] = json.loads(memories) if memories else None
    lore = data.pop("lore")
    data["lore_used"] = json.loads(lore) if lore else None
    data["speaker"] = visible_id(data["speaker"]) if data["speaker"] else None
    return Message(**data)
