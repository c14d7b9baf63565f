"""Prompt assembly: persona, the memory slot, then as much recent history as fits.

Rendering uses the model's own chat template and counts tokens with its real tokenizer,
so what we budget is exactly what the engine receives (we send token ids).
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError

from finetune.template import Neutralizer, alternate
from serve.lore import Lore
from store.companions import Companion
from store.persona import DEFAULT_USER_NAME, memory_block, persona_prompt, substitute, summary_block


class PromptTooLong(ValueError):
    """Even the persona and the newest message do not fit the context window."""


# A byte-level BPE token covers at least one byte of text, so a prompt of N bytes is at
# most N tokens (a few more for tokenizers that add a prefix space). A prompt that short
# fits without being tokenized here: we send its text and vLLM counts it exactly.
BYTE_MARGIN = 8
# Stands before a conversation that the companion opened, for templates where users speak first.
OPENING = "(The conversation begins.)"


@dataclass
class Prompt:
    text: str                     # the rendered prompt, special tokens as text
    token_ids: list[int] | None   # exact ids, when it had to be counted to fit
    messages: list[dict]          # what was rendered, system messages included
    history_kept: int             # how many of the given history messages made it in
    history_dropped: int

    @property
    def for_engine(self) -> str | list[int]:
        return self.token_ids if self.token_ids is not None else self.text


class PromptBuilder:
    """Thread-safe: requests are prepared on worker threads."""

    def __init__(self, tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        # The Rust tokenizer itself: transformers' wrapper re-applies truncation settings on
        # every call, which fails when two threads encode at once ("Already borrowed").
        self.backend = tokenizer.backend_tokenizer
        self.max_model_len = max_model_len
        self.neutral = Neutralizer(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def build(self, companion: Companion | None, history: list[dict], max_tokens: int,
              extra_system: list[str] = (), memories: list[str] | None = None,
              user: str = DEFAULT_USER_NAME, lore: Lore | None = None, summary: str | None = None) -> Prompt:
        """history: oldest first, ending with the user's new message (normalised by `alternate`).
        A message may carry "memories": those shown before it when it was the newest, shown
        there again so the prompt's prefix stays what the engine has cached. No companion:
        no persona, only the caller's system messages (the utility model). `lore`: the lorebook
        entries, by place (serve/lore.py); its `at` indexes `history` as given. `summary`: what the
        turns before `history` said (serve/summaries.py), placed where they were."""
        if lore is not None and lore.at:
            history = [{**m, "lore": lore.at[i]} if lore.at.get(i) else m for i, m in enumerate(history)]
        history = alternate(history)
        budget = self.max_model_len - max_tokens
        # The head stays the same from turn to turn, so vLLM's prefix cache keeps it and the
        # history after it; what changes each turn (recalled memories, post-history
        # instructions) goes in the tail, just before the newest message.
        lore = lore or Lore()
        system = "\n\n".join([persona_prompt(companion, user, lore.before_char, lore.after_char)]
                               if companion else [])
        if extra_system:
            system = "\n\n".join([system, *extra_system] if system else extra_system)
        head = [{"role": "system", "content": system}] if system else []
        late = [memory_block(memories, user)] if memories else []
        if companion and companion.post_history_instructions.strip():
            late.append(substitute(companion.post_history_instructions, companion, user))
        tail = [{"role": "system", "content": "\n\n".join(late)}] if late else []
        # Where the summarised turns were: between the head and the history, both of which
        # stay the same from turn to turn until the next fold.
        early = [{"role": "system", "content": summary_block(summary, companion, user)}] if summary else []
        head = head + early
        text, messages = self.render(head, tail, history, user, lore.depth, len(early))
        if len(text.encode()) + BYTE_MARGIN <= budget:
            return Prompt(text, None, messages, len(history), 0)

        # Estimate from one batched tokenization of every message's text (a template adds
        # a few tokens around each), keep the newest that fit, then render exactly and drop
        # the oldest until the real count fits: usually a single exact render.
        # An entry is shown once, where it first fired: counted there only (counted everywhere,
        # the estimate would drop turns that fit, and move the prefix the cache keeps).
        firsts, seen = [], set()
        for m in history:
            firsts.append([f.text for f in m.get("lore", ()) if f.handle not in seen])
            seen.update(f.handle for f in m.get("lore", ()))
        texts = [m["content"] for m in head + tail] + [text for _, text in lore.depth] + [
            "\n\n".join([*first, *([memory_block(m["memories"], user)] if m.get("memories") else []),
                         m["content"]])
            for m, first in zip(history, firsts, strict=True)]
        counts = [len(e.ids) + 5 for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        fixed = len(head) + len(tail) + len(lore.depth)
        sizes = counts[fixed:]
        start, used = len(history), sum(counts[:fixed])
        while start > 0 and used + sizes[start - 1] <= budget:
            start -= 1
            used += sizes[start]
        start = min(start, len(history) - 1)  # the newest message always goes in
        while True:
            text, messages = self.render(head, tail, history[start:], user, lore.depth, len(early))
            ids = self.encode(text)
            if len(ids) <= budget:
                return Prompt(text, ids, messages, len(history) - start, start)
            if start == len(history) - 1:
                raise PromptTooLong(
                    f"the persona and the newest message need {len(ids)} tokens, but only "
                    f"{budget} of the {self.max_model_len}-token context are left after "
                    f"reserving max_tokens={max_tokens}; shorten the message or lower max_tokens"
                )
            start += 1

    def render(self, head: list[dict], tail: list[dict], history: list[dict],
               user: str = DEFAULT_USER_NAME, depth: list[tuple[int, str]] = (), loose: int = 0
               ) -> tuple[str, list[dict]]:
        """head: the persona's system message; tail (memories, post-history instructions): one
        system message right before the newest message; an earlier message's lore entries and
        memories right before it, as when it was the newest (an entry once: where it was first
        shown); `depth` entries that many messages from the newest. The last `loose` messages of
        the head may open the first message instead, where a template allows one system message."""
        groups, shown = [], set()
        for i, m in enumerate(history):
            lore = [f.text for f in m.get("lore", ()) if f.handle not in shown]
            shown.update(f.handle for f in m.get("lore", ()))
            if i == len(history) - 1:
                late = lore + [t["content"] for t in tail]
                block = [{"role": "system", "content": "\n\n".join(late)}] if late else []
            else:
                late = lore + ([memory_block(m["memories"], user)] if m.get("memories") else [])
                block = [{"role": "system", "content": "\n\n".join(late)}] if late else []
            groups.append(block + [{"role": m["role"], "content": m["content"]}])
        for steps, text in sorted(depth, reverse=True):
            groups.insert(max(0, len(groups) - steps), [{"role": "system", "content": text}])
        body = [message for group in groups for message in group]
        messages = head + body
        try:
            return self._template(messages), messages
        except TemplateError:
            # Strict templates: one system message and the user speaks first (before a
            # greeting); every later system message opens the message after it (still before
            # it, so the head and the history stay a prefix that the cache keeps).
            cut = len(head) - loose
            messages, waiting = list(head[:cut]), [m["content"] for m in head[cut:]]
            if history and history[0]["role"] == "assistant":
                messages.append({"role": "user", "content": "\n\n".join([*waiting, OPENING])})
                waiting = []
            for m in body:
                if m["role"] == "system":
                    waiting.append(m["content"])
                else:
                    messages.append({**m, "content": "\n\n".join([*waiting, m["content"]])})
                    waiting = []
            if waiting:   # an entry at depth 0, after the newest message: it closes that message
                messages[-1] = {**messages[-1], "content": "\n\n".join([messages[-1]["content"], *waiting])}
            return self._template(messages), messages

    def _template(self, messages: list[dict]) -> str:
        # Every text in a prompt comes from people (cards, messages, memories, imports).
        return self.tokenizer.apply_chat_template(self.neutral.messages(messages), tokenize=False,
                                                  add_generation_prompt=True)
