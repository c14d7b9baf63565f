"""Re-embedding every memory for another embedder, while the old index serves.

A new generation of collections is built beside the serving one from SQLite (the truth),
each vector carrying a hash of the text it was made from: a run killed midway resumes where
it stopped, and a memory edited or deleted meanwhile is redone or dropped. When it holds
every memory, checked against SQLite under the index lock, one transaction makes it the
serving generation (with every memory's count of vectors) and the old one is dropped.
An embedder that makes the serving vectors again (the same model, served elsewhere) is
recorded without re-embedding anything.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from memory.embedder import AnyEmbedder
from memory.store import MemoryStore, text_hash
from store.db import Progress
from store.memory_index import Generation, IndexGenerations

log = logging.getLogger("homefire.memory")

SAME = 0.999     # cosine over which a sample's two vectors count as the same
SAMPLES = 8      # memories compared to decide that
BATCH = 64
PASSES = 3       # at most, before the last one under the index lock


class Stopped(Exception):
    """The server is stopping; what is embedded stays, and the next start resumes."""


@dataclass
class Reembedding:
    """What a re-embedding is doing, for /readyz: checking | embedding | done | failed."""

    embedder: str
    state: str = "checking"
    done: int = 0
    total: int = 0
    resumed_from: int = 0       # memories a stopped or killed run had embedded already
    error: str | None = None
    outcome: str | None = None  # done: "re-embedded", "same vectors" (nothing to redo), "unchanged"
    thread: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)

    def progress(self, done: int, total: int) -> None:
        if self._stopping.is_set():
            raise Stopped
        if total and done * 10 // total > self.done * 10 // max(self.total, 1):   # each tenth, in the log
            log.info("memory: re-embedded %d of %d memories for %s", done, total, self.embedder)
        self.state, self.done, self.total = "embedding", done, total

    def stop(self, timeout: float = 30) -> None:
        self._stopping.set()
        if self.thread:
            self.thread.join(timeout)

    def public(self) -> dict:
        return {"embedder": self.embedder, "state": self.state, "done": self.done, "total": self.total,
                "resumed_from": self.resumed_from, "outcome": self.outcome, "error": self.error}


def reembed(store: MemoryStore, embedder: AnyEmbedder, setting: str | None,
            status: Reembedding | None = None, query_embedder: AnyEmbedder | None = None) -> Reembedding:
    """Make `embedder` (memory.embedder = `setting`) the store's, its index rebuilt for it
    unless it embeds as the serving one does. `query_embedder`: a second instance for
    recall's questions (a local model serves one call at a time)."""
    status = status or Reembedding(embedder.identity)
    generations = IndexGenerations(store.db)
    serving = generations.serving()
    assert serving is not None and serving.number == store.generation
    building = generations.building()
    if serving.embedder == embedder.identity and building is None:
        status.state, status.outcome = "done", "unchanged"
        return status
    if building and building.embedder != embedder.identity:   # the setting changed again
        drop_generation(store, building.number)
        generations.abandon(building.number)
        building = None
    if building is None and same_vectors(store, embedder):
        generations.rename(embedder.identity, setting)
        store.embedder, store.index_embedder = query_embedder or embedder, embedder
        status.state, status.outcome = "done", "same vectors"
        return status
    building = building or generations.begin(embedder.identity, setting)
    store.building = building.number
    status.resumed_from = len(_held(store, building.number))
    for _ in range(PASSES):   # until a pass finds nothing to do (writes go on meanwhile)
        if not _catch_up(store, embedder, building, status.progress):
            break
    with store._index_lock:   # no indexing meanwhile: what is checked is what switches
        _catch_up(store, embedder, building)
        counts = _check(store, building.number)
        generations.switch(building.number, counts)
        old = store.generation
        store.generation, store.building = building.number, None
        store.embedder, store.index_embedder = query_embedder or embedder, embedder
        store._mirrors.clear()
        drop_generation(store, old)
    status.state, status.outcome = "done", "re-embedded"
    status.done = status.total = len(counts)
    return status


def same_vectors(store: MemoryStore, embedder: AnyEmbedder) -> bool:
    """Does `embedder` make the serving index's vectors again? Compared on a few memories'
    first pieces (all of them when there are fewer); an empty index is anyone's."""
    rows = store.rows.everyones(0, SAMPLES)
    if not rows:
        return True
    for row in rows:
        found = store.collection(row["companion_id"], row["user_id"]).get(
            ids=[f"{row['id']}:0"], include=["embeddings"])
        if not len(found["ids"]):
            return False   # not indexed yet: no evidence either way, so re-embed
        stored = np.asarray(found["embeddings"][0], dtype=np.float32)
        fresh = np.asarray(embedder.embed([embedder.chunks(row["text"])[0]])[0], dtype=np.float32)
        if stored.shape != fresh.shape or float(stored @ fresh) < SAME:
            return False
    return True


