"""What a group chat's turn costs against a single companion's, with two adapters in one batch.

Starts `homefire serve` on the embedded model, gives two companions (fox, owl) synthetic LoRA
adapters of their own and a third (cat) none, then twice, two conversations at once, --rounds
messages each, --tokens-token replies (each phase's conversations are deleted after it, with
their memories, so no phase recalls what another said):
  1. the baseline: two conversations with fox alone (one adapter in each batch);
  2. two group chats of fox, owl and cat, both answered by fox (the group's prompt, one adapter);
  3. the same, one answered by fox and the other by owl every round (two adapters in each
     batch, vLLM's max_loras).
Printed: per phase the mean seconds per reply, its completion and prompt tokens, the ms per
completion token, and the group turn over the single one (the ratios).

    .venv/bin/python bench/groups.py [--rounds 8] [--tokens 32]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serving import homefire_server  # noqa: E402
from serve.default_model import ensure_default_model  # noqa: E402

CARDS = [{"id": "fox", "name": "Fox", "description": "{{char}} is a fox who keeps notes."},
         {"id": "owl", "name": "Owl", "description": "{{char}} is an owl who reads at night."},
         {"id": "cat", "name": "Cat", "description": "{{char}} is a cat who naps in the sun."}]


def talk(http: httpx.Client, conversation: str, speaker: str | None, rounds: int, tokens: int) -> list[dict]:
    """`rounds` messages to the conversation; each reply's seconds and token counts."""
    found = []
    for i in range(rounds):
        body = {"content": f"Tell me one thing about the number {i}.", "max_tokens": tokens,
                "temperature": 0.7} | ({"speaker": speaker} if speaker else {})
        started = time.perf_counter()
        answer = http.post(f"/api/v1/conversations/{conversation}/messages", json=body)
        answer.raise_for_status()
        reply = answer.json()["reply"]
        assert speaker is None or reply["speaker"] == speaker, reply
        found.append({"seconds": time.perf_counter() - started, "tokens": reply["tokens"],
                      "prompt": reply["prompt_tokens"], "adapter": reply["adapter"]})
    return found


def phase(http: httpx.Client, starts: list[dict], speakers: list[str | None], rounds: int,
          tokens: int) -> list[dict]:
    conversations = [http.post("/api/v1/conversations", json=s).json()["conversation"]["id"] for s in starts]
    with ThreadPoolExecutor(len(conversations)) as pool:
        done = pool.map(lambda pair: talk(http, pair[0], pair[1], rounds, tokens),
                        zip(conversations, speakers, strict=True))
        found = [r for each in done for r in each]
    for conversation in conversations:   # with its memories: no phase recalls what another said
        http.delete(f"/api/v1/conversations/{conversation}").raise_for_status()
    return found


def summary(name: str, replies: list[dict]) -> dict:
    seconds = statistics.mean(r["seconds"] for r in replies)
    completion = statistics.mean(r["tokens"] for r in replies)
    prompt = statistics.mean(r["prompt"] for r in replies)
    per_token = 1000 * sum(r["seconds"] for r in replies) / sum(r["tokens"] for r in replies)
    adapters = sorted({r["adapter"] or "-" for r in replies})
    print(f"{name:<34} {seconds:8.2f} s {completion:8.1f} {prompt:8.1f} {per_token:9.1f} ms  "
          f"{', '.join(adapters)}")
    return {"seconds": seconds, "per_token": per_token, "prompt": prompt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="messages per conversation in each phase")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of each reply")
    args = parser.parse_args()
    from tests.support.adapters import make_adapter

    with tempfile.TemporaryDirectory(prefix="bench-groups-") as scratch:
        data = Path(scratch)
        model_dir = ensure_default_model(data / "models")
        with homefire_server(data, "engine:\n  max_loras: 4\n") as (url, key):
            http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
            for card in CARDS:
                http.post("/api/v1/companions", json=card).raise_for_status()
            for companion, seed in (("fox", 3), ("owl", 4)):
                make_adapter(data / "adapters" / companion / "v1", model_dir, "local", seed=seed)
                http.put(f"/api/v1/companions/{companion}/adapter", json={"version": "v1"}).raise_for_status()
            group = {"companions": ["fox", "owl", "cat"], "reply_order": "manual"}
            phase(http, [{"companion": "fox"}] * 2, [None, None], 1, 4)   # warm-up
            print(f"{platform.machine()}, {args.rounds} rounds of 2 conversations at once, max_tokens "
                  f"{args.tokens}\n{'phase':<34} {'reply':>10} {'tokens':>8} {'prompt':>8} {'per token':>12}")
            single = summary("single companion (fox, fox)", phase(
                http, [{"companion": "fox"}] * 2, [None, None], args.rounds, args.tokens))
            one = summary("group chat (fox answering both)", phase(
                http, [group] * 2, ["fox", "fox"], args.rounds, args.tokens))
            grouped = summary("group chat (fox and owl answering)", phase(
                http, [group] * 2, ["fox", "owl"], args.rounds, args.tokens))
            print(f"ratio two adapters / one, in group chats: {grouped['per_token'] / one['per_token']:.2f} "
                  "per token")
            print(f"ratio group / single: {grouped['seconds'] / single['seconds']:.2f} per reply, "
                  f"{grouped['per_token'] / single['per_token']:.2f} per token, "
                  f"{grouped['prompt'] / single['prompt']:.2f} prompt tokens")


if __name__ == "__main__":
    main()
