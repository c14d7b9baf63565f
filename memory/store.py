"""Long-term memory: rows in SQLite (the truth, read and written through store.memories) and
vectors in Chroma (an index of them).

Exchanges (a user message with the companion's reply) and facts the user adds. Each is
cut to the embedder's window, one vector per piece, in one Chroma collection per
(user, companion). The index can always be rebuilt from SQLite; a deleted memory leaves
neither row nor vector, so nothing brings it back.

Recall is an exact search over a mirror of the collection's vectors in this process.
Chroma's HNSW search missed an isolated memory among 300 clustered small-talk exchanges in
2 of 3 runs (insertion order is random): exactly the memory this feature exists for.
"""

from __future__ import annotations

import copy
import hashlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import chromadb
import numpy as np
from chromadb.config import Settings as ChromaSettings

from memory.embedder import AnyEmbedder
from memory.mirror import Hit, Mirror
from memory.recall import Recalled, RecallSettings, Why, choose, relevant
from memory.rerank import Reranker
from memory.when import asked_span, relative_to
from store.db import Database, Progress
from store.memories import Kind, Memory, MemoryRows
from store.users import LOCAL

__all__ = ["MemoryStore", "RecallSettings", "Recalled"]

HNSW = {"space": "cosine"}
GENERATION = re.compile(r"^g\d+-")   # a collection's generation prefix (none: generation 0)
POOL = 100   # rows the fast scan hands to exact scoring


class TurnLock:
    """A lock that goes to its waiters in the order they asked for it.

    threading.Lock is not fair: an import's indexer that releases it between batches and
    takes it again at once kept it for the whole import (minutes on CI), and a reply's
    memory waited all that time."""

    def __init__(self):
        self._turns = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._turns:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._turns.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc) -> None:
        with self._turns:
            self._serving += 1
            self._turns.notify_all()


