"""How recall ranks and chooses memories.

A candidate's score is its best cosine similarity to the question over the memory's
pieces (its text, and the user's own words on their own; exact, from the float32 mirror),
plus a bonus when it was said in the span of time the question names, or in the days before or
after an event it names, dated by the memory that tells of it (memory/when.py). Each
memory says why (`Why`): the part that matched, the time it was said in, and whether
something nearly the same was said elsewhere too (among the candidates).
What a reply places in the prompt is the best of those over a threshold, without near
copies (the store leaves them out of the ranking), within a token budget, and what was
said again and again scores less there (echo_penalty): "the bus was late" once more tells
less than what one says once. Each part is
here because bench/memory_quality.py measured that it puts more of what was said in the
prompt; keyword search (SQLite FTS5 fused with dense, and the best memories' rare words as
a second query) was tried and found nothing dense did not (bench/RESULTS.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from store.memories import Kind


@dataclass
class RecallSettings:
    top_k: int = 6
    threshold: float = 0.26       # below this is not about the question (with echo_penalty; bench/RESULTS.md)
    near_copy: float = 0.90       # this close to a chosen one adds nothing (same words: 0.91)
    recency_bonus: float = 0.03   # at most this much extra score for what was said today
    recency_days: float = 60
    budget_tokens: int = 400
    time_bonus: float = 0.15      # for being said in the span of time the question names
    relative_bonus: float = 0.50  # ... a span relative to an event it names (R@10 there 0.1 -> 0.7)
    echo_penalty: float = 0.20    # less for what was said again elsewhere (in prompt 0.53 -> 0.71)
    query_tokens: int = 64        # what is embedded of the question (its end), then of the context
    rerank_top: int = 20          # candidates over the threshold a reranker (if any) orders


class Why(BaseModel):
    """Why a memory was recalled, as a person can check it."""

    matched: Literal["your words", "the exchange", "the fact"] = Field(
        description="the part of it nearest the question: what you said in it on its own, the whole "
        "exchange, or a fact you added")
    similarity: float = Field(description="that part's cosine similarity to the question (0 to 1)")
    window: str | None = Field(None, description="the time the question asks about, which it was said in "
                               "(that raised its score), in words")
    said_again: bool = Field(False, description="something nearly the same was said elsewhere too, which "
                             "lowered its score")
    reranked: float | None = Field(None, description="the reranker's score, by which it was ordered among "
                                   "the best candidates (memory.reranker; none: not reranked)")


class Recalled(BaseModel):
    id: int
    conversation_id: str | None   # where it was said (None: a fact the user added)
    text: str
    score: float
    kind: Kind
    pinned: bool
    created_at: float
    why: Why | None = None


def relevant(candidates: list[tuple[Recalled, str | None]], settings: RecallSettings
             ) -> list[tuple[Recalled, str | None]]:
    """Those that clear the threshold, what was said again scoring less (echo_penalty)."""
    return [(c, asked) for c, asked in candidates
            if c.score - (settings.echo_penalty if c.why and c.why.said_again else 0) >= settings.threshold]


def choose(candidates: list[tuple[Recalled, str | None]], settings: RecallSettings, now: float,
           skip_asked: set[str], skip_ids: set[int], count_tokens: Callable[[str], int]) -> list[Recalled]:
    """What a reply places in the prompt, best first, from distinct candidates (no near copies)
    scored by the store, with what their users asked. Those a reranker scored (why.reranked)
    come first, in its order."""
    ranked = []
    for candidate, asked in relevant(candidates, settings):
        if asked in skip_asked or candidate.id in skip_ids:
            continue
        score = candidate.score - (settings.echo_penalty if candidate.why and candidate.why.said_again else 0)
        age_days = max(0.0, now - candidate.created_at) / 86400
        adjusted = score + settings.recency_bonus * math.exp(-age_days / settings.recency_days)
        explicit = candidate.kind == "fact" or candidate.pinned
        reranked = candidate.why.reranked if candidate.why else None
        order = adjusted if reranked is None else reranked
        ranked.append(((explicit, reranked is not None, order), candidate))
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

