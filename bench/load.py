"""A small group sharing one server: many users streaming at once, and one user flooding.

Starts `homefire serve` on the embedded model with one account per user, then:
  1. all users stream chats for --seconds, each in their own conversation, one reply at a
     time: errors, lost messages, TTFT p50/p95 and throughput;
  2. the fairness baseline: one user fewer, the same way (their TTFT unloaded);
  3. as many users again while one more user floods: --flood streams at once, a new one
     as each ends (the per-user limit refuses the excess with 429). Their TTFT p95 under
     the flood over the baseline's is the ratio printed (goal <= 2).
After each phase every acknowledged message is looked up in its conversation. Each phase
has users of its own, who start without history or memories.

    .venv/bin/python bench/load.py [--users 16] [--seconds 60] [--flood 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
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

TOPICS = ["my garden", "a film I saw", "my sister's wedding", "learning the piano", "a rainy walk",
          "my new job", "the stars last night", "cooking soup", "an old friend", "a long train ride"]


@dataclass
class Tally:
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    refused: int = 0                                   # 429: a limit doing its job
    acked: list[tuple[str, int, int]] = field(default_factory=list)   # (conversation, message, reply)


async def chat_once(client: httpx.AsyncClient, conversation: str, text: str, max_tokens: int,
                    tally: Tally) -> None:
    start, first = time.perf_counter(), None
    body = {"content": text, "stream": True, "max_tokens": max_tokens}
    try:
        async with client.stream("POST", f"/api/v1/conversations/{conversation}/messages", json=body) as r:
            if r.status_code == 429:
                tally.refused += 1
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                return
            if r.status_code != 200:
                tally.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            name = None
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if name == "delta" and first is None:
                        first = time.perf_counter() - start
                    elif name == "done":
                        reply = data["reply"]
                        tally.acked.append((conversation, data["message"]["id"], reply["id"]))
                        tally.tokens += reply["tokens"] or 0
                    elif name == "error":
                        tally.errors.append(data["error"]["message"])
    except httpx.HTTPError as err:
        tally.errors.append(f"{type(err).__name__}: {err}")
    if first is not None:
        tally.ttfts.append(first)


async def user_loop(client: httpx.AsyncClient, until: float, streams: int, max_tokens: int,
                    tally: Tally, seed: int) -> None:
    """`streams` chats at once, each in its own conversation, one reply at a time, until `until`."""
    async def one_stream(n: int) -> None:
        made = await client.post("/api/v1/conversations", json={"companion": "ember"})
        if made.status_code != 201:
            tally.errors.append(f"new conversation: HTTP {made.status_code}")
            return
        conversation, turn = made.json()["conversation"]["id"], 0
        while time.perf_counter() < until:
            topic = TOPICS[(seed + n + turn) % len(TOPICS)]
            await chat_once(client, conversation, f"Let me tell you about {topic}. What do you think?",
                            max_tokens, tally)
            turn += 1

    await asyncio.gather(*(one_stream(n) for n in range(streams)))


async def lost(clients: list[httpx.AsyncClient], tallies: list[Tally]) -> int:
    """Acknowledged messages that are not in their conversation now."""
    missing = 0
    for client, tally in zip(clients, tallies, strict=True):
        stored: dict[str, set[int]] = {}
        for conversation, message, reply in tally.acked:
            if conversation not in stored:
                got = (await client.get(f"/api/v1/conversations/{conversation}")).json()
                stored[conversation] = {m["id"] for m in got["messages"]}
            missing += (message not in stored[conversation]) + (reply not in stored[conversation])
    return missing


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def phase(name: str, clients: list[httpx.AsyncClient], seconds: float, max_tokens: int,
                flood: tuple[httpx.AsyncClient, int] | None = None) -> dict:
    tallies = [Tally() for _ in clients]
    start = time.perf_counter()
    until = start + seconds
    work = [user_loop(c, until, 1, max_tokens, t, i) for i, (c, t) in enumerate(zip(clients, tallies,
                                                                                    strict=True))]
    flooder = Tally()
    if flood:
        work.append(user_loop(flood[0], until, flood[1], max_tokens, flooder, 99))
    await asyncio.gather(*work)
    wall = time.perf_counter() - start
    ttfts = [t for tally in tallies for t in tally.ttfts]
    result = {
        "phase": name, "users": len(clients), "seconds": wall,
        "replies": sum(len(t.acked) for t in tallies),
        "errors": sum(len(t.errors) for t in tallies), "refused_429": sum(t.refused for t in tallies),
        "lost": await lost(clients, tallies),
        "ttft_p50_ms": statistics.median(ttfts) * 1000 if ttfts else float("nan"),
        "ttft_p95_ms": pct(ttfts, 95) * 1000,
        "tokens_per_s": sum(t.tokens for t in tallies) / wall,
        "first_errors": [e for t in tallies for e in t.errors][:3],
    }
    if flood:
        result["flooder"] = {"streams": flood[1], "replies": len(flooder.acked),
                             "refused_429": flooder.refused, "errors": len(flooder.errors),
                             "lost": await lost([flood[0]], [flooder]), "tokens_per_s": flooder.tokens / wall}
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


async def run(args, url: str, keys: list[str]) -> dict:
    clients = [httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {k}"},
                                 timeout=httpx.Timeout(30, read=600)) for k in keys]
    # Fresh users for each phase: memories pile up as users talk (and recall puts them in
    # the prompt), so a phase run by the same users later would start with longer prompts.
    n = args.users
    crowd, calm, busy = clients[:n], clients[n:2 * n - 1], clients[2 * n - 1:3 * n - 2]
    flooder, warm = clients[3 * n - 2], clients[3 * n - 1:]
    try:
        # Warm-up: a few replies, so the first batches' one-off costs are not measured.
        await phase("warm-up", warm, 10, args.max_tokens)
        everyone = await phase("all users", crowd, args.seconds, args.max_tokens)
        baseline = await phase("others, unloaded", calm, args.seconds, args.max_tokens)
        flooded = await phase("others, one user flooding", busy, args.seconds, args.max_tokens,
                              flood=(flooder, args.flood))
    finally:
        for client in clients:
            await client.aclose()
    return {"all": everyone, "baseline": baseline, "flooded": flooded,
            "fairness_ratio": flooded["ttft_p95_ms"] / baseline["ttft_p95_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=16, help="users streaming at once")
    parser.add_argument("--seconds", type=float, default=60, help="length of each phase")
    parser.add_argument("--flood", type=int, default=64, help="streams the flooding user keeps open")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per reply")
    parser.add_argument("--data-dir", type=Path, help="data directory (default: a temporary one)")
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="homefire-load-"))
    users = Users(Database(data_dir / "homefire.db"))
    keys = [users.add(f"user{i:02d}") for i in range(4 * args.users - 1)]
    # Default settings (limits included): what a shared server runs.
    with homefire_server(data_dir, f"companions_dir: {REPO / 'configs' / 'companions'}\n") as (url, _):
        result = asyncio.run(run(args, url, keys))
    a, b, f = result["all"], result["baseline"], result["flooded"]
    print(f"\nmachine: {platform.machine()}, {platform.processor() or 'cpu'}; model {MODEL_NAME}; "
          f"{args.max_tokens} tokens per reply, {args.seconds:.0f} s per phase")
    print(f"{a['users']} users at once: {a['replies']} replies, {a['errors']} errors, {a['lost']} lost, "
          f"TTFT p50 {a['ttft_p50_ms']:.0f} ms p95 {a['ttft_p95_ms']:.0f} ms, "
          f"{a['tokens_per_s']:.1f} tokens/s")
    print(f"{b['users']} users, unloaded: TTFT p95 {b['ttft_p95_ms']:.0f} ms; with one more user "
          f"flooding ({args.flood} streams): TTFT p95 {f['ttft_p95_ms']:.0f} ms, errors {f['errors']}, "
          f"lost {f['lost']}; flooder: {f['flooder']['replies']} replies, "
          f"{f['flooder']['refused_429']} refused with 429")
    print(f"fairness ratio (flooded / unloaded TTFT p95 of the others): {result['fairness_ratio']:.2f}"
          "   (goal <= 2)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
