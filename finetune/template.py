"""What every chat template is given: people's text with no live control tokens, in turns
that alternate.

Tokenizers match special tokens anywhere in the text they encode, so a message, memory,
card field or imported turn that contains `<|im_end|>` would otherwise close its turn and
open one of its own (a user-written system message). Before a chat template renders it,
every special-token string in such text is broken with a zero-width space: it still reads
the same, but only the template's own tokens are special. Serving, training and evaluation
all render through this.

Templates of Mistral, Gemma or Llama 2 style refuse two turns of one role in a row, which
history holds whenever a reply was cut off before its first token: `alternate` merges such
turns and drops empty ones.
"""

from __future__ import annotations

import re

BREAK = "\u200b"   # zero width space: splits the literal, never part of a special token


class Neutralizer:
    def __init__(self, tokenizer):
        specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        specials |= set(tokenizer.all_special_tokens)
        # Longest first, so a token that contains another is broken whole.
        specials = sorted((s for s in specials if len(s) > 1), key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, specials))) if specials else None

    def __call__(self, text: str) -> str:
        if self.pattern is None:
            return text
        return self.pattern.sub(lambda m: m[0][0] + BREAK + m[0][1:], text)

    def messages(self, messages: list[dict]) -> list[dict]:
        return [{**m, "content": self(m["content"])} for m in messages]


def alternate(messages: list[dict]) -> list[dict]:
    """Empty messages dropped, consecutive messages of one role merged (system ones kept apart)."""
    merged: list[dict] = []
    for message in messages:
        if not message["content"].strip():
            continue
        if merged and merged[-1]["role"] == message["role"] != "system":
            # The later message's other keys win (a reply's memories belong to the last of a run).
            joined = f"{merged[-1]['content']}\n\n{message['content']}"
            merged[-1] = {**merged[-1], **message, "content": joined}
        else:
            merged.append(message)
    return merged
