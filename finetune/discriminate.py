"""Could a reader tell them apart? A discriminator between real and generated replies.

Perplexity and style counts can say "matched" while a reader still knows (issue 26: 80% told
apart by character n-grams where perplexity had fallen to 0.135x). So the voice report
trains plain classifiers to tell held-out real replies from generated replies to the same
prompts, cross-validated: on character n-grams (what is written: casing, punctuation, pet
names, signature endings) and on sentence embeddings (what is said). 0.5 means a reader
cannot tell; 1.0 always can. Its calibration is the same classifier on real against real
(two halves of the held-out replies): what the score reads when nothing differs. And the
gaps a person can act on: the phrases the real replies use again and again (pet names,
signature endings) with their share in real and generated replies, reply length, emoji,
punctuation, casing.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Callable

import numpy as np

MIN_EACH = 6        # replies per side below which no score is given (a coin would do as well)
FOLDS = 5
WORD = re.compile(r"[\w']+|[^\w\s]{1,3}")


def told_apart(first: list[str], second: list[str], embed: Callable[[list[str]], list[list[float]]] | None
               ) -> dict[str, float] | None:
    """Cross-validated accuracy of telling `first` from `second`, by character n-grams and (with
    `embed`) by sentence embeddings; None with too few of either."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline

    n = min(len(first), len(second))
    if n < MIN_EACH:
        return None
    texts = first[:n] + second[:n]
    labels = np.array([0] * n + [1] * n)
    folds = StratifiedKFold(n_splits=min(FOLDS, n), shuffle=True, random_state=0)
    chars = make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), lowercase=False,
                                          sublinear_tf=True), LogisticRegression(max_iter=2000, C=10))
    result = {"characters": float(cross_val_score(chars, texts, labels, cv=folds).mean())}
    if embed:
        vectors = np.asarray(embed(texts), dtype=np.float32)
        result["meaning"] = float(cross_val_score(LogisticRegression(max_iter=2000, C=10), vectors, labels,
                                                  cv=folds).mean())
    return result


def signatures(real: list[str], at_least: float = 0.15, most: int = 6) -> list[str]:
    """Phrases of one to three words (or marks) that many real replies use: a pet name, a
    signature ending. The most used first (the widest of equals), each sharing no word with one
    before it."""
    share: Counter[str] = Counter()
    for text in real:
        words = WORD.findall(text.lower())
        share.update({" ".join(words[i:i + k]) for k in (1, 2, 3) for i in range(len(words) - k + 1)})
    common = [p for p, c in share.items() if c >= max(3, at_least * len(real)) and not _plain(p)]
    common.sort(key=lambda p: (-share[p], -len(p.split()), p))
    kept: list[str] = []
    for phrase in common:   # the widest of the most used; then others that share no word with it
        words = set(phrase.split()) - PLAIN
        if not any(words & (set(k.split()) - PLAIN) for k in kept):
            kept.append(phrase)
    return kept[:most]


def _plain(phrase: str) -> bool:
    """Words every reply uses ("the", "i", ".") tell nothing of a voice."""
    return all(w in PLAIN for w in phrase.split())


PLAIN = set("""a an the and or but so to of in on at for with is are was were be been it it's that this
i you me my your we he she they them his her our their not no yes do did have has had will would can
just what how . , ! ? ' - ... i'm you're don't""".split())


def share_with(texts: list[str], phrase: str) -> float:
    return sum(phrase in " ".join(WORD.findall(t.lower())) for t in texts) / max(len(texts), 1)


def lengths(texts: list[str]) -> dict[str, float]:
    words = sorted(len(t.split()) for t in texts) or [0]
    quartiles = statistics.quantiles(words, n=4) if len(words) > 1 else [words[0]] * 3
    return {"q1": quartiles[0], "median": quartiles[1], "q3": quartiles[2]}


def discriminate(real: list[str], generated: dict[str, list[str]], calibration: tuple[list[str], list[str]],
                 embed: Callable[[list[str]], list[list[float]]] | None = None) -> dict:
    """The report's discriminator: for each generated set (base, tuned), how well real replies
    are told from it, beside real told from real; and the gaps."""
    phrases = signatures(real)
    return {
        "told_apart": {name: told_apart(real, texts, embed) for name, texts in generated.items()},
        "calibration": told_apart(*calibration, embed),
        "replies": min(len(real), *(len(t) for t in generated.values())),
        "signatures": [{"phrase": p, "real": share_with(real, p),
                        **{name: share_with(texts, p) for name, texts in generated.items()}}
                       for p in phrases],
        "lengths": {"real": lengths(real), **{name: lengths(texts) for name, texts in generated.items()}},
    }


def in_words(score: float | None) -> str:
    """A discriminator's accuracy as a person reads it."""
    if score is None:
        return f"too few replies to say (at least {MIN_EACH} of each)"
    tens = round(score * 10)
    if tens <= 5:
        return "a reader could not tell them apart (as good as a coin)"
    return f"a reader tells them apart {tens} times in 10"
