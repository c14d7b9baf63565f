"""Running summaries of long conversations: what the turns that no longer fit the context said
(serve/summaries.py writes them). One user's view, like store/history.py.

A summary covers a conversation's first `turns` non-empty messages and is found by their chain
(store.history.chains): any history that begins with exactly those messages can use it, and a
history in which one of them was edited or deleted cannot, so it is written again from there.
"""

from __future__ import annotations

import time

from pydantic import BaseModel

from store.companions import visible_id
from store.db import Database
from store.history import Role, chain_root, chains
from store.users import LOCAL


class Summary(BaseModel):
    id: int
    conversation_id: str
    text: str
    turns: int
    """How many of the conversation's messages (non-empty, from its first) it covers."""
    first_message_id: int | None
    """The first message it covers (None once that message is gone)."""
    through_message_id: int
    """The last message it covers."""
    edited: bool
    """The user changed its words; the next fold starts from them."""
    created_at: float
    updated_at: float


def turn_chains(companion_key: str, turns: list[tuple[Role, str]]) -> list[str]:
    """The chain of each non-empty turn, as summaries are keyed; index i covers i + 1 of them."""
    return chains(chain_root(visible_id(companion_key)), [(r, c) for r, c in turns if c])


_COLUMNS = ("s.id, s.conversation_id, s.text, s.turns, s.through_id, s.edited, s.created_at, s.updated_at, "
            "(SELECT MIN(id) FROM messages WHERE conversation_id = s.conversation_id) AS first_id")


def _summary(row) -> Summary:
    return Summary(id=row["id"], conversation_id=row["conversation_id"], text=row["text"], turns=row["turns"],
                   first_message_id=row["first_id"], through_message_id=row["through_id"],
                   edited=bool(row["edited"]), created_at=row["created_at"], updated_at=row["updated_at"])


class Summaries:
    def __init__(self, db: Database, user: str = LOCAL):
        self.db = db
        self.user = user

    def covering(self, companion_key: str, turns: list[tuple[Role, str]]) -> Summary | None:
        """The summary of the user's that covers the most of `turns` (oldest first), if any."""
        hashes = turn_chains(companion_key, turns)
        if not hashes:
            return None
        best = None
        for start in range(0, len(hashes), 500):   # under SQLite's parameter limit
            batch = hashes[start:start + 500]
            rows = self.db.query(
                f"""SELECT {_COLUMNS} FROM summaries s JOIN conversations c ON c.id = s.conversation_id
                    WHERE s.chain IN ({",".join("?" * len(batch))}) AND c.user_id = ? AND c.companion_id = ?
                    ORDER BY s.turns DESC, s.updated_at DESC LIMIT 1""", (*batch, self.user, companion_key))
            if rows and (best is None or rows[0]["turns"] > best.turns):
                best = _summary(rows[0])
        return best

    def add(self, conversation_id: str, companion_key: str, turns: list[tuple[Role, str]], through_id: int,
            text: str, edited: bool = False, when: tuple[float, float] | None = None,
            replace: bool = True) -> Summary | None:
        """Keep the summary of the conversation's first turns (the last of them `through_id`);
        None when the conversation (or that message) is gone meanwhile, or, not `replace`, when
        the conversation has a summary of those turns already. `when`: (created, updated)."""
        chain = turn_chains(companion_key, turns)[-1]
        now = time.time()
        created, updated = when or (now, now)
        with self.db.transaction() as conn:
            if not replace and conn.execute("SELECT 1 FROM summaries WHERE conversation_id = ? AND chain = ?",
                                            (conversation_id, chain)).fetchone():
                return None
            found = conn.execute("SELECT 1 FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                                 "WHERE m.id = ? AND c.id = ? AND c.user_id = ?",
                                 (through_id, conversation_id, self.user)).fetchone()
            if found is None:
                return None
            new = conn.execute("INSERT INTO summaries (conversation_id, through_id, turns, chain, text, "
                               "edited, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (conversation_id, through_id, len([t for t in turns if t[1]]), chain, text,
                                int(edited), created, updated)).lastrowid
            # Those it grew from are kept for a fork that shares only their part; of one
            # coverage, the newest is enough.
            conn.execute("DELETE FROM summaries WHERE conversation_id = ? AND chain = ? AND id != ?",
                         (conversation_id, chain, new))
        return self.get(new)

    def get(self, summary_id: int) -> Summary | None:
        rows = self.db.query(f"SELECT {_COLUMNS} FROM summaries s JOIN conversations c ON "
                             "c.id = s.conversation_id WHERE s.id = ? AND c.user_id = ?",
                             (summary_id, self.user))
        return _summary(rows[0]) if rows else None

    def edit(self, summary_id: int, text: str) -> Summary | None:
        """The user's own words for the summary; None if it is not theirs (or gone)."""
        with self.db.transaction() as conn:
            cur = conn.execute("UPDATE summaries SET text = ?, edited = 1, updated_at = ? WHERE id = ? AND "
                               "conversation_id IN (SELECT id FROM conversations WHERE user_id = ?)",
                               (text, time.time(), summary_id, self.user))
        return self.get(summary_id) if cur.rowcount else None