def _held(store: MemoryStore, generation: int) -> dict[int, tuple[str, int]]:
    """{memory id: (hash of its text, vectors)} in a generation's collections."""
    held: dict[int, tuple[str, int]] = {}
    prefix = f"g{generation}-"
    for collection in store.client.list_collections():
        if not collection.name.startswith(prefix):
            continue
        collection = store.client.get_collection(collection.name, embedding_function=None)
        for offset in range(0, collection.count(), 5000):
            page = collection.get(include=["metadatas"], limit=5000, offset=offset)
            for meta in page["metadatas"]:
                sha, n = held.get(meta["memory_id"], (meta.get("sha", ""), 0))
                held[meta["memory_id"]] = (sha, n + 1)
    return held


def _catch_up(store: MemoryStore, embedder: AnyEmbedder, building: Generation,
              progress: Progress | None = None) -> int:
    """One pass: embed what the generation lacks or holds of an older text, drop what SQLite no
    longer has; returns how many memories it changed."""
    held = _held(store, building.number)
    total = store.rows.everyones_count()
    seen, changed, done, after = set(), 0, 0, 0
    while rows := store.rows.everyones(after, BATCH * 4):
        after = rows[-1]["id"]
        seen.update(r["id"] for r in rows)
        todo = [r for r in rows if held.get(r["id"], ("", 0))[0] != text_hash(r["text"])]
        done += len(rows) - len(todo)
        for start in range(0, len(todo), BATCH):
            batch = todo[start:start + BATCH]
            _drop(store, building.number, batch)
            store._embed(batch, embedder, building.number)
            done += len(batch)
            changed += len(batch)
            if progress:
                progress(done, total)
    gone = [{"id": i, "user_id": None, "companion_id": None} for i in held if i not in seen]
    if gone:
        _drop(store, building.number, gone)
        changed += len(gone)
    if progress:
        progress(done, total)
    return changed


def _drop(store: MemoryStore, generation: int, rows: list) -> None:
    """The generation's vectors of these memories, wherever they are."""
    ids = [r["id"] for r in rows]
    if not ids:
        return
    for collection in store.client.list_collections():
        if collection.name.startswith(f"g{generation}-"):
            store.client.get_collection(collection.name, embedding_function=None).delete(
                where={"memory_id": {"$in": ids}})


def _check(store: MemoryStore, generation: int) -> dict[int, int]:
    """{memory id: vectors} of the finished generation. A memory it lacks, or holds of an older
    text (added or edited since the last pass), is left pending: the indexer embeds it into the
    new generation once it serves. Vectors of another size than the rest, or not numbers, are
    an embedder's fault: that raises, and the old generation keeps serving."""
    held = _held(store, generation)
    texts: dict[int, str] = {}
    after = 0
    while rows := store.rows.everyones(after, 5000):
        after = rows[-1]["id"]
        texts.update((r["id"], text_hash(r["text"])) for r in rows)
    _drop(store, generation, [{"id": i} for i, (sha, _) in held.items() if texts.get(i) != sha])
    sizes = set()
    for collection in store.client.list_collections():
        if collection.name.startswith(f"g{generation}-"):
            page = store.client.get_collection(collection.name, embedding_function=None).get(
                include=["embeddings"], limit=50)
            vectors = np.asarray(page["embeddings"], dtype=np.float32)
            if len(vectors) and not np.isfinite(vectors).all():
                raise RuntimeError("memory: the new embedder made vectors that are not numbers; "
                                   "the old index still serves")
            sizes.update({vectors.shape[1]} if len(vectors) else set())
    if len(sizes) > 1:
        raise RuntimeError(f"memory: the new embedder made vectors of {sorted(sizes)} sizes; "
                           "the old index still serves")
    return {i: n for i, (sha, n) in held.items() if texts.get(i) == sha}


def drop_generation(store: MemoryStore, generation: int) -> None:
    prefix = f"g{generation}-" if generation else "u-"
    for collection in store.client.list_collections():
        if collection.name.startswith(prefix):
            store.client.delete_collection(collection.name)
            store._collections.pop(collection.name, None)
            store._mirrors.pop(collection.name, None)
