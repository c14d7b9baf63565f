"""What Homefire adds on top of vLLM: throughput ratio and time to first token.

Starts `homefire serve` on the embedded model, then runs the same load (16 concurrent
streaming chats with varied prompt lengths, greedy, so both paths produce the same tokens)
directly against the vLLM child over its private socket and through Homefire, alternating
rounds, and prints the throughput ratio and the TTFT Homefire adds (p50/p95).

    .venv/bin/python bench/serve_overhead.py [--rounds 6] [--concurrency 16] [--max-tokens 64]
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
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serving import homefire_server  # noqa: E402
from serve.default_model import MODEL_NAME  # noqa: E402
from serve.engine import SERVED_NAME  # noqa: E402
from store.companions import load_companion_file  # noqa: E402
from store.persona import persona_prompt  # noqa: E402

TOPICS = ["my garden", "a film I saw", "my sister's wedding", "learning the piano", "a rainy walk",
          "my new job", "the stars last night", "cooking soup", "an old friend", "a long train ride"]


def prompts(n: int) -> list[str]:
    # Varied lengths: from one sentence to a few paragraphs.
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        detail = f" I keep thinking about {topic}, and how it made me feel." * (1 + (i * 7) % 24)
        out.append(f"Let me tell you about {topic}.{detail} What do you think?")
    return out


async def one(client: openai.AsyncOpenAI, model: str, messages: list[dict], max_tokens: int,
              sampling: dict) -> tuple:
    start = time.perf_counter()
    ttft, tokens = None, 0
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=sampling)
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return ttft, tokens


async def round_(client, model, conversations, max_tokens, sampling) -> tuple[list[float], int, float]:
    start = time.perf_counter()
    results = await asyncio.gather(*(one(client, model, m, max_tokens, sampling) for m in conversations))
    wall = time.perf_counter() - start
    return [r[0] for r in results if r[0] is not None], sum(r[1] for r in results), wall


def pct(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def run(args, url: str, socket: Path, key: str) -> dict:
    companion = load_companion_file(REPO / "configs" / "companions" / "ember.yaml")
    system = persona_prompt(companion)
    texts = prompts(args.concurrency)
    via_homefire = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)
    direct = openai.AsyncOpenAI(
        base_url="http://engine/v1", api_key="none", max_retries=0, timeout=600,
        http_client=httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(socket))))
    homefire_msgs = [[{"role": "user", "content": t}] for t in texts]
    # The prompt Homefire assembles for ember, sent straight to vLLM's chat endpoint.
    direct_msgs = [[{"role": "system", "content": system}, {"role": "user", "content": t}] for t in texts]
    # Homefire applies the companion's sampling defaults; the baseline asks for the same.
    sampling = {"top_p": companion.sampling.top_p,
                "repetition_penalty": companion.sampling.repetition_penalty}
    # A full uncounted round on each path first: the first batches are much slower.
    await round_(direct, SERVED_NAME, direct_msgs, args.max_tokens, sampling)
    await round_(via_homefire, "ember", homefire_msgs, args.max_tokens, {})
    totals = {"direct": [[], 0, 0.0], "homefire": [[], 0, 0.0]}
    for r in range(args.rounds):
        order = [("direct", direct, SERVED_NAME, direct_msgs, sampling),
                 ("homefire", via_homefire, "ember", homefire_msgs, {})]
        for name, client, model, msgs, extra in order if r % 2 == 0 else order[::-1]:
            ttfts, tokens, wall = await round_(client, model, msgs, args.max_tokens, extra)
            totals[name][0] += ttfts
            totals[name][1] += tokens
            totals[name][2] += wall
            print(f"round {r + 1} {name:8s}: {tokens} tokens in {wall:.2f} s, TTFT p50 "
                  f"{statistics.median(ttfts) * 1000:.0f} ms", flush=True)
    # Unloaded: one request at a time, alternating paths: the pure per-request overhead.
    alone = {"direct": [], "homefire": []}
    for i in range(args.sequential):
        pairs = [("direct", direct, SERVED_NAME, direct_msgs[i % len(texts)], sampling),
                 ("homefire", via_homefire, "ember", homefire_msgs[i % len(texts)], {})]
        for name, client, model, msgs, extra in pairs if i % 2 == 0 else pairs[::-1]:
            alone[name].append((await one(client, model, msgs, 8, extra))[0])
    result = {"unloaded_added_ttft_p50_ms": (statistics.median(alone["homefire"])
                                             - statistics.median(alone["direct"])) * 1000,
              "unloaded_ttft_p50_ms": {k: statistics.median(v) * 1000 for k, v in alone.items()}}
    for name, (ttfts, tokens, wall) in totals.items():
        result[name] = {"tokens_per_s": tokens / wall, "ttft_p50_ms": statistics.median(ttfts) * 1000,
                        "ttft_p95_ms": pct(ttfts, 95) * 1000, "tokens": tokens}
    result["throughput_ratio"] = result["homefire"]["tokens_per_s"] / result["direct"]["tokens_per_s"]
    result["added_ttft_p50_ms"] = result["homefire"]["ttft_p50_ms"] - result["direct"]["ttft_p50_ms"]
    result["added_ttft_p95_ms"] = result["homefire"]["ttft_p95_ms"] - result["direct"]["ttft_p95_ms"]
    return result


def remembered(data_dir: Path, n: int) -> None:
    """n exchanges of the owner's with ember in the data directory, remembered and indexed as
    the server would (its index), before it starts."""
    from memory.embedder import Embedder
    from memory.remember import exchange_text
    from memory.store import MemoryStore
    from store.companions import CompanionStore
    from store.db import Database
    from store.history import History, ReplyMeta

    data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(data_dir / "homefire.db")
    CompanionStore(db).sync_dir(REPO / "configs" / "companions")
    history, memory = History(db), MemoryStore(db, data_dir / "index", Embedder())
    conversation, now = history.create_conversation("ember").id, time.time()
    for i in range(n):
        said = f"{prompts(len(TOPICS))[i % len(TOPICS)].split('.')[0]}, day {i}."
        history.append(conversation, "user", said)
        answer = history.append(conversation, "assistant", f"Tell me more ({i})!",
                                ReplyMeta(finish_reason="stop"))
        memory.add_exchange("ember", conversation, answer.id, said,
                            exchange_text(said, answer.content, "Ember"), now - (n - i) * 60)
    print(f"remembering {n} exchanges ...", flush=True)
    memory.index_pending()
    db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per path (alternating)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent streaming chats")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply")
    parser.add_argument("--sequential", type=int, default=24, help="unloaded requests per path")
    parser.add_argument("--data-dir", type=Path, help="data directory (default: a temporary one)")
    parser.add_argument("--memories", type=int, default=0, metavar="N",
                        help="recall on, over N exchanges of ember's remembered beforehand: every "
                        "question is embedded and searched, and nothing clears the threshold, so the "
                        "prompts stay the baseline's (default 0: recall off)")
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="homefire-bench-"))
    # Equal work on both paths: no recalled memories in Homefire's prompts (they would make
    # them longer than the baseline's). Remembering and indexing still run and count;
    # with --memories, so does recall's search. No per-user limits either: the benchmark is
    # one user with many streams at once.
    recall = "  threshold: 1.0\n" if args.memories else "  top_k: 0\n"
    if args.memories:
        remembered(data_dir, args.memories)
    config = (f"companions_dir: {REPO / 'configs' / 'companions'}\nmemory:\n{recall}"
              "limits:\n  max_streams_per_user: 0\n  requests_per_minute: 0\n")
    with homefire_server(data_dir, config) as (url, key):
        result = asyncio.run(run(args, url, data_dir / "run" / "engine.sock", key))
    d, h = result["direct"], result["homefire"]
    print(f"\nmachine: {platform.machine()}, {platform.processor() or 'cpu'}; model {MODEL_NAME}; "
          f"{args.concurrency} concurrent streams x {args.max_tokens} tokens x {args.rounds} rounds")
    print(f"direct vLLM : {d['tokens_per_s']:.1f} tokens/s, TTFT p50 {d['ttft_p50_ms']:.0f} ms "
          f"p95 {d['ttft_p95_ms']:.0f} ms")
    print(f"via Homefire: {h['tokens_per_s']:.1f} tokens/s, TTFT p50 {h['ttft_p50_ms']:.0f} ms "
          f"p95 {h['ttft_p95_ms']:.0f} ms")
    print(f"throughput ratio (Homefire / direct): {result['throughput_ratio']:.3f}   (goal >= 0.95)")
    print(f"added TTFT: p50 {result['added_ttft_p50_ms']:+.1f} ms, p95 {result['added_ttft_p95_ms']:+.1f} ms"
          "   (goal p50 <= 15 ms)")
    u = result["unloaded_ttft_p50_ms"]
    print(f"unloaded, one request at a time: TTFT p50 direct {u['direct']:.1f} ms, via Homefire "
          f"{u['homefire']:.1f} ms, added {result['unloaded_added_ttft_p50_ms']:+.1f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
