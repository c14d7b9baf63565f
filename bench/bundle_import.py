"""Other members' replies and memory edits while one member imports a large bundle.

First, without a server: a generated bundle of --conversations conversations (1 to 3
exchanges each, a memory per reply, a few pinned facts) is imported into fresh databases,
once in our batches and once as one batch for everything (the old single transaction,
nearly), while a second thread commits one small write after another; the longest and p95
wait of those writes are printed for both: what one import costs every other writer.

Then `homefire serve` on the embedded model, in two phases with members of their own:
  1. baseline: --users members stream replies through the OpenAI route and --editors members
     add and edit memories (`POST .../memories`, `PATCH /memories/ID`), for --seconds;
  2. import: the same load, while one more member uploads the bundle (`POST /api/v1/bundles`);
     the phase lasts until every row of it is written (watched in the database), at least
     --seconds. Embedding its memories for the vector index comes after that, and is left out:
     it takes the CPU, not the database, and takes its turns with the others' a batch at a time
     (memory/store.py, index_pending).
For each phase: TTFT p95, the p95 of the wait before a reply's finish chunk (the reply's
commit comes first), the p95 of a memory edit, and the server's peak RSS. Prints the ratio
of each p95 (import / baseline; goal <= 1.5) and how much the server's RSS grew.

    .venv/bin/python bench/bundle_import.py [--users 6] [--editors 2] [--conversations 60000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.import_commit import WORDS, Phase, stream_replies  # noqa: E402
from bench.serving import homefire_server  # noqa: E402
from serve import bundle  # noqa: E402
from serve.default_model import MODEL_NAME  # noqa: E402
from store.cards import card_json  # noqa: E402
from store.companions import Companion, CompanionStore  # noqa: E402
from store.db import Database  # noqa: E402
from store.users import Users  # noqa: E402

WREN = Companion(id="wren", name="Wren", description="A wren who remembers.")


def generate(path: Path, conversations: int, seed: int = 1) -> dict:
    """A bundle of `conversations` short conversations with a memory per reply; returns its counts."""
    rng = random.Random(seed)
    history, memories = [], []
    message_id = memory_id = 0
    now = time.time() - 86400 * 365
    for n in range(conversations):
        at = now + n * 60
        messages = []
        for t in range(rng.randint(1, 3)):
            said = f"{' '.join(rng.choices(WORDS, k=12))} ({n}.{t})"
            reply = " ".join(rng.choices(WORDS, k=20))
            for role, text in (("user", said), ("assistant", reply)):
                message_id += 1
                messages.append({"id": message_id, "role": role, "content": text, "created_at": at + t})
            memory_id += 1
            memories.append({"id": memory_id, "kind": "exchange", "text": f"User: {said}\nWren: {reply}",
                             "asked": said, "source": "imported", "created_at": at + t, "updated_at": at + t,
                             "conversation_id": f"c{n}", "reply_id": message_id})
        history.append({"id": f"c{n}", "title": None, "source": "imported", "created_at": at,
                        "updated_at": at + 3, "messages": messages})
    for n in range(20):
        memory_id += 1
        said = " ".join(rng.choices(WORDS, k=6))
        memories.append({"id": memory_id, "kind": "fact", "text": f"fact {n}: {said}", "source": "user",
                         "pinned": n < 3, "created_at": now, "updated_at": now})
    members = {"card.json": card_json(WREN),
               "history.jsonl": b"".join(json.dumps(c).encode() + b"\n" for c in history),
               "memories.jsonl": b"".join(json.dumps(m).encode() + b"\n" for m in memories)}
    counts = {"conversations": len(history), "messages": message_id, "memories": len(memories), "adapters": 0}
    manifest = {"schema": bundle.SCHEMA, "homefire": "bench", "created_at": time.time(),
                "companion": {"id": WREN.id, "name": WREN.name},
                "base_model": {"id": MODEL_NAME, "sha256": None},
                "embedder": bundle.DEFAULT_EMBEDDER, "sampling": WREN.sampling.model_dump(),
                "adapter_in_use": None, "counts": counts,
                "members": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()}}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr("manifest.json", json.dumps(manifest))
    return counts


def write_waits(path: Path, data_dir: Path) -> dict:
    """Import the bundle into fresh databases, in our batches and in one batch, while another
    thread commits a one-row write after another; how long those writes waited."""
    waits = {}
    for name, batch in (("batches", bundle.COPY_BATCH), ("one_batch", 10**9)):
        data = data_dir / f"waits-{name}"
        db = Database(data / "homefire.db")
        CompanionStore(db).put(Companion(id="owl", name="Owl"), "api")
        done, latencies = threading.Event(), []

        def other_writer(db: Database = db, done: threading.Event = done, latencies: list = latencies
                         ) -> None:
            while not done.is_set():
                started = time.perf_counter()
                with db.transaction() as conn:
                    conn.execute("UPDATE companions SET updated_at = ? WHERE id = 'owl'", (time.time(),))
                latencies.append(time.perf_counter() - started)
                time.sleep(0.002)

        writer = threading.Thread(target=other_writer)
        setup = bundle.Setup(MODEL_NAME, None, bundle.DEFAULT_EMBEDDER)
        started = time.perf_counter()
        with bundle.read_bundle(path) as read:
            read_s = time.perf_counter() - started
            writer.start()
            started = time.perf_counter()
            bundle.import_bundle(db, data, read, "local", None, setup, batch=batch)
            write_s = time.perf_counter() - started
        done.set()
        writer.join()
        waits[name] = {"read_s": read_s, "write_s": write_s, "writes": len(latencies),
                       "longest_wait_ms": 1000 * max(latencies),
                       "p95_wait_ms": 1000 * statistics.quantiles(latencies, n=20)[18]}
        db.close()
    return waits


class Edits:
    def __init__(self) -> None:
        self.latencies: list[tuple[float, float]] = []   # (started, seconds)
        self.errors: list[str] = []

    def p95_ms(self) -> float:
        took = [s for _, s in self.latencies]
        return 1000 * statistics.quantiles(took, n=20)[18] if len(took) >= 2 else 0


async def edit_memories(client: httpx.AsyncClient, edits: Edits, stop: asyncio.Event) -> None:
    """Add a fact, then edit it, over and over, each timed."""
    n = 0
    while not stop.is_set():
        n += 1
        started = time.perf_counter()
        added = await client.post("/api/v1/companions/ember/memories", json={"text": f"I like {n} plums"})
        if added.status_code != 201:
            edits.errors.append(f"{added.status_code}: {added.text[:200]}")
            continue
        edits.latencies.append((started, time.perf_counter() - started))
        started = time.perf_counter()
        edited = await client.patch(f"/api/v1/memories/{added.json()['id']}",
                                    json={"text": f"I like {n} pears"})
        if edited.status_code != 200:
            edits.errors.append(f"{edited.status_code}: {edited.text[:200]}")
            continue
        edits.latencies.append((started, time.perf_counter() - started))


def upload(url: str, key: str, path: Path, info: dict) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=None) as client:
        try:
            r = client.post("/api/v1/bundles", content=path.read_bytes(), params={"filename": path.name})
        except httpx.HTTPError as err:   # the server stopped while the memories were being embedded
            info["answer"] = repr(err)
            return
        info["answer"] = f"{r.status_code} {r.text[:500]}"


def written(db_path: Path, member: str, memories: int) -> bool:
    """Whether all of the bundle's memories are in the member's rows (the last thing written)."""
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        count = conn.execute("SELECT COUNT(*) FROM memories WHERE user_id = ?", (member,)).fetchone()[0]
    return count >= memories


async def watch_rss(pid: int, stop: asyncio.Event, peak: list[int]) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        await asyncio.sleep(0.1)


async def run_phase(url: str, pid: int, keys: list[str], editors: int, seconds: float, max_tokens: int,
                    importing: tuple[str, Path, Callable[[], bool]] | None) -> tuple[Phase, Edits, dict]:
    phase, edits, stop, info, peak = Phase(), Edits(), asyncio.Event(), {}, [0]
    clients = [httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {k}"}, timeout=600)
               for k in keys]
    tasks = [asyncio.create_task(edit_memories(c, edits, stop)) for c in clients[:editors]]
    tasks += [asyncio.create_task(stream_replies(c, i, phase, stop, max_tokens))
              for i, c in enumerate(clients[editors:])]
    watcher = asyncio.create_task(watch_rss(pid, stop, peak))
    started = time.perf_counter()
    if importing:
        key, path, done = importing
        threading.Thread(target=upload, args=(url, key, path, info), daemon=True).start()
        while not done():
            if "answer" in info:
                raise SystemExit(f"the import failed: {info['answer']}")
            await asyncio.sleep(0.5)
        info["written_s"] = time.perf_counter() - started
    await asyncio.sleep(max(0.0, seconds - (time.perf_counter() - started)))
    stop.set()
    await asyncio.gather(*tasks, watcher)
    for client in clients:
        await client.aclose()
    info["peak_rss"] = peak[0]
    return phase, edits, info


def finish_wait_p95(phase: Phase) -> float:
    """p95 of the gap before each reply's finish chunk (its commit happens in it), in ms."""
    gaps = [s.chunks[-1] - s.chunks[-2] for s in phase.streams if s.final and len(s.chunks) >= 2]
    return 1000 * statistics.quantiles(gaps, n=20)[18] if len(gaps) >= 2 else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=6, help="members streaming replies")
    parser.add_argument("--editors", type=int, default=2, help="members adding and editing memories")
    parser.add_argument("--conversations", type=int, default=60000, help="conversations in the bundle")
    parser.add_argument("--seconds", type=float, default=30, help="shortest length of each phase")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per reply")
    parser.add_argument("--data-dir", type=Path, help="data directory (default: a temporary one)")
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="homefire-bundle-import-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "wren.homefire"
    counts = generate(path, args.conversations)
    print(f"bundle: {counts['conversations']} conversations, {counts['messages']} messages, "
          f"{counts['memories']} memories, {path.stat().st_size >> 20} MB", flush=True)
    waits = write_waits(path, data_dir)
    for name, w in waits.items():
        print(f"written as {name}: read {w['read_s']:.1f} s, written {w['write_s']:.1f} s; another "
              f"writer's {w['writes']} writes waited p95 {w['p95_wait_ms']:.0f} ms, longest "
              f"{w['longest_wait_ms']:.0f} ms", flush=True)
    members = 2 * (args.users + args.editors)
    users = Users(Database(data_dir / "homefire.db"))
    keys = [users.add(f"member{i:02d}") for i in range(members + 1)]
    config = f"companions_dir: {REPO / 'configs' / 'companions'}\nlimits:\n  requests_per_minute: 0\n"
    with homefire_server(data_dir, config) as (url, _):
        pid = json.loads((data_dir / "run" / "server.json").read_text())["pid"]
        half = members // 2
        base, base_edits, base_info = asyncio.run(
            run_phase(url, pid, keys[:half], args.editors, args.seconds, args.max_tokens, None))
        importer = f"member{members:02d}"
        loaded, edits, info = asyncio.run(
            run_phase(url, pid, keys[half:members], args.editors, args.seconds, args.max_tokens,
                      (keys[-1], path, lambda: written(data_dir / "homefire.db", importer,
                                                       counts["memories"]))))
    b, w = base.figures(), loaded.figures()
    result = {"waits": waits, "written_s": info["written_s"]}
    for name, phase, figures, took, phase_info in (("baseline", base, b, base_edits, base_info),
                                                   ("import", loaded, w, edits, info)):
        result[name] = figures | {"finish_wait_p95_ms": finish_wait_p95(phase), "edit_p95_ms": took.p95_ms(),
                                  "edits": len(took.latencies), "edit_errors": len(took.errors),
                                  "peak_rss_mb": phase_info["peak_rss"] >> 20}
    for name in ("ttft_p95_ms", "finish_wait_p95_ms", "edit_p95_ms"):
        result[f"{name.removesuffix('_ms')}_ratio"] = \
            result["import"][name] / max(result["baseline"][name], 1e-9)
    print(f"\nmachine: {platform.machine()}, {platform.processor() or 'cpu'}; model {MODEL_NAME}; "
          f"{args.users} members streaming {args.max_tokens}-token replies, {args.editors} editing memories")
    for name, f in (("no import", result["baseline"]), ("bundle import", result["import"])):
        print(f"{name:>14}: {f['replies']:4d} replies ({f['errors']} errors), TTFT p95 "
              f"{f['ttft_p95_ms']:6.0f} ms, wait before the finish chunk p95 "
              f"{f['finish_wait_p95_ms']:5.0f} ms; "
              f"{f['edits']} memory writes ({f['edit_errors']} errors) p95 {f['edit_p95_ms']:5.0f} ms; "
              f"server peak RSS {f['peak_rss_mb']} MB")
    print(f"the bundle's rows were all written {result['written_s']:.1f} s after the upload began")
    print(f"p95 ratios (import / none): TTFT {result['ttft_p95_ratio']:.2f}, finish wait "
          f"{result['finish_wait_p95_ratio']:.2f}, memory write {result['edit_p95_ratio']:.2f}   "
          "(goal <= 1.5)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
