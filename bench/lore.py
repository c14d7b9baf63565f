"""What a lorebook adds to the time before a reply: assembling the prompt of each turn of a
conversation with a --entries-entry book against the same prompts without one, in this process
with the embedded model's real tokenizer and chat template (what ChatService.plan adds, the card
read from its stored row included; the engine's own time is the same for both). Prints p50 and
p95 of each, the median of each turn's added milliseconds (goal: <= 5 ms; each turn timed 5
times, interleaved) and the ratio; also the first turn of a resent --turns-turn conversation,
when every earlier message is scanned once (afterwards each turn scans only its new message).

    .venv/bin/python bench/lore.py [--entries 200] [--turns 60]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers import AutoTokenizer  # noqa: E402

from serve.default_model import MODEL_NAME, ensure_default_model  # noqa: E402
from serve.lore import Lore, LoreCache, fingerprint, place  # noqa: E402
from serve.prompt import PromptBuilder  # noqa: E402
from store.companions import Companion, ParsedCards  # noqa: E402
from store.persona import substitute  # noqa: E402

REPEATS = 5
WORDS = ["harbour", "lantern", "orchard", "glacier", "bakery", "violin", "comet", "meadow", "falcon",
         "quarry"]


def book(entries: int) -> dict:
    """Entries of two keys each (a tenth of them regular expressions) and about 60 words."""
    return {"name": "bench", "scan_depth": 2, "token_budget": 400, "entries": [
        {"keys": [f"{WORDS[i % 10]}{i}", f"/{WORDS[(i + 3) % 10]}-{i}s?/i" if i % 10 == 0 else f"place{i}"],
         "content": f"Entry {i}: " + " ".join(WORDS[(i + j) % 10] for j in range(60)),
         "enabled": True, "insertion_order": i % 50, "extensions": {}, "constant": i == 0}
        for i in range(entries)]}


def conversation(turns: int) -> list[dict]:
    out = []
    for turn in range(turns):
        out.append({"role": "user", "content": f"Tell me about {WORDS[turn % 10]}{turn * 7 % 200} and the "
                                               f"weather today, turn {turn}. " * 3})
        out.append({"role": "assistant", "content": f"Of course. Here is what I know, turn {turn}. " * 6})
    return out


def timed(builder: PromptBuilder, stored: dict, history: list[dict], cache: LoreCache,
          cards: ParsedCards) -> float:
    """A turn's prompt, from the companion's row as the store reads it."""
    started = time.perf_counter()
    companion = cards.load(stored)
    lore = Lore()
    if companion.character_book is not None:
        book = companion.character_book   # keyed as ChatService keys it
        lore = place(book, fingerprint(companion, "User"), history, cache,
                     lambda t: len(builder.encode(t)), lambda t: substitute(t, companion, "User"))
    builder.build(companion, history, 256, lore=lore)
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=200, help="entries in the book")
    parser.add_argument("--turns", type=int, default=60, help="turns of the conversation")
    args = parser.parse_args()
    model = ensure_default_model(Path(tempfile.gettempdir()) / "homefire-bench-models")
    builder = PromptBuilder(AutoTokenizer.from_pretrained(model), 4096)
    plain = Companion(id="plain", name="Plain", description="{{char}} keeps a lighthouse.")
    world = Companion.model_validate(plain.model_dump() | {"character_book": book(args.entries)})
    plain, world = ({"id": c.id, "card": c.model_dump_json()} for c in (plain, world))
    said = conversation(args.turns)
    runs = {"without": [], "with": []}
    caches = {"without": LoreCache(), "with": LoreCache()}
    cards = ParsedCards()
    for end in range(1, len(said), 2):            # every turn, as the conversation grows
        for _ in range(REPEATS):                    # interleaved, so a busy moment hits both
            for name, companion in (("without", plain), ("with", world)):
                runs[name].append(timed(builder, companion, said[:end], caches[name], cards))
    # A resent conversation (a client sends it all): nothing scanned or parsed yet.
    cold = timed(builder, world, said[:-1], LoreCache(), ParsedCards())
    p50 = {name: statistics.median(times) for name, times in runs.items()}
    p95 = {name: statistics.quantiles(times, n=20)[18] for name, times in runs.items()}
    # The added time of each turn, the book against none on the same prompt a moment apart.
    added = statistics.median(w - o for w, o in zip(runs["with"], runs["without"], strict=True))
    result = {"entries": args.entries, "turns": args.turns, "p50_ms": p50, "p95_ms": p95,
              "added_p50_ms": added, "ratio_p50": p50["with"] / p50["without"], "cold_first_turn_ms": cold}
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; model {MODEL_NAME}; "
          f"{args.entries} entries, {args.turns} turns")
    print(f"prompt assembly p50: without a book {p50['without']:.2f} ms, with {p50['with']:.2f} ms; "
          f"added {added:.2f} ms (goal <= 5), ratio {result['ratio_p50']:.2f}; p95 {p95['without']:.2f} / "
          f"{p95['with']:.2f} ms; a resent {args.turns}-turn conversation's first turn: {cold:.1f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
