"""What keeping a companion costs: bundles and backups, each against the plain way in the same run.

Without a server, a data directory is generated: one companion with --conversations
conversations of 10 messages, a memory per reply plus 500 facts, and one real LoRA adapter
(rank 16 on the embedded model).

bundle: `export_bundle` against a plain zip of the same files (sqlite3's rows as JSONL, the
adapter's files; no checksums, no manifest), and `import_bundle` (every checksum verified
first, then one transaction) into an empty database against the chat-export importer
bringing the same conversations in from plain JSONL (what `homefire import` does).

backup: `serve.backup.backup` (SQLite's online backup, integrity check, checksums) against
a file copy of the database (unsafe while a server writes; the floor), and the p95 time
of a writer's commits (one message each, as replies are) while the backup runs against
the same writer alone.

    .venv/bin/python bench/keep.py [--conversations 5000]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memory.importer import Importer  # noqa: E402
from memory.imports import open_export  # noqa: E402
from serve import backup, bundle  # noqa: E402
from serve.default_model import MODEL_NAME, ensure_default_model  # noqa: E402
from store import adapters  # noqa: E402
from store.companions import Companion, CompanionStore  # noqa: E402
from store.db import Database  # noqa: E402
from store.history import History, chain_hash, chain_root  # noqa: E402
from store.users import Users  # noqa: E402

WORDS = "the garden rain piano wedding soup stars train sister film morning coffee walk letter".split()


def generate(data: Path, conversations: int, model_dir: Path) -> list[list[tuple[str, str]]]:
    rng = random.Random(1)
    db = Database(data / "homefire.db")
    Users(db).ensure_local("bench-key-0123456789abcdefghijkl")
    CompanionStore(db).put(Companion(id="kit", name="Kit"), "api")
    said, now = [], time.time() - 86400 * 365
    with db.transaction() as conn:
        for c in range(conversations):
            cid = f"{c:032x}"
            conn.execute("INSERT INTO conversations (id, companion_id, title, source, created_at, "
                         "updated_at, user_id) VALUES (?, 'kit', ?, 'live', ?, ?, 'local')",
                         (cid, f"Chat {c}", now, now))
            previous, turns = chain_root("kit"), []
            for m in range(10):
                role = "user" if m % 2 == 0 else "assistant"
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))
                previous = chain_hash(previous, role, text)
                cur = conn.execute("INSERT INTO messages (conversation_id, role, content, created_at, "
                                   "chain) VALUES (?, ?, ?, ?, ?)", (cid, role, text, now + m, previous))
                turns.append((role, text))
                if role == "assistant":
                    conn.execute("INSERT INTO memories (user_id, companion_id, conversation_id, reply_id, "
                                 "kind, text, asked, source, created_at, updated_at) VALUES ('local', 'kit', "
                                 "?, ?, 'exchange', ?, ?, 'live', ?, ?)",
                                 (cid, cur.lastrowid, f"User: {turns[-2][1]}\nKit: {text}", turns[-2][1],
                                  now, now))
            said.append(turns)
            now += 3600
        for f in range(500):
            conn.execute("INSERT INTO memories (user_id, companion_id, kind, text, source, created_at, "
                         "updated_at) VALUES ('local', 'kit', 'fact', ?, 'user', ?, ?)",
                         (f"fact {f}: {rng.choice(WORDS)}", now, now))
    db.close()
    from tests.support.adapters import make_adapter

    make_adapter(data / "adapters" / "kit" / "v1", model_dir, "local", seed=1)
    adapters.set_current(data, "kit", "v1")
    return said


def plain_zip(data: Path, out: Path) -> None:
    """The floor: the same rows and files in a zip, no checks."""
    db = Database(data / "homefire.db")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for table in ("conversations", "messages", "memories"):
            rows = db.query(f"SELECT * FROM {table}")
            archive.writestr(f"{table}.jsonl", "".join(json.dumps(dict(r)) + "\n" for r in rows))
        for path in (data / "adapters" / "kit" / "v1").iterdir():
            archive.write(path, f"adapters/v1/{path.name}",
                          zipfile.ZIP_STORED if path.suffix == ".safetensors" else zipfile.ZIP_DEFLATED)
    db.close()


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def bench_bundle(data: Path, said, model_dir: Path, scratch: Path) -> dict:
    setup = bundle.Setup(MODEL_NAME, adapters.Base.of(model_dir), bundle.DEFAULT_EMBEDDER)
    db = Database(data / "homefire.db")
    companion = CompanionStore(db).get("kit")
    out = scratch / "kit.homefire"
    figures = {"export": timed(lambda: bundle.export_bundle(db, data, companion, "local", out, setup,
                                                            "bench")),
               "export_plain_zip": timed(lambda: plain_zip(data, scratch / "plain.zip"))}
    figures["bundle_mib"] = out.stat().st_size / 2**20
    figures["plain_zip_mib"] = (scratch / "plain.zip").stat().st_size / 2**20
    target = scratch / "target"
    target_db = Database(target / "homefire.db")
    Users(target_db).ensure_local("bench-key-0123456789abcdefghijkl")

    def bring_in() -> None:
        bundle.import_bundle(target_db, target, bundle.read_bundle(out), "local", None, setup)

    figures["import"] = timed(bring_in)
    figures["import_again"] = timed(bring_in)   # adds nothing: matching everything
    export = scratch / "history.jsonl"
    export.write_text("".join(json.dumps({"id": f"c{i}", "messages": [{"role": r, "content": t}
                                                                       for r, t in turns]}) + "\n"
                              for i, turns in enumerate(said)))
    other = scratch / "other"
    other_db = Database(other / "homefire.db")
    Users(other_db).ensure_local("bench-key-0123456789abcdefghijkl")
    CompanionStore(other_db).put(Companion(id="kit", name="Kit"), "api")

    def chat_import() -> None:
        with open_export(str(export)) as opened:
            Importer(other_db, other / "run").run(opened, "kit", "Kit")

    figures["import_chat_export"] = timed(chat_import)
    return figures


def bench_backup(data: Path, scratch: Path) -> dict:
    figures = {"file_copy": timed(lambda: shutil.copy(data / "homefire.db", scratch / "copy.db"))}
    figures["backup"] = timed(lambda: backup.backup(data, scratch / "backups"))
    db = Database(data / "homefire.db")
    history = History(db)
    conversation = history.create_conversation("kit").id
    running = threading.Event()

    def writer(seconds: float) -> list[float]:
        waits, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end or running.is_set():
            start = time.perf_counter()
            history.append(conversation, "user", "a message while the backup runs")
            waits.append(time.perf_counter() - start)
            time.sleep(0.005)
        return waits

    alone = writer(figures["backup"] + 1)
    found: list[float] = []
    running.set()
    thread = threading.Thread(target=lambda: found.extend(writer(0)))
    thread.start()
    figures["backup_beside_writer"] = timed(lambda: backup.backup(data, scratch / "backups"))
    running.clear()
    thread.join()
    p95 = lambda xs: statistics.quantiles(xs, n=20)[18] * 1000  # noqa: E731
    figures["commit_p95_ms_alone"], figures["commit_p95_ms_during_backup"] = p95(alone), p95(found)
    figures["commits_during_backup"] = len(found)
    figures["db_mib"] = (data / "homefire.db").stat().st_size / 2**20
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=5000)
    args = parser.parse_args()
    model_dir = ensure_default_model(REPO / ".cache" / "tests" / "models")
    with tempfile.TemporaryDirectory() as tmp:
        data, scratch = Path(tmp) / "data", Path(tmp) / "scratch"
        scratch.mkdir()
        said = generate(data, args.conversations, model_dir)
        b = bench_bundle(data, said, model_dir, scratch)
        k = bench_backup(data, scratch)
    messages = args.conversations * 10
    print(f"{platform.machine()}, {args.conversations} conversations, {messages} messages, "
          f"{args.conversations * 5 + 500} memories, one rank-16 adapter")
    print(f"bundle export {b['export']:.2f} s ({b['bundle_mib']:.1f} MiB) against a plain zip "
          f"{b['export_plain_zip']:.2f} s ({b['plain_zip_mib']:.1f} MiB): "
          f"ratio {b['export'] / b['export_plain_zip']:.2f}")
    print(f"bundle import {b['import']:.2f} s (again: {b['import_again']:.2f} s, nothing added) against "
          f"the chat-export importer {b['import_chat_export']:.2f} s: "
          f"ratio {b['import'] / b['import_chat_export']:.2f}")
    print(f"backup {k['backup']:.2f} s of a {k['db_mib']:.1f} MiB database against a file copy "
          f"{k['file_copy']:.3f} s: ratio {k['backup'] / k['file_copy']:.1f}")
    print(f"a writer's commit p95 {k['commit_p95_ms_during_backup']:.1f} ms during a backup "
          f"({k['commits_during_backup']} commits) against {k['commit_p95_ms_alone']:.1f} ms alone: ratio "
          f"{k['commit_p95_ms_during_backup'] / k['commit_p95_ms_alone']:.2f}")


if __name__ == "__main__":
    main()
