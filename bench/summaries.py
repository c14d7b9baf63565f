"""A long conversation with running summaries against the same conversation with plain truncation.

Starts `homefire serve` on the embedded model (4,096-token context) twice, with memory.summaries
on and off, and talks --turns turns with ember through the native API (each message a new fact,
replies of --max-tokens). Prints, for each: the largest prompt against the budget, the turns
left out of a prompt that no summary covered (homefire_prompt_turns_dropped_total), the folds,
how many messages the summary covers at the end, and vLLM's prefix-cache hit rate over the last
--window turns; then the ratio of the hit rates (goal: summaries well above truncation, whose
prefix changes every turn once the context is full).

    .venv/bin/python bench/summaries.py [--turns 400] [--window 50] [--max-tokens 24] [--baseline-turns N]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.prefix_cache import counters  # noqa: E402
from bench.serving import homefire_server  # noqa: E402
from serve.default_model import MODEL_NAME  # noqa: E402

PLACES = ["the allotment", "the bakery", "my sister's flat", "the river path", "the library", "the market"]
CONTEXT = 4096


def metric(client: httpx.Client, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in client.get("/metrics").text.splitlines()
               if line.startswith(name) and not line.startswith("#") and "_created" not in line)


def said(turn: int) -> str:
    place = PLACES[turn % len(PLACES)]
    return (f"Day {turn}: this morning I went to {place}, met someone new called Friend{turn}, and we "
            f"talked for an hour about plans number {turn * 7}. Later I cooked dinner and wrote it all down.")


def run(summaries: bool, turns: int, window: int, max_tokens: int) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="homefire-summaries-"))
    config = (f"companions_dir: {REPO / 'configs' / 'companions'}\nlimits:\n  requests_per_minute: 0\n"
              f"memory:\n  summaries: {str(summaries).lower()}\n")
    with homefire_server(data_dir, config) as (url, key):
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
        engine = httpx.Client(transport=httpx.HTTPTransport(uds=str(data_dir / "run" / "engine.sock")),
                              base_url="http://engine", timeout=300)
        conversation = client.post("/api/v1/conversations", json={"companion": "ember"}).json()
        cid = conversation["conversation"]["id"]
        prompts, started = [], time.perf_counter()
        for turn in range(turns):
            if turn == turns - window:
                before = counters(engine)
            r = client.post(f"/api/v1/conversations/{cid}/messages",
                            json={"content": said(turn), "max_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()
            prompts.append(r.json()["reply"]["prompt_tokens"])
            if turn % 25 == 0:
                print(f"  turn {turn}: prompt {prompts[-1]} tokens, {time.perf_counter() - started:.0f} s",
                      flush=True)
        after = counters(engine)
        # The last fold, if one is being written, is waited for: what it covers counts.
        while client.get(f"/api/v1/conversations/{cid}/summary").json()["folding"]:
            time.sleep(0.5)
        summary = client.get(f"/api/v1/conversations/{cid}/summary").json()["summary"]
        messages = len(client.get(f"/api/v1/conversations/{cid}").json()["messages"])
        return {"hit_rate": (after[0] - before[0]) / max(1.0, after[1] - before[1]),
                "max_prompt_tokens": max(prompts), "budget": CONTEXT - max_tokens,
                "turns_dropped_uncovered": metric(client, "homefire_prompt_turns_dropped_total"),
                "folds": metric(client, 'homefire_summary_folds_total{outcome="ok"}'),
                "failed_folds": metric(client, 'homefire_summary_folds_total{outcome="failed"}'),
                "messages": messages, "summary_covers": summary["turns"] if summary else 0,
                "summary": summary["text"] if summary else None, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=400, help="messages the user sends")
    parser.add_argument("--window", type=int, default=50, help="the last turns whose hit rate is compared")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per reply")
    parser.add_argument("--baseline-turns", type=int, default=None,
                        help="turns of the truncation run (default: --turns): the same conversation's "
                             "first N; once its context is full, every turn drops its oldest turns, so "
                             "the last --window turns of any N past that measure the same steady state")
    args = parser.parse_args()
    results = {}
    baseline = args.baseline_turns or args.turns
    for name, on, turns in (("summaries", True, args.turns), ("truncation", False, baseline)):
        print(f"{name}: {turns} turns ...", flush=True)
        results[name] = run(on, turns, args.window, args.max_tokens) | {"turns": turns}
    folded, cut = results["summaries"], results["truncation"]
    ratio = folded["hit_rate"] / cut["hit_rate"] if cut["hit_rate"] else float("inf")
    print(f"\nmachine: {platform.machine()}, {platform.processor() or 'cpu'}; model {MODEL_NAME}; "
          f"{args.turns} turns, replies of {args.max_tokens} tokens")
    for name, r in results.items():
        print(f"{name} ({r['turns']} turns): largest prompt {r['max_prompt_tokens']} of {r['budget']} "
              f"tokens; turns left out "
              f"uncovered {r['turns_dropped_uncovered']:.0f}; folds {r['folds']:.0f} "
              f"({r['failed_folds']:.0f} failed); summary covers {r['summary_covers']} of "
              f"{r['messages']} messages; hit rate over the last {args.window} turns "
              f"{r['hit_rate']:.2f}; {r['seconds']:.0f} s")
    print(f"summary at the end: {folded['summary']!r}")
    print(f"hit rate ratio, summaries / truncation: {ratio:.2f}")
    print(json.dumps(results | {"ratio": ratio}))


if __name__ == "__main__":
    main()
