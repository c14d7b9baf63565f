"""How recall ranks and chooses memories.

A candidate's score is its best cosine similarity to the question over the memory's
pieces (its text, and the user's own words on their own; exact, from the float32 mirror),
plus a bonus when it was said in the span of time the question names, or in the days before or
after an event it names, dated by the memory that tells of it (memory/when.py).
What a reply places in the prompt is the best of those over a threshold, without near
copies (the store leaves them out of the ranking), within a token budget. Each part is
here because bench/memory_quality.py measured that it puts more of what was said in the
prompt; keyword search (SQLite FTS5 fused with dense, and the best memories' rare words as
a second query) was tried and found nothing dense did not (bench/RESULTS.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from store.memories import Kind


@dataclass
class RecallSettings:
    top_k: int = 6
    threshold: float = 0.28       # below this is not about the question (0.30: 0.69 in prompt, not 0.74)
    near_copy: float = 0.90       # this close to a chosen one adds nothing (same words: 0.91)
    recency_bonus: float = 0.03   # at most this much extra score for what was said today
    recency_days: float = 60
    budget_tokens: int = 400
    time_bonus: float = 0.15      # for being said in the span of time the question names
    relative_bonus: float = 0.50  # ... a span relative to an event it names (R@10 there 0.1 -> 0.7)


class Recalled(BaseModel):
    id: int
    conversation_id: str | None   # where it was said (None: a fact the user added)
    text: str
    score: float
    kind: Kind
    pinned: bool
    created_at: float


def choose(candidates: list[tuple[Recalled, str | None]], settings: RecallSettings, now: float,
           skip_asked: set[str], skip_ids: set[int], count_tokens: Callable[[str], int]) -> list[Recalled]:
    """What a reply places in the prompt, best first, from distinct candidates (no near copies)
    scored by the store, with what their users asked."""
    ranked = []
    for candidate, asked in candidates:
        if candidate.score < settings.threshold or asked in skip_asked or candidate.id in skip_ids:
            continue
        age_days = max(0.0, now - candidate.created_at) / 86400
        adjusted = candidate.score + settings.recency_bonus * math.exp(-age_days / settings.recency_days)
        explicit = candidate.kind == "fact" or candidate.pinned
        ranked.append(((explicit, adjusted), candidate))
    ranked.sort(key=lambda c: c[0], reverse=True)
    chosen, used = [], 0
    for _, candidate in ranked:
        if len(chosen) == settings.top_k:
            break
        cost = count_tokens(candidate.text)
        if used + cost > settings.budget_tokens:
            continue
        used += cost
        chosen.append(candidate)
    return chosen