class MemoryStore:
    """One user's memories (`user`); for_user() gives another user's view of the same index.

    Indexing, repair and the consistency check work for every user at once."""

    def __init__(self, db: Database, index_dir: Path, embedder: AnyEmbedder, user: str = LOCAL,
                 settings: RecallSettings | None = None, index_embedder: AnyEmbedder | None = None,
                 client: chromadb.ClientAPI | None = None, generation: int = 0):
        self.db = db
        self.settings = settings or RecallSettings()
        self.embedder = embedder
        # Indexing may embed thousands of texts; with its own instance recall never waits.
        self.index_embedder = index_embedder or embedder
        self.user = user
        self.rows = MemoryRows(db, user)
        self.index_dir = index_dir
        # A Chroma server when given one, else an embedded index in the data directory.
        self.client = client or chromadb.PersistentClient(
            path=str(index_dir), settings=ChromaSettings(anonymized_telemetry=False))
        # Keyed by collection name and shared by every user's view.
        self._collections: dict[str, chromadb.Collection] = {}
        self._mirrors: dict[str, Mirror] = {}
        self._index_lock = TurnLock()
        # The generation of collections that serves (its embedder's), and one being built for
        # another embedder (memory/reembed.py), which every deletion reaches too.
        self.generation = generation
        self.building: int | None = None
        self.reranker: Reranker | None = None   # memory.reranker

    def for_user(self, user: str) -> MemoryStore:
        view = copy.copy(self)
        view.user, view.rows = user, MemoryRows(self.db, user)
        return view

    def collection(self, companion_id: str, user: str | None = None, generation: int | None = None):
        # User names have no "--", so no two (user, companion) pairs share a name.
        name = f"{self._prefix(generation)}u-{user or self.user}--c-{companion_id}"
        if name not in self._collections:
            # No embedding function: Chroma's default would download a model.
            self._collections[name] = self.client.get_or_create_collection(
                name, embedding_function=None, configuration={"hnsw": HNSW})
        return self._collections[name]

    def _prefix(self, generation: int | None = None) -> str:
        generation = self.generation if generation is None else generation
        return f"g{generation}-" if generation else ""

    # -- writes: SQLite first, the index follows (index_pending) --------------------------

    def add_exchange(self, companion_id: str, conversation_id: str, reply_id: int, asked: str | None,
                     text: str, created_at: float, source: str = "live") -> int:
        """A memory of messages ending with `reply_id` (the key: one memory per ending message);
        returns its id, or 0 if that message has one already. It belongs to whoever owns the
        conversation (the start-up repair serves every user)."""
        return self.rows.add_exchange(companion_id, conversation_id, reply_id, asked, text, created_at,
                                      source)

    def add_fact(self, companion_id: str, text: str, pinned: bool = False) -> Memory:
        return self.get(self.rows.add_fact(companion_id, text, pinned))

    def edit(self, memory_id: int, text: str | None = None, pinned: bool | None = None) -> Memory | None:
        memory = self.get(memory_id)
        if memory is None:
            return None
        if self.rows.edit(memory, text, pinned):
            self._drop_vectors(memory.companion_id, [memory_id])
        return self.get(memory_id)

    def delete(self, memory_id: int) -> bool:
        memory = self.get(memory_id)
        if memory is None:
            return False
        self._drop_vectors(memory.companion_id, [memory_id])
        self.rows.delete(memory_id)
        return True

    def replace_reply(self, old_id: int, new_id: int, new_text: str,
                      renamed: tuple[str, str] | None = None) -> bool:
        """A reply made again (new_id) takes the place of old_id, which is deleted, in one
        transaction. The old reply's memory moves to the new one with its id, pin and the user's
        edits; its words take the new reply's where they still end with the old one's (an edit
        of the reply's part is kept as it is). A memory the user deleted stays deleted. False if
        the old reply had no memory and was not forgotten: the caller remembers the new one.
        `renamed`: a group chat's reply said again by another member (old name, new name)."""
        replaced = self.rows.replace_reply(old_id, new_id, new_text, renamed)
        if replaced is None:
            return False
        reworded, had_memory, forgotten = replaced
        for companion_key, memory_id in reworded:
            self._drop_vectors(companion_key, [memory_id])
        return had_memory or forgotten

    def forget_conversation(self, conversation_id: str) -> bool:
        """Delete a conversation with its messages, its memories and their vectors."""
        found = self.rows.conversation_memories(conversation_id)
        if found is None:
            return False
        self._drop_vectors(*found)
        self.rows.delete_conversation(conversation_id)
        return True

    # -- the index ---------------------------------------------------------------------

    def index_pending(self, progress: Progress | None = None, batch: int = 256,
                      limit: int | None = None, imported: bool = True, mine: bool = False) -> int:
        """Embed memories not yet in the index (all, or the oldest `limit`; without `imported`,
        those an import brought are left to it; with `mine`, this user's only, so that a
        member's fact or edit never waits behind another member's import); returns how many.

        The lock is held a batch at a time, so two indexers (an import's, the replies') take
        turns instead of one waiting minutes for the other."""
        total = self.rows.pending_count(imported, mine)
        if progress and total:
            progress(0, total)   # the stage has begun (an import's rows are in)
        done = 0
        while limit is None or done < limit:
            with self._index_lock:
                rows = self.rows.pending(batch if limit is None else min(batch, limit - done), imported, mine)
                if not rows:
                    break
                self.rows.set_chunks(self._embed(rows, self.index_embedder, self.generation))
                done += len(rows)
                if progress:
                    progress(done, total)
        return done

    def _embed(self, rows, embedder: AnyEmbedder, generation: int) -> dict[int, int]:
        """Embed memory rows (anyone's) into a generation's collections; {id: vectors}. Each
        vector's metadata holds a hash of the text it was made from, by which a re-embedding
        knows what it has done (a memory edited since has another)."""
        words = self._users_words(rows)
        # (row, piece number, its text, whether it is the user's own words)
        pieces = [(row, i, piece, part) for row in rows for i, (piece, part) in enumerate(
            [(c, "text") for c in embedder.chunks(row["text"])]
            + [(c, "words") for c in (embedder.chunks(words[row["id"]]) if row["id"] in words else [])])]
        vectors = embedder.embed([piece for _, _, piece, _ in pieces])
        by_collection: dict[str, list] = {}
        for (row, i, _, part), vector in zip(pieces, vectors, strict=True):
            collection = self.collection(row["companion_id"], row["user_id"], generation)
            by_collection.setdefault(collection.name, []).append((row, i, part, vector))
        for name, items in by_collection.items():
            self._collections[name].upsert(
                ids=[f"{row['id']}:{i}" for row, i, _, _ in items],
                embeddings=[vector for *_, vector in items],
                metadatas=[{"memory_id": row["id"], "conversation_id": row["conversation_id"] or "",
                            "kind": row["kind"], "part": part, "sha": text_hash(row["text"])}
                           for row, _, part, _ in items])
            if name in self._mirrors:
                self._mirrors[name].add([row["id"] for row, *_ in items], [vector for *_, vector in items],
                                        [row["created_at"] for row, *_ in items],
                                        [part == "words" for _, _, part, _ in items])
        counts: dict[int, int] = {}
        for row, *_ in pieces:
            counts[row["id"]] = counts.get(row["id"], 0) + 1
        return counts

    def _users_words(self, rows) -> dict[int, str]:
        """{memory id: the user's own messages in it}, embedded as a piece of their own: the
        companion's lines ("Oh, tell me more!") pulled a memory's one vector away from what the
        user said (see bench/memory_quality.py). Only messages the memory's text holds count,
        so a deleted neighbour's words never come back through another memory."""
        exchanges = {row["id"]: row["text"] for row in rows if row["kind"] == "exchange"}
        if not exchanges:
            return {}
        return {i: "\n".join(lines) for i, lines in self.rows.users_words(exchanges).items()}

    def index_is_consistent(self) -> bool:
        """Does every user's every collection hold exactly the vectors SQLite says it should?"""
        for row in self.rows.chunks_by_collection():
            if self.collection(row["companion_id"], row["user_id"]).count() != row["n"]:
                return False
        return True

    def rebuild(self, progress: Progress | None = None, everyone: bool = False) -> int:
        """Recreate the user's index (or, with everyone, every user's) from SQLite."""
        prefix = self._prefix() + ("u-" if everyone else f"u-{self.user}--c-")
        with self._index_lock:
            for collection in self.client.list_collections():
                if collection.name.startswith(prefix):  # a shared Chroma server holds others' too
                    self.client.delete_collection(collection.name)
                    self._collections.pop(collection.name, None)
                    self._mirrors.pop(collection.name, None)
            self.rows.unindex(everyone)
        done = self.index_pending(progress, mine=not everyone)
        return done if everyone else self.rows.indexed_count()

    # -- reads -------------------------------------------------------------------------

    def get(self, memory_id: int) -> Memory | None:
        return self.rows.get(memory_id)

    def list(self, companion_id: str, limit: int = 50, offset: int = 0,
             kind: Kind | None = None) -> list[Memory]:
        return self.rows.list(companion_id, limit, offset, kind)

    def texts(self, memory_ids: list[int]) -> dict[int, tuple[str, float]]:
        """{id: (text, created_at)} of those of the user's memories that still exist."""
        return {i: (r["text"], r["created_at"])
                for i, r in self.rows.by_ids(list(dict.fromkeys(memory_ids))).items()}

    def search(self, companion_id: str, query: str, k: int = 10, now: float | None = None,
               distinct: bool = False) -> list[Recalled]:
        """The k memories that best answer `query` (recall's score), best first, no threshold;
        `distinct`: without near copies, as recall ranks them (every copy is found otherwise:
        a person looking for what to delete wants them all)."""
        return [c for c, _ in self._candidates(companion_id, query, k, now or time.time(), distinct=distinct)]

    def recall(self, companion_id: str, query: str, skip_asked: set[str] = frozenset(),
               count_tokens: Callable[[str], int] = lambda text: len(text.encode()) // 3 + 1,
               now: float | None = None, skip_ids: set[int] = frozenset(),
               context: str = "") -> list[Recalled]:
        """The memories worth putting in the prompt for `query` (with `context`, the
        companion's last reply, in what is embedded), best first."""
        now, settings = now or time.time(), self.settings
        if settings.top_k == 0:  # recall is off: not even the question is embedded
            return []
        candidates = self._candidates(companion_id, query, settings.top_k * 4, now, context, distinct=True)
        # A reranker reads no dates: for a question about a time, the span it names decides
        # (reordered, relative-time questions lost their evidence: 0.7 -> 0.2, bench/RESULTS.md).
        if self.reranker and not any(c.why and c.why.window for c, _ in candidates):
            self._rerank(query, relevant(candidates, settings)[:settings.rerank_top])
        return choose(candidates, settings, now, skip_asked, skip_ids, count_tokens)

    def _rerank(self, query: str, candidates: list[tuple[Recalled, str | None]]) -> None:
        """The reranker's scores, in each candidate's why (none where it fell back)."""
        assert self.reranker is not None
        scores = self.reranker.scores(query, [c.text for c, _ in candidates])
        for (candidate, _), score in zip(candidates, scores or [], strict=False):
            if candidate.why:
                candidate.why.reranked = round(score, 4)

    def drop_companion(self, companion_key: str) -> int:
        """Delete every user's collection of a companion that is being deleted; returns how many."""
        dropped = 0
        with self._index_lock:
            for collection in self.client.list_collections():
                # [gN-]u-USER--c-KEY, and user names hold no "--": the first "--c-" ends the user.
                name = GENERATION.sub("", collection.name)
                if name.startswith("u-") and name[2:].partition("--c-")[2] == companion_key:
                    self.client.delete_collection(collection.name)
                    self._collections.pop(collection.name, None)
                    self._mirrors.pop(collection.name, None)
                    dropped += 1
        return dropped

    def _drop_vectors(self, companion_id: str, memory_ids: list[int]) -> None:
        if not memory_ids:
            return
        for generation in {self.generation, self.building} - {None}:
            collection = self.collection(companion_id, generation=generation)
            collection.delete(where={"memory_id": {"$in": memory_ids}})
            if collection.name in self._mirrors:
                self._mirrors[collection.name].drop(memory_ids)

    def _mirror(self, companion_id: str) -> Mirror:
        collection = self.collection(companion_id)
        if collection.name not in self._mirrors:
            mirror = Mirror()
            said = self.rows.said_at(companion_id)
            # In pages: one get() of a large collection exceeds SQLite's variable limit.
            for offset in range(0, collection.count(), 5000):
                page = collection.get(include=["embeddings", "metadatas"], limit=5000, offset=offset)
                ids = [m["memory_id"] for m in page["metadatas"]]
                # (an index made before pieces were named holds none: its pieces read as the text)
                mirror.add(ids, page["embeddings"], [said.get(i, 0.0) for i in ids],
                           [m.get("part") == "words" for m in page["metadatas"]])
            self._mirrors[collection.name] = mirror
        return self._mirrors[collection.name]

    def _candidates(self, companion_id: str, query: str, k: int, now: float, context: str = "",
                    distinct: bool = False) -> list[tuple[Recalled, str | None]]:
        """The k memories that best answer `query`, best first, as (memory, what its user
        asked). With `distinct`, a near copy of a better one is left out: the same words said
        again, or nearly the same meaning (settings.near_copy). People repeat themselves ("I
        made soup for dinner", a dozen times a year), and the copies took the places of what
        was said once (bench/memory_quality.py: recall@10 0.86 against 0.96 without them)."""
        mirror = self._mirror(companion_id)
        if mirror.size == 0:
            return []
        asked = self._asked_time(mirror, query, context, now)
        # One pool whatever k is (up to POOL / 2): scored exactly, k=5 is the top of k=20. A pool
        # of copies (or of deleted rows) that holds fewer than k grows until it holds them.
        pool = max(POOL, k * 2)
        while True:
            found = self._best(mirror, asked, pool, k, distinct)
            if len(found) >= k or pool >= mirror.size:
                return found
            pool *= 4

    def _asked_time(self, mirror: Mirror, query: str, context: str, now: float) -> Asked:
        """The question's vector, and the span of time it asks about with the bonus for being
        said in it. A span it names ("last week"): time_bonus. One relative to an event it names
        ("the week before I went to Lisbon"), dated by the memory that best tells of the event,
        if one does (over the threshold): relative_bonus, the span being all such a question is
        about."""
        text = self._query_text(query, context)
        named = asked_span(query, datetime.fromtimestamp(now)) if self.settings.time_bonus else None
        relative = relative_to(query) if self.settings.time_bonus and not named else None
        vectors = [np.asarray(v, dtype=np.float32)
                   for v in self.embedder.embed([text] + ([relative.event] if relative else []))]
        if named:
            start, end = named
            return Asked(vectors[0], (start.timestamp(), end.timestamp()), self.settings.time_bonus,
                         f"said from {start:%Y-%m-%d} to {end:%Y-%m-%d}, the time the question names")
        if relative is None:
            return Asked(vectors[0])
        found = mirror.top(vectors[1], 1)
        row = self.rows.by_ids([found[0].memory_id]).get(found[0].memory_id) if found and \
            found[0].score >= self.settings.threshold else None
        if row is None:   # the event was never told
            return Asked(vectors[0])
        side = (f"{-relative.start_days:g} days before" if relative.end_days <= 0
                else f"{relative.end_days:g} days after")
        event = row["text"].split("\n")[0][:80]
        return Asked(vectors[0], relative.span(row["created_at"]), self.settings.relative_bonus,
                     f"said in the {side} {event!r} ({datetime.fromtimestamp(row['created_at']):%Y-%m-%d}), "
                     "the event the question names")

    def _query_text(self, query: str, context: str) -> str:
        """What the question is embedded as: its last settings.query_tokens tokens, after as
        many of the context's last as the rest of that budget holds. Embedding costs the CPU
        about 0.3 ms a token (one thread, beside the engine): a burst of long messages, each
        embedded whole (up to the model's 256), queued replies for a second and more
        (bench/serve_overhead.py --memories); and the end of a long message is what it asks now.
        A short answer ("yes, that one") still brings the companion's last words with it."""
        budget = self.settings.query_tokens
        asked, used = self.embedder.tail(query.strip(), budget)
        before, _ = self.embedder.tail(context.strip(), budget - used)
        return f"{before}\n{asked}".strip()

    def _best(self, mirror: Mirror, asked: Asked, pool: int, k: int, distinct: bool
              ) -> list[tuple[Recalled, str | None]]:
        best: dict[int, Hit] = {}
        for hit in mirror.top(asked.vector, pool, asked.span, asked.bonus):
            if hit.memory_id not in best or hit.score > best[hit.memory_id].score:
                best[hit.memory_id] = hit
        # Said again elsewhere: known from the pool, which is the same for every k that needs no
        # more (so a search for 5 is the top of a search for 20); recall scores it less (choose).
        echoed = self._echoed(best)
        # SQLite decides what exists (and whose it is): a vector whose row is gone is never recalled.
        # The ids are looked up by key, best first, k at a time (a pool's every row cost 2 ms at
        # 100k memories).
        order = sorted(best, key=lambda i: (-best[i].score, i))
        scored: list[tuple[Recalled, str | None]] = []
        kept, asked_before = np.zeros((0, len(asked.vector)), dtype=np.float32), set()
        for start in range(0, len(order), k):
            if len(scored) >= k:
                break
            ids = order[start:start + k]
            rows = self.rows.by_ids(ids)
            for i in ids:
                if i not in rows:
                    continue
                row, hit = rows[i], best[i]
                if distinct:
                    if row["asked"] in asked_before or (kept @ hit.vector > self.settings.near_copy).any():
                        continue
                    kept = np.vstack([kept, hit.vector])
                    if row["asked"]:
                        asked_before.add(row["asked"])
                part = "your words" if hit.words else "the fact" if row["kind"] == "fact" else "the exchange"
                why = Why(matched=part, similarity=round(hit.similarity, 4),
                          window=asked.about if hit.in_span else None, said_again=i in echoed)
                recalled = Recalled(id=i, conversation_id=row["conversation_id"], text=row["text"],
                                    score=round(hit.score, 4), kind=row["kind"], pinned=bool(row["pinned"]),
                                    created_at=row["created_at"], why=why)
                scored.append((recalled, row["asked"]))
        return scored[:k]   # in `order`: sorting again by the rounded score could swap near-ties

    def _echoed(self, best: dict[int, Hit]) -> set[int]:
        """The candidates with a near copy among the others: said again and again ("the bus was
        late"), which tells less than what was said once. Among the best POOL only: the same for
        every k, and a pool widened to thousands (copies everywhere) costs no more. In torch:
        numpy's BLAS threads fought the embedder's for the cores after it (the next question
        took 43 ms to embed instead of 14; recall's p95 at 100k memories was 110 ms, bench/memory.py)."""
        import torch

        found = sorted(best, key=lambda i: (-best[i].score, i))[:POOL]
        matrix = torch.from_numpy(np.stack([best[i].vector for i in found]))
        similar = matrix @ matrix.T
        similar.fill_diagonal_(0)
        echoes = (similar > self.settings.near_copy).sum(dim=1).tolist()
        return {i for i, n in zip(found, echoes, strict=True) if n}


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Asked:
    """What recall asks with: the question's vector, and the span of time it asks about (start,
    end timestamps) with the bonus for being said in it, and that span in words."""

    vector: np.ndarray
    span: tuple[float, float] | None = None
    bonus: float = 0.0
    about: str | None = None
