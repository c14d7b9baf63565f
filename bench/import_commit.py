"""Other users' streams while one user's large import is committed.

Starts `homefire serve` on the embedded model. Eight users stream replies through the OpenAI
route, one at a time each, in two phases with users of their own:
  1. baseline: nobody imports, for --seconds;
  2. import: a ninth user uploads a generated export of --conversations conversations
     (plain JSONL, 1 to 3 exchanges each), and the phase lasts until the import's rows are
     committed (its first `index` progress event), at least --seconds.
First, without a server, the export is imported twice into fresh databases: in our batches
and as one batch per table (the old single transaction, nearly), and the longest time one
write transaction held the database is printed for both: what every other writer waits for.
Then, for each phase: TTFT p50/p95 and the largest gap between two chunks of one stream (from the
first content to the end). For the import phase also the commit window, from the last `read`
progress event to the first `index` one, and the same figures for what fell inside it.
Prints the ratio of TTFT p95 (import / baseline; goal <= 1.5) and the largest gap (goal
<= 250 ms).

    .venv/bin/python bench/import_commit.py [--users 8] [--conversations 60000] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serving import homefire_server  # noqa: E402
from serve.default_model import MODEL_NAME  # noqa: E402
from store.db import Database  # noqa: E402
from store.users import Users  # noqa: E402

WORDS = "the garden rain piano wedding soup stars train sister film morning coffee walk letter".split()


def generate(path: Path, conversations: int, seed: int = 1) -> int:
    """A JSONL export of `conversations` short conversations; returns the messages written."""
    rng, messages = random.Random(seed), 0
    with path.open("w") as out:
        for n in range(conversations):
            turns = []
            for t in range(rng.randint(1, 3)):
                said = " ".join(rng.choices(WORDS, k=12))
                turns.append({"role": "user", "content": f"{said} ({n}.{t})"})
                turns.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=20))})
            messages += len(turns)
            out.write(json.dumps({"id": f"c{n}", "messages": turns}) + "\n")
    return messages


@dataclass
class Stream:
    started: float
    chunks: list[float] = field(default_factory=list)   # arrival times of content and final chunks
    final: bool = False                                  # the last chunk is the finish one (after the commit)


@dataclass
class Phase:
    streams: list[Stream] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def figures(self, since: float = 0, until: float = float("inf")) -> dict:
        """TTFT of streams started in [since, until]; largest gap ending in it."""
        ttfts = [s.chunks[0] - s.started for s in self.streams if s.chunks and since <= s.started <= until]
        gaps = [(b - a, b, s.final and b == s.chunks[-1]) for s in self.streams
                for a, b in zip(s.chunks, s.chunks[1:], strict=False) if since <= b <= until]
        largest = max(gaps, default=(0, 0, False))
        tokens = max((g for g, _, final in gaps if not final), default=0)
        finals = max((g for g, _, final in gaps if final), default=0)
        cut = statistics.quantiles(ttfts, n=20) if len(ttfts) >= 2 else [0] * 19
        return {"replies": len(ttfts), "ttft_p50_ms": 1000 * statistics.median(ttfts) if ttfts else 0,
                "ttft_p95_ms": 1000 * cut[18], "largest_gap_ms": 1000 * largest[0],
                "largest_gap_ended_at": largest[1], "largest_token_gap_ms": 1000 * tokens,
                "largest_gap_before_finish_ms": 1000 * finals,
                "errors": len(self.errors)}


async def stream_replies(client: httpx.AsyncClient, user: int, phase: Phase, stop: asyncio.Event,
                         max_tokens: int) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        asked = f"Tell me about {random.choice(WORDS)} ({user}.{n})"
        body = {"model": "ember", "stream": True, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": asked}]}
        stream = Stream(time.perf_counter())
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    phase.errors.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                    continue
                async for line in r.aiter_lines():
                    content = '"content":"' in line and '"content":""' not in line
                    if line.startswith("data: {") and (content or '"finish_reason":"' in line):
                        stream.chunks.append(time.perf_counter())
                        stream.final = not content
            phase.streams.append(stream)
        except httpx.HTTPError as err:
            phase.errors.append(repr(err))


def upload(url: str, key: str, export: Path, info: dict) -> None:
    """Import the export; note when its rows are in (the first `index` event) and when reading ended."""
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    with httpx.Client(base_url=url, headers=headers, timeout=None) as client:
        info["upload_started"] = time.perf_counter()
        with client.stream("POST", "/api/v1/companions/ember/imports", content=export.read_bytes(),
                           params={"filename": export.name}) as r:
            assert r.status_code == 200, r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event.get("stage") == "read":
                    info["last_read"] = time.perf_counter()
                elif event.get("stage") == "index":
                    info["first_index"] = time.perf_counter()
                    return
                elif "error" in event:
                    raise SystemExit(f"the import failed: {event}")


async def run_phase(url: str, keys: list[str], seconds: float, max_tokens: int,
                    importing: tuple[str, Path] | None) -> tuple[Phase, dict]:
    phase, stop, info = Phase(), asyncio.Event(), {}
    clients = [httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {k}"}, timeout=300)
               for k in keys]
    tasks = [asyncio.create_task(stream_replies(c, i, phase, stop, max_tokens))
             for i, c in enumerate(clients)]
    started = time.perf_counter()
    if importing:
        # In a thread of its own: the 33 MB upload must not hold up this loop, which times the chunks.
        await asyncio.to_thread(upload, url, *importing, info)
    await asyncio.sleep(max(0.0, seconds - (time.perf_counter() - started)))
    stop.set()
    await asyncio.gather(*tasks)
    for client in clients:
        await client.aclose()
    return phase, info


def longest_holds(export: Path, data_dir: Path) -> dict:
    """Import `export` into fresh databases with our batches and with whole tables at once."""
    from memory.importer import Importer
    from memory.imports import open_export
    from store.companions import Companion, CompanionStore
    from store.staging import COPY_BATCH

    holds = {}
    for name, batch in (("batches", COPY_BATCH), ("whole_tables", 10**9)):
        db = Database(data_dir / f"hold-{name}" / "homefire.db")
        CompanionStore(db).put(Companion(id="ember", name="Ember"), "api")
        importer = Importer(db, data_dir / f"hold-{name}" / "run", batch=batch)
        with open_export(str(export), None) as opened:
            importer.run(opened, "ember", "Ember")
        holds[name] = {"transactions": len(importer.holds), "longest_ms": 1000 * max(importer.holds),
                       "total_ms": 1000 * sum(importer.holds)}
        db.close()
    return holds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8, help="users streaming at once")
    parser.add_argument("--conversations", type=int, default=60000, help="conversations in the export")
    parser.add_argument("--seconds", type=float, default=30, help="shortest length of each phase")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per reply")
    parser.add_argument("--data-dir", type=Path, help="data directory (default: a temporary one)")
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="homefire-import-commit-"))
    export = data_dir / "export.jsonl"
    messages = generate(export, args.conversations)
    print(f"export: {args.conversations} conversations, {messages} messages, "
          f"{export.stat().st_size >> 20} MB", flush=True)
    holds = longest_holds(export, data_dir)
    for name, h in holds.items():
        print(f"commit as {name}: {h['transactions']} transactions, longest {h['longest_ms']:.0f} ms, "
              f"together {h['total_ms']:.0f} ms", flush=True)
    users = Users(Database(data_dir / "homefire.db"))
    keys = [users.add(f"user{i:02d}") for i in range(2 * args.users + 1)]
    # No request-rate limit: the streaming users send as fast as replies end.
    config = f"companions_dir: {REPO / 'configs' / 'companions'}\nlimits:\n  requests_per_minute: 0\n"
    with homefire_server(data_dir, config) as (url, _):
        base, _ = asyncio.run(run_phase(url, keys[:args.users], args.seconds, args.max_tokens, None))
        loaded, info = asyncio.run(run_phase(url, keys[args.users:2 * args.users], args.seconds,
                                             args.max_tokens, (keys[-1], export)))
    b, w = base.figures(), loaded.figures()
    commit = loaded.figures(info["last_read"], info["first_index"])
    result = {"holds": holds, "baseline": b, "import": w, "commit_window": commit,
              "import_read_s": info["last_read"] - info["upload_started"],
              "commit_window_s": info["first_index"] - info["last_read"],
              "ttft_p95_ratio": w["ttft_p95_ms"] / b["ttft_p95_ms"]}
    print(f"\nmachine: {platform.machine()}, {platform.processor() or 'cpu'}; model {MODEL_NAME}; "
          f"{args.users} users streaming {args.max_tokens}-token replies")
    for name, f in (("no import", b), ("import (upload to commit)", w), ("commit window", commit)):
        print(f"{name:>26}: {f['replies']:4d} replies, {f['errors']} errors, "
              f"TTFT p50 {f['ttft_p50_ms']:6.0f} ms p95 {f['ttft_p95_ms']:6.0f} ms, "
              f"largest gap {f['largest_gap_ms']:5.0f} ms (between tokens {f['largest_token_gap_ms']:5.0f}, "
              f"before the finish chunk {f['largest_gap_before_finish_ms']:5.0f})")
    print(f"import read {result['import_read_s']:.1f} s, commit window {result['commit_window_s']:.1f} s; "
          f"the largest gap ended {w['largest_gap_ended_at'] - info['upload_started']:.1f} s after the "
          "upload began")
    print(f"TTFT p95 ratio (import / none): {result['ttft_p95_ratio']:.2f}   (goal <= 1.5); "
          f"largest gap during the import: {w['largest_gap_ms']:.0f} ms   (goal <= 250)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
