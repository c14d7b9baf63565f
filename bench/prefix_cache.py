"""vLLM's prefix-cache hit rate over a conversation that recalls memories every turn.

Starts `homefire serve` on the embedded model and gives the user --facts facts on varied
topics (so every turn recalls some). Then a conversation of --turns turns goes through
Homefire's OpenAI route, resending the whole history each turn as clients do; then the same
messages (Homefire's replies included) go straight to the engine's own chat route. Each
pass reads the engine's `vllm:prefix_cache_hits` and `vllm:prefix_cache_queries` counters
before and after, and prints hits / queries for both, their ratio, and how many memories
each turn of Homefire's recalled (goal: Homefire's rate at least 0.8, and at least 0.95x
the direct one).

    .venv/bin/python bench/prefix_cache.py [--turns 16] [--facts 40]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=16, help="turns of the conversation")
    parser.add_argument("--facts", type=int, default=40, help="facts the user told the companion")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per reply")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="homefire-prefix-"))
    config = f"companions_dir: {REPO / 'configs' / 'companions'}\nlimits:\n  requests_per_minute: 0\n"
    with homefire_server(data_dir, config) as (url, key):
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        engine = httpx.Client(transport=httpx.HTTPTransport(uds=str(data_dir / "run" / "engine.sock")),
                              base_url="http://engine", timeout=300)
        for i in range(args.facts):
            topic = TOPICS[i % len(TOPICS)]
            fact = {"text": f"About {topic}: detail number {i}, told on day {i}."}
            client.post("/api/v1/companions/ember/memories", json=fact).raise_for_status()
        messages: list[dict] = []
        recalled = []
        before = counters(engine)
        for turn in range(args.turns):
            asked = QUESTIONS[turn % len(QUESTIONS)].format(t=TOPICS[turn % len(TOPICS)])
            messages.append({"role": "user", "content": asked})
            r = client.post("/v1/chat/completions", json={"model": "ember", "messages": messages,
                                                          "max_tokens": args.max_tokens, "temperature": 0})
            r.raise_for_status()
            messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
            stored = client.get(f"/api/v1/conversations/{r.headers['X-Homefire-Conversation']}").json()
            recalled.append(len(stored["messages"][-1].get("memories_used") or []))
        after = counters(engine)
        ours = (after[0] - before[0]) / max(1.0, after[1] - before[1])
        ours_tokens = after[1] - before[1]
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
    print(json.dumps(result))


if __name__ == "__main__":
    main()
