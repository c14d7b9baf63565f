"""Import speed and memory: a generated ChatGPT export of about 500 MB.

Measures, each in its own process so peak memory is its own:
- ours: the streaming reader (`memory.imports`, ijson), messages/s and peak RSS;
- baseline: `json.load` of the whole file, then the same thread walk and filtering;
- the whole import into a fresh data directory (staging + commit), embedding excluded.
Prints the rate ratio and the memory ratio. The export has what real ones have:
regenerated replies (branches), hidden system messages, tool calls and their output.

    .venv/bin/python bench/import.py [--size-mb 500] [--keep FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("the garden rain piano wedding soup stars train sister film morning coffee walk letter "
         "music river quiet laugh remember tomorrow 猫 ✨ 🍞 kitchen window autumn").split()


def generate(path: Path, size_mb: int, seed: int = 1) -> int:
    """Write a ChatGPT-shaped conversations.json of about size_mb; returns visible messages."""
    rng = random.Random(seed)
    target, written, visible, n = size_mb << 20, 0, 0, 0
    with path.open("w", encoding="utf-8") as out:
        out.write("[")
        while written < target:
            n += 1
            cid = f"conv-{n:07d}"
            mapping = {"root": {"id": "root", "message": None, "parent": None, "children": []}}

            def add(parent: str, role: str, text: str, kind: str = "text", recipient: str = "all",
                    hidden: bool = False, cid: str = cid, mapping: dict = mapping) -> str:
                node = f"{cid}-{len(mapping)}"
                mapping[node] = {"id": node, "parent": parent, "children": [], "message": {
                    "id": node, "author": {"role": role, "name": None, "metadata": {}},
                    "create_time": 1.7e9 + len(mapping), "update_time": None,
                    "content": {"content_type": kind, "parts": [text]}, "status": "finished_successfully",
                    "end_turn": True, "weight": 1.0, "recipient": recipient, "channel": None,
                    "metadata": {"is_visually_hidden_from_conversation": hidden, "model_slug": "gpt-4o",
                                 "request_id": "req-0123456789abcdef", "timestamp_": "absolute"}}}
                mapping[parent]["children"].append(node)
                return node

            def words(lo: int, hi: int) -> str:
                return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))

            leaf = add("root", "system", "", hidden=True)
            for _ in range(rng.randint(1, 40)):
                leaf = add(leaf, "user", words(4, 40))
                if rng.random() < 0.1:   # a tool call and its output
                    leaf = add(leaf, "assistant", "search('x')", "code", recipient="browser")
                    leaf = add(leaf, "tool", words(10, 30), "execution_output")
                if rng.random() < 0.15:  # a regenerated reply, abandoned
                    add(leaf, "assistant", words(10, 80))
                leaf = add(leaf, "assistant", words(10, 80))
                visible += 2
            conv = {"title": words(2, 5), "create_time": 1.7e9, "update_time": 1.7e9 + 99, "mapping": mapping,
                    "moderation_results": [], "current_node": leaf, "plugin_ids": None, "id": cid,
                    "conversation_id": cid, "default_model_slug": "gpt-4o"}
            text = json.dumps(conv, ensure_ascii=False)
            out.write(("," if n > 1 else "") + text)
            written += len(text.encode())
        out.write("]")
    return visible


def worker(kind: str, path: str, data_dir: str | None) -> dict:
    from memory.imports import Notes, open_export
    from memory.imports.chatgpt import _thread, _turn

    started = time.perf_counter()
    messages = 0
    if kind == "ours":
        notes = Notes()
        with open_export(path) as export:
            for conv in export.conversations(notes):
                messages += len(conv.messages)
    elif kind == "baseline":
        notes = Notes()
        with open(path, encoding="utf-8") as file:
            everything = json.load(file)
        for conv in everything:
            thread = _thread(conv["mapping"], conv["current_node"], path, conv["id"])
            messages += sum(1 for node in reversed(thread)
                            if _turn(conv["mapping"][node]["message"], notes) is not None)
    else:
        from memory.importer import Importer
        from store.companions import Companion, CompanionStore
        from store.db import Database

        db = Database(Path(data_dir) / "homefire.db")
        CompanionStore(db).put(Companion(id="ember", name="Ember"), "api")
        with open_export(path) as export:
            messages = Importer(db, Path(data_dir) / "run").run(export, "ember", "Ember").messages_added
    seconds = time.perf_counter() - started
    return {"messages": messages, "seconds": seconds, "rate": messages / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(kind: str, path: Path, data_dir: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, str(path)]
    if data_dir:
        cmd += ["--data-dir", str(data_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{kind} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=500, help="size of the generated export")
    parser.add_argument("--keep", type=Path, help="generate into (or reuse) this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("path", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.path, args.data_dir)))
        return
    scratch = Path(tempfile.mkdtemp(prefix="homefire-bench-import-"))
    path = args.keep or scratch / "conversations.json"
    if not path.exists():
        print(f"generating a {args.size_mb} MB ChatGPT export in {path} ...", flush=True)
        generate(path, args.size_mb)
    size_mb = path.stat().st_size / (1 << 20)
    ours = measure("ours", path)
    base = measure("baseline", path)
    full = measure("import", path, scratch / "data")
    assert ours["messages"] == base["messages"] == full["messages"], (ours, base, full)
    print(f"\nmachine: {platform.machine()}, {platform.processor() or 'cpu'}; export {size_mb:.0f} MB, "
          f"{ours['messages']} visible messages")
    for name, r in (("streaming (ours)", ours), ("json.load (baseline)", base), ("full import", full)):
        print(f"{name:22s}: {r['rate']:9.0f} messages/s ({r['seconds']:.1f} s), peak RSS "
              f"{r['peak_rss_mb']:.0f} MB")
    print(f"parse rate ratio ours / baseline: {ours['rate'] / base['rate']:.2f}   "
          "(goal: ours >= 50,000 messages/s)")
    print(f"peak memory ratio ours / baseline: {ours['peak_rss_mb'] / base['peak_rss_mb']:.3f}   "
          "(goal: ours < 500 MB)")
    print(json.dumps({"size_mb": size_mb, "ours": ours, "baseline": base, "import": full}))
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    main()
