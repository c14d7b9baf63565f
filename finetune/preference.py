"""Preference tuning after the main training: the real reply chosen, the model's own rejected.

DPO (Rafailov et al., 2023) on the LoRA adapter alone, with peft and no other library: for
`preference_pairs` moments of the training conversations, the companion's real reply is the
chosen answer and a reply the freshly tuned adapter draws there (with its fitted sampling,
as it would speak) the rejected one. The reference is the adapter as the main training left
it: the log-probabilities of both answers under it are taken once, before the adapter moves.
The loss pushes the real reply's likelihood up against the drawn one's, relative to the
reference, so the adapter unlearns what gives it away (a missing pet name, a dropped
ending) rather than relearning what it already says. Off by default (0 pairs): bench/voice.py
reads whether it moves the discriminator (bench/RESULTS.md).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from finetune.config import FinetuneConfig
from finetune.dataset import IGNORE, Example, reply_spans
from finetune.train import collate, token_losses


@dataclass
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    def examples(self) -> list[Example]:
        """Prompt + each answer, loss on the answer only."""
        return [Example(self.prompt + answer, [IGNORE] * len(self.prompt) + answer, "")
                for answer in (self.chosen, self.rejected)]


def moments(examples: list[Example], count: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(the window up to a real reply, the reply and its end-of-turn token) for `count` replies
    of the training windows, picked at random with `seed`."""
    found = [(e.input_ids[:start], e.input_ids[start:end]) for e in examples for start, end in reply_spans(e)]
    return random.Random(seed).sample(found, min(count, len(found)))


@torch.no_grad()
def drawn_pairs(model, tokenizer, examples: list[Example], config: FinetuneConfig, drawn: dict,
                device: torch.device) -> list[Pair]:
    """The chosen (real) and rejected (drawn by the model as `drawn` says: served_sampling, as
    the server would draw it) answer at each picked moment; a moment where the model drew the
    real reply word for word teaches nothing and is left out."""
    model.eval()
    pairs = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        for prompt, chosen in moments(examples, config.preference_pairs, config.seed):
            ids = torch.tensor([prompt], device=device)
            # The training model is loaded with use_cache off (checkpointing): drawing needs it on.
            longest = {"max_new_tokens": len(chosen) + 16}
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), top_k=0, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, **drawn | longest)
            rejected = out[0, len(prompt):].tolist()
            if rejected and rejected != chosen:
                pairs.append(Pair(prompt, chosen, rejected))
    return pairs


def answer_logps(model, pairs: list[Pair], pad_id: int, device: torch.device,
                 autocast: torch.dtype | None) -> torch.Tensor:
    """log p(chosen), log p(rejected) of each pair, shape (pairs, 2), with gradients if enabled."""
    batch = collate([e for pair in pairs for e in pair.examples()], pad_id)
    losses, rows = token_losses(model, batch, device, autocast)
    summed = losses.new_zeros(len(pairs) * 2).index_add(0, rows, losses)
    return -summed.view(len(pairs), 2)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's loss and each pair's margin (how much more the policy prefers the real reply than
    the reference did, times beta)."""
    margin = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    return -F.logsigmoid(margin).mean(), margin


def preference_tune(model, pad_id: int, pairs: list[Pair], config: FinetuneConfig, device: torch.device,
                    autocast: torch.dtype | None = None) -> dict:
    """Take the reference log-probabilities of the pairs (drawn_pairs), then preference_epochs
    of DPO on the adapter, `preference_batch` pairs a step. Returns the figures for the manifest."""
    started = time.perf_counter()
    if not pairs:
        return {"pairs": 0}
    size = config.preference_batch
    groups = [pairs[i:i + size] for i in range(0, len(pairs), size)]
    with torch.no_grad():
        reference = [answer_logps(model, group, pad_id, device, autocast) for group in groups]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.preference_learning_rate, weight_decay=0.0)
    total = max(1, round(config.preference_epochs * len(groups)))
    rng = random.Random(config.seed)
    model.train()
    margins, losses = [], []
    for step in range(total):
        index = step % len(groups)
        if index == 0:
            order = list(range(len(groups)))
            rng.shuffle(order)
        group = order[index]
        policy = answer_logps(model, groups[group], pad_id, device, autocast)
        loss, margin = dpo_loss(policy, reference[group], config.preference_beta)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        margins.append(margin.mean().item())
    model.eval()
    tail = max(1, len(losses) // 4)
    return {"pairs": len(pairs), "steps": total, "first_loss": losses[0],
            "last_loss": sum(losses[-tail:]) / tail, "margin": sum(margins[-tail:]) / tail,
            "seconds": time.perf_counter() - started}
