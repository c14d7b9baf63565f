"""Long-term memory speed: recall latency at 1k, 10k and 100k memories, insert throughput,
what recall adds to preparing a reply, and the start-up check for unremembered messages.

Recall (our exact search over the mirrored vectors, plus SQLite) is compared in the same
run with Chroma's own HNSW query on the same vectors. The 10k/100k collections hold
synthetic unit vectors clustered like chat (embedding 100k texts takes ~7 min on 2 cores);
queries are real embeddings of real questions, and insert throughput uses the real embedder.
The start-up check (memory.remember.repair) runs over --conversations conversations of four
exchanges each, against the same database without the memories_by_conversation index (the
schema before it).

    .venv/bin/python bench/memory.py [--sizes 1000 10000 100000] [--queries 200] [--conversations 5000]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memory.embedder import Embedder  # noqa: E402
from memory.remember import repair  # noqa: E402
from memory.store import MemoryStore  # noqa: E402
from store.companions import Companion, CompanionStore  # noqa: E402
from store.db import Database  # noqa: E402

QUESTIONS = ["Where is my sister's wedding?", "What did I cook last week?", "Do I have allergies?",
             "What film did I watch?", "How was work?", "Where did I go running?",
             "What is my cat called?", "When is my birthday?"]


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def fill(store: MemoryStore, n: int, dim: int, rng: np.random.Generator) -> None:
    """n memories: rows in SQLite and clustered unit vectors in Chroma, two per memory as
    indexing makes them (the text, and the user's own words)."""
    centres = rng.standard_normal((64, dim)).astype(np.float32)
    now = time.time()
    with store.db.transaction() as conn:
        conn.executemany(
            "INSERT INTO memories (companion_id, kind, text, asked, source, created_at, updated_at, chunks)"
            " VALUES ('ember', 'exchange', ?, ?, 'imported', ?, ?, 2)",
            [(f"User: note {i}\nEmber: reply {i}", f"note {i}", now - i * 60, now) for i in range(n)])
    ids = [r[0] for r in store.db.query("SELECT id FROM memories ORDER BY id")]
    collection = store.collection("ember")
    for start in range(0, n, 5000):
        block = centres[rng.integers(0, 64, min(5000, n - start))]
        block = block + 0.35 * rng.standard_normal(block.shape).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        words = block + 0.2 * rng.standard_normal(block.shape).astype(np.float32)
        words /= np.linalg.norm(words, axis=1, keepdims=True)
        batch = ids[start:start + len(block)]
        for piece, vectors in enumerate((block, words)):
            collection.add(ids=[f"{i}:{piece}" for i in batch], embeddings=vectors,
                           metadatas=[{"memory_id": i, "conversation_id": "", "kind": "exchange"}
                                      for i in batch])


def startup_check(embedder: Embedder, conversations: int) -> None:
    """Seconds the start-up repair takes to find that nothing needs remembering."""
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(Path(tmp) / "h.db")
        CompanionStore(db).put(Companion(id="ember", name="Ember"), "api")
        with db.transaction() as conn:
            for n in range(conversations):
                conn.execute("INSERT INTO conversations (id, companion_id, source, created_at, "
                             "updated_at, user_id) VALUES (?, 'ember', 'live', 0, 0, 'local')", (f"c{n}",))
                for t in range(4):
                    for role, text in (("user", f"note {n}.{t}"), ("assistant", "I see.")):
                        reply = conn.execute(
                            "INSERT INTO messages (conversation_id, role, content, created_at, chain) "
                            "VALUES (?, ?, ?, 0, 'x')", (f"c{n}", role, text)).lastrowid
                    conn.execute(
                        "INSERT INTO memories (companion_id, conversation_id, reply_id, kind, text, source, "
                        "created_at, updated_at) VALUES ('ember', ?, ?, 'exchange', ?, 'live', 0, 0)",
                        (f"c{n}", reply, f"User: note {n}.{t}\nEmber: I see."))
        store = MemoryStore(db, Path(tmp) / "index", embedder)
        seconds = []
        for _ in ("indexed", "baseline"):
            start = time.perf_counter()
            assert repair(store) == 0
            seconds.append(time.perf_counter() - start)
            db.conn.execute("DROP INDEX IF EXISTS memories_by_conversation")
        print(f"start-up check, {conversations} conversations ({4 * conversations} memories): "
              f"{seconds[0]:.2f} s | without the conversation index {seconds[1]:.2f} s   "
              f"ratio {seconds[0] / seconds[1]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--conversations", type=int, default=5000, help="for the start-up check")
    args = parser.parse_args()
    embedder = Embedder()
    rng = np.random.default_rng(0)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.queries)]
    vectors = embedder.embed(QUESTIONS)
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; embedder all-MiniLM-L6-v2")

    # Insert throughput with the real embedder: rows, embedding and Chroma together.
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(Path(tmp) / "h.db")
        CompanionStore(db).put(Companion(id="ember", name="Ember"), "api")
        store = MemoryStore(db, Path(tmp) / "index", embedder)
        for i in range(1000):
            store.add_fact("ember", f"Day {i}: I walked the dog and then {QUESTIONS[i % 8].lower()}")
        start = time.perf_counter()
        store.index_pending()
        rate = 1000 / (time.perf_counter() - start)
        print(f"insert: {rate:.0f} memories/s (embedding + Chroma + SQLite, 1000 short memories)")

    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            db = Database(Path(tmp) / "h.db")
            CompanionStore(db).put(Companion(id="ember", name="Ember"), "api")
            store = MemoryStore(db, Path(tmp) / "index", embedder)
            fill(store, size, len(vectors[0]), rng)
            store.recall("ember", "warm up")  # loads the mirror once
            ours = []
            for q in questions:
                t = time.perf_counter()
                store.recall("ember", q)
                ours.append((time.perf_counter() - t) * 1000)
            collection = store.collection("ember")
            hnsw = []
            for i in range(len(questions)):
                t = time.perf_counter()
                vector = embedder.embed([questions[i]])[0]
                collection.query(query_embeddings=[vector], n_results=48,
                                 include=["distances", "metadatas", "embeddings"])
                hnsw.append((time.perf_counter() - t) * 1000)
            p50, p95 = statistics.median(ours), pct(ours, 95)
            print(f"{size:>7} memories: recall p50 {p50:5.1f} ms  p95 {p95:5.1f} ms   | Chroma HNSW "
                  f"query p50 {statistics.median(hnsw):5.1f} ms  p95 {pct(hnsw, 95):5.1f} ms   "
                  f"ratio p95 {p95 / pct(hnsw, 95):.2f}   (goal p95 <= 25 ms at 100k)")
    embed_only = []
    for q in questions[:50]:
        t = time.perf_counter()
        embedder.embed([q])
        embed_only.append((time.perf_counter() - t) * 1000)
    print(f"of which embedding the question: p50 {statistics.median(embed_only):.1f} ms")
    startup_check(embedder, args.conversations)


if __name__ == "__main__":
    main()
