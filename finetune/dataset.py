"""Training examples from a companion's stored history, loss on the companion's turns only.

Each example is a window of a conversation rendered with the model's chat template, the
persona's system prompt first. Which tokens are the companion's is found by rendering the
template incrementally (before a reply, with the generation prompt, and through it): no
`{% generation %}` markers needed. Long conversations become windows of at most
`max_seq_len` tokens; a window repeats the last `overlap_messages` of the previous one as
context, without loss, so every reply is trained once. Whole conversations are held out
for evaluation, chosen by a hash of their id, so the split never changes between runs.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

from finetune.config import FinetuneConfig, FinetuneError
from finetune.template import Neutralizer, alternate
from store.companions import Companion
from store.db import Database
from store.history import History
from store.persona import persona_prompt
from store.users import LOCAL

IGNORE = -100
BOILERPLATE = re.compile(
    r"\b(as an ai|as a (large )?language model|i'?m (just )?an ai|i am (just )?an ai|"
    r"i (cannot|can'?t|am unable to|'m unable to) (help|assist|comply|provide) with)", re.IGNORECASE)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]          # IGNORE where no loss
    conversation_id: str

    @property
    def trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def reply_spans(example: Example) -> list[tuple[int, int]]:
    """(start, end) of each trained stretch: one companion reply and its end-of-turn token each."""
    spans, start = [], None
    for i, label in enumerate([*example.labels, IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    conversations: tuple[int, int]          # (train, held out)
    skipped: Counter = field(default_factory=Counter)

    def digest(self) -> str:
        h = hashlib.sha256()
        for part in (self.train, self.eval):
            for ex in part:
                h.update(repr((ex.input_ids, ex.labels)).encode())
            h.update(b"|")
        return h.hexdigest()

    def summary(self) -> dict:
        def stats(examples: list[Example]) -> dict:
            return {"examples": len(examples), "tokens": sum(len(e.input_ids) for e in examples),
                    "trained_tokens": sum(e.trained for e in examples)}
        return {"train": stats(self.train), "eval": stats(self.eval),
                "conversations": {"train": self.conversations[0], "eval": self.conversations[1]},
                "skipped": dict(self.skipped), "hash": self.digest()}


def load_history(db: Database, companion_id: str, user: str = LOCAL,
                 until: int | None = None) -> list[tuple[str, list[dict]]]:
    """(conversation id, messages) of the user's every conversation with the companion,
    imported and live, oldest first. Only one user's: a voice is never learnt from others.
    `until`: only messages up to this id, the history as it was when a job began (a resumed
    job learns from the same examples while the person goes on talking)."""
    return History(db, user).spoken(companion_id, until)


def held_out(conversation_id: str, share: float) -> bool:
    point = int(hashlib.sha256(conversation_id.encode()).hexdigest()[:8], 16) / 2**32
    return point < share


def held_out_ids(ids: list[str], share: float) -> set[str]:
    """The conversations held out for evaluation: a share of them by a hash of their id, at
    least one when there are two or more, never all of them."""
    evaluating = {cid for cid in ids if held_out(cid, share)}
    if share > 0 and not evaluating and len(ids) >= 2:
        # Too few conversations for the share to pick one: hold out the lowest hash.
        evaluating = {min(ids, key=lambda cid: hashlib.sha256(cid.encode()).hexdigest())}
    if ids and evaluating == set(ids):
        evaluating.discard(ids[0])
    return evaluating


class Builder:
    def __init__(self, tokenizer, companion: Companion, config: FinetuneConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.system = {"role": "system", "content": persona_prompt(companion)}
        self.skipped: Counter = Counter()
        self.neutral = Neutralizer(tokenizer)

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        # History and card are people's text: none of it may become a control token.
        return self.tokenizer.apply_chat_template(self.neutral.messages([self.system, *messages]),
                                                  tokenize=False, add_generation_prompt=generation_prompt)

    def example(self, conversation_id: str, messages: list[dict], train_from: int) -> Example | None:
        """One window; loss on assistant messages at index >= train_from."""
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or i < train_from:
                continue
            if self.config.filter_boilerplate and BOILERPLATE.search(message["content"]):
                self.skipped["boilerplate replies"] += 1
                continue
            before = self.render(messages[:i], generation_prompt=True)
            through = self.render(messages[: i + 1]).rstrip()
            if not (through.startswith(before) and text.startswith(through)):
                raise FinetuneError("the model's chat template does not render conversations "
                                    "incrementally, so the companion's tokens cannot be found")
            spans.append((len(before), len(through)))
        if not spans:
            return None
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, labels, span = encoded["input_ids"], [], 0
        for token, (start, _) in zip(ids, encoded["offset_mapping"], strict=True):
            while span < len(spans) and start >= spans[span][1]:
                span += 1
            inside = span < len(spans) and spans[span][0] <= start < spans[span][1]
            labels.append(token if inside else IGNORE)
        limit = self.config.max_seq_len
        if len(ids) > limit:
            self.skipped["tokens cut at max_seq_len"] += len(ids) - limit
            ids, labels = ids[:limit], labels[:limit]
        example = Example(ids, labels, conversation_id)
        return example if example.trained else None

    def windows(self, conversation_id: str, messages: list[dict]) -> list[Example]:
        # Estimated sizes from one batched tokenization; each window is then exact.
        sizes = [len(e) + 6 for e in self.tokenizer([m["content"] for m in messages],
                                                    add_special_tokens=False)["input_ids"]]
        budget = self.config.max_seq_len - len(self.tokenizer(self.render([]))["input_ids"]) - 8
        examples, start, trained_from = [], 0, 0
        while trained_from < len(messages):
            end, used = start, 0
            while end < len(messages) and used + sizes[end] <= budget:
                used += sizes[end]
                end += 1
            if end == start:   # one message longer than a window: train on its start
                end = start + 1
            example = self.example(conversation_id, messages[start:end], trained_from - start)
            if example is not None:
                examples.append(example)
            if end >= len(messages):
                break
            trained_from = end
            start = max(end - self.config.overlap_messages, start + 1)
        return examples


def build(tokenizer, companion: Companion, conversations: list[tuple[str, list[dict]]],
          config: FinetuneConfig) -> Dataset:
    if not conversations:
        raise FinetuneError(f"companion {companion.id!r} has no conversations with replies to learn "
                            "from; import an export first (homefire import)")
    builder = Builder(tokenizer, companion, config)
    ids = [cid for cid, _ in conversations]
    evaluating = held_out_ids(ids, config.eval_share)
    train, held, seen = [], [], set()
    for cid, messages in conversations:
        # Two user turns in a row (a reply cut off before it began) are one turn, as in serving.
        for example in builder.windows(cid, alternate(messages)):
            key = hashlib.sha256(repr((example.input_ids, example.labels)).encode()).digest()
            if key in seen:
                builder.skipped["duplicate windows"] += 1
                continue
            seen.add(key)
            (held if cid in evaluating else train).append(example)
    if not train:
        raise FinetuneError(f"companion {companion.id!r}: no training examples left "
                            f"(skipped: {dict(builder.skipped) or 'none'})")
    return Dataset(train, held, (len(ids) - len(evaluating), len(evaluating)), builder.skipped)


def show(tokenizer, example: Example) -> str:
    """The example as text, trained stretches between « and »."""
    out, run, trained = [], [], None
    for token, label in zip(example.input_ids, example.labels, strict=True):
        is_trained = label != IGNORE
        if trained is not None and is_trained != trained:
            out.append(_piece(tokenizer, run, trained))
            run = []
        run.append(token)
        trained = is_trained
    if run:
        out.append(_piece(tokenizer, run, trained))
    return "".join(out)


def _piece(tokenizer, tokens: list[int], trained: bool) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    return f"«{text}»" if trained else text
