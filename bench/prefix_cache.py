"""vLLM's prefix-cache hit rate over a conversation that recalls memories every turn.

Starts `homefire serve` on the embedded model and gives the user --facts facts on varied
topics (so every turn recalls some). Then a conversation of --turns turns goes through
Homefire's OpenAI route, resending the whole history each turn as clients do; then the same
messages (Homefire's replies included) go straight to the engine's own chat route. Each
pass reads the engine's `vllm:prefix_cache_hits` and `vllm:prefix_cache_queries` counters
before and after, and prints hits / queries for both, their ratio, and how many memories
each turn of Homefire's recalled (goal: Homefire's rate at least 0.8, and at least 0.95x
the direct one).

With --lorebook N it also talks to two API copies of ember, one with an N-entry lorebook whose
keys the conversation names, one without, and prints their hit rates and ratio.

    .venv/bin/python bench/prefix_cache.py [--turns 16] [--facts 40] [--lorebook 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serving import homefire_server  # noqa: E402
from serve.default_model import MODEL_NAME  # noqa: E402

TOPICS = ["my sister Ana", "the garden", "my job at the bakery", "our dog Rex", "the piano lessons",
          "my trip to Lisbon", "the book club", "my knee surgery", "the new flat", "my friend Tom"]
QUESTIONS = ["How is {t} doing, do you think?", "Do you remember what I told you about {t}?",
             "I was thinking about {t} again today.", "What would you say about {t}?"]


def counters(engine: httpx.Client) -> tuple[float, float]:
    text = engine.get("/metrics").text
    total = {"vllm:prefix_cache_hits_total": 0.0, "vllm:prefix_cache_queries_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in total:
            total[name] += float(line.rsplit(" ", 1)[1])
    return total["vllm:prefix_cache_hits_total"], total["vllm:prefix_cache_queries_total"]


def lorebook(entries: int) -> dict:
    """A book whose entries the conversation's topics set off (two keys each), a few constant."""
    words = [t.split()[-1] for t in TOPICS]
    return {"name": "bench", "entries": [
        {"keys": [words[i % len(words)], f"thing{i}"],
         "content": f"Lore {i} about {TOPICS[i % len(TOPICS)]}: " + " ".join(["it matters to {{user}}"] * 6),
         "enabled": True, "insertion_order": i, "extensions": {}, "constant": i < 2, "position": "after_char"}
        for i in range(entries)]}


def converse(client: httpx.Client, engine: httpx.Client, companion: str, turns: int,
             max_tokens: int) -> tuple[float, float, list[int], list[int], list[dict]]:
    """A conversation through Homefire's OpenAI route, resent whole each turn: its hit rate,
    prompt tokens, memories and lore entries each turn's reply used, and the messages."""
    messages: list[dict] = []
    recalled, lore = [], []
    before = counters(engine)
    for turn in range(turns):
        asked = QUESTIONS[turn % len(QUESTIONS)].format(t=TOPICS[turn % len(TOPICS)])
        messages.append({"role": "user", "content": asked})
        r = client.post("/v1/chat/completions", json={"model": companion, "messages": messages,
                                                      "max_tokens": max_tokens, "temperature": 0})
        r.raise_for_status()
        messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
        stored = client.get(f"/api/v1/conversations/{r.headers['X-Homefire-Conversation']}").json()
        recalled.append(len(stored["messages"][-1].get("memories_used") or []))
        lore.append(len(stored["messages"][-1].get("lore_used") or []))
    after = counters(engine)
    return ((after[0] - before[0]) / max(1.0, after[1] - before[1]), after[1] - before[1], recalled, lore,
            messages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=16, help="turns of the conversation")
    parser.add_argument("--facts", type=int, default=40, help="facts the user told the companion")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per reply")
    parser.add_argument("--lorebook", type=int, default=0, metavar="N",
                        help="also talk to a copy of ember with an N-entry lorebook, and to one without "
                             "(the ratio of their hit rates: what the book costs the cache)")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="homefire-prefix-"))
    config = f"companions_dir: {REPO / 'configs' / 'companions'}\nlimits:\n  requests_per_minute: 0\n"
    with homefire_server(data_dir, config) as (url, key):
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        engine = httpx.Client(transport=httpx.HTTPTransport(uds=str(data_dir / "run" / "engine.sock")),
                              base_url="http://engine", timeout=300)
        ember = client.get("/api/v1/companions/ember").json()
        talk = ["ember"]
        if args.lorebook:
            # Named apart, so neither run finds the other's (or ember's) prompts in the cache.
            for name, book in (("plain", None), ("world", lorebook(args.lorebook))):
                client.post("/api/v1/companions", json=ember | {"id": name, "name": f"Ember {name}",
                                                                "character_book": book}).raise_for_status()
            talk += ["plain", "world"]
        for companion in talk:
            for i in range(args.facts):
                topic = TOPICS[i % len(TOPICS)]
                fact = {"text": f"About {topic}: detail number {i}, told on day {i}."}
                client.post(f"/api/v1/companions/{companion}/memories", json=fact).raise_for_status()
        ours, ours_tokens, recalled, _, messages = converse(client, engine, "ember", args.turns,
                                                            args.max_tokens)
        books = {name: converse(client, engine, name, args.turns, args.max_tokens) for name in talk[1:]}
        # The same messages straight to the engine (its own template, no persona, no memories).
        model = engine.get("/v1/models").json()["data"][0]["id"]
        before = counters(engine)
        for end in range(1, len(messages), 2):
            engine.post("/v1/chat/completions", json={"model": model, "messages": messages[:end],
                                                      "max_tokens": args.max_tokens,
                                                      "temperature": 0}).raise_for_status()
        after = counters(engine)
        direct = (after[0] - before[0]) / max(1.0, after[1] - before[1])
    result = {"homefire_hit_rate": ours, "direct_hit_rate": direct, "ratio": ours / direct if direct else 0,
              "homefire_prompt_tokens": ours_tokens, "direct_prompt_tokens": after[1] - before[1],
              "memories_recalled_per_turn": recalled}
    print(f"\nmachine: {platform.machine()}, {platform.processor() or 'cpu'}; model {MODEL_NAME}; "
          f"{args.turns} turns, {args.facts} facts")
    print(f"memories recalled per turn: {recalled}")
    print(f"prefix-cache hit rate: through Homefire {ours:.2f} ({ours_tokens:.0f} prompt tokens), "
          f"straight to vLLM {direct:.2f}; ratio {result['ratio']:.2f}   (goals: >= 0.8, >= 0.95x)")
    if books:
        (plain, plain_tokens, *_), (world, world_tokens, _, fired, _) = books["plain"], books["world"]
        result |= {"lorebook_entries": args.lorebook, "plain_hit_rate": plain, "world_hit_rate": world,
                   "lorebook_ratio": world / plain if plain else 0, "lore_entries_per_turn": fired,
                   "plain_prompt_tokens": plain_tokens, "world_prompt_tokens": world_tokens}
        print(f"lorebook entries used per turn: {fired}")
        print(f"with a {args.lorebook}-entry lorebook: hit rate {world:.2f} ({world_tokens:.0f} prompt "
              f"tokens), without {plain:.2f} ({plain_tokens:.0f}); ratio {result['lorebook_ratio']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
