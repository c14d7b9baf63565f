"""Which embedder made the memory index, and the one a re-embedding is building.

The vectors live in Chroma, one generation of collections per embedder; SQLite says which
generation serves and which is being built, so a re-embedding killed midway resumes, and the
switch from one to the other is one transaction (with every memory's count of vectors).
"""

from __future__ import annotations

import time
from typing import NamedTuple

from store.db import Database


class Generation(NamedTuple):
    number: int
    embedder: str          # its identity
    setting: str | None    # memory.embedder as it was set (None: the bundled one)


class IndexGenerations:
    def __init__(self, db: Database):
        self.db = db

    def serving(self) -> Generation | None:
        return self._one("serving")

    def building(self) -> Generation | None:
        return self._one("building")

    def _one(self, state: str) -> Generation | None:
        rows = self.db.query("SELECT generation, embedder, setting FROM memory_index WHERE state = ?",
                             (state,))
        return Generation(*rows[0]) if rows else None

    def adopt(self, embedder: str, setting: str | None) -> Generation:
        """The index as it is (made before generations were recorded, or just now): generation 0
        when none serves yet, made by `embedder`."""
        with self.db.transaction() as conn:
            if not conn.execute("SELECT 1 FROM memory_index WHERE state = 'serving'").fetchone():
                conn.execute("INSERT INTO memory_index VALUES (0, ?, ?, 'serving', ?)",
                             (embedder, setting, time.time()))
        serving = self.serving()
        assert serving is not None
        return serving

    def reset(self, embedder: str, setting: str | None) -> Generation:
        """A new index (generation 0, made by `embedder`) replaces whatever was recorded: a
        restored backup's index is rebuilt from SQLite with this machine's embedder."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM memory_index")
        return self.adopt(embedder, setting)

    def rename(self, embedder: str, setting: str | None) -> None:
        """The serving generation's vectors are also `embedder`'s (it embeds the same)."""
        with self.db.transaction() as conn:
            conn.execute("UPDATE memory_index SET embedder = ?, setting = ? WHERE state = 'serving'",
                         (embedder, setting))

    def begin(self, embedder: str, setting: str | None) -> Generation:
        """A new generation to build (after any other there is)."""
        with self.db.transaction() as conn:
            number = conn.execute("SELECT COALESCE(MAX(generation), -1) + 1 FROM memory_index").fetchone()[0]
            conn.execute("INSERT INTO memory_index VALUES (?, ?, ?, 'building', ?)",
                         (number, embedder, setting, time.time()))
        return Generation(number, embedder, setting)

    def abandon(self, number: int) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM memory_index WHERE generation = ? AND state = 'building'", (number,))

    def switch(self, number: int, counts: dict[int, int]) -> None:
        """Generation `number` serves from now on, every memory having `counts` vectors in it."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM memory_index WHERE state = 'serving'")
            conn.execute("UPDATE memory_index SET state = 'serving' WHERE generation = ?", (number,))
            conn.execute("UPDATE memories SET chunks = 0")
            conn.executemany("UPDATE memories SET chunks = ? WHERE id = ?",
                             [(n, memory_id) for memory_id, n in counts.items()])
