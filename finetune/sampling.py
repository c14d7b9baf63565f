"""Sampling fitted to a tuned version on the held-out conversations.

A version's replies are drawn with the temperature and repetition penalty under which the
real held-out replies were most likely (their mean loss per token, token by token, as the
engine would penalise them: vLLM divides a positive logit of a token already in the prompt
or the reply by the penalty and multiplies a negative one), the top-p that keeps the real
next token inside the nucleus 95 times in 100, and a reply length from the real replies'
(one and a half times their 95th percentile, in tokens). The figures go into the version's
manifest (`sampling`); the server uses them whenever the companion speaks through that
version, unless the request names its own values.
"""

from __future__ import annotations

import math

import torch

from finetune.dataset import IGNORE, Example, reply_spans
from finetune.train import collate, decoded, length_grouped
from store.companions import Companion

TEMPERATURES = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1)
PENALTIES = (1.0, 1.05, 1.1)
COVERAGE = 0.95       # share of real next tokens inside the fitted nucleus
CHUNK = 256           # positions scored at once: CHUNK x vocabulary floats, a few times


def penalised(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """vLLM's repetition penalty over the tokens already seen."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def reply_lengths(examples: list[Example]) -> list[int]:
    """Tokens in each trained run (a reply and its end-of-turn token)."""
    return [end - start for example in examples for start, end in reply_spans(example)]


@torch.no_grad()
def fit_sampling(model, held: list[Example], pad_id: int, device: torch.device,
                 autocast: torch.dtype | None = None, batch_tokens: int = 4096) -> dict | None:
    """The sampling settings under which the held-out real replies are likeliest; None without any."""
    if not held:
        return None
    model.eval()
    grid = [(t, p) for t in TEMPERATURES for p in PENALTIES]
    loss = torch.zeros(len(grid), dtype=torch.float64)
    needed: list[list[torch.Tensor]] = [[] for _ in grid]   # nucleus mass that keeps each real token
    count = 0
    for group in length_grouped(held, batch_tokens):
        batch = collate(group, pad_id)
        causal, hidden = decoded(model, batch, device, autocast)
        head = causal.get_output_embeddings()
        for row in range(len(group)):
            ids = batch.input_ids[row].to(device)
            targets = batch.labels[row, 1:].to(device)
            positions = (targets != IGNORE).nonzero().squeeze(1)
            # first[v]: where token v first appears in the row; seen at p when first[v] <= p.
            first = torch.full((head.weight.shape[0],), ids.numel(), dtype=torch.long, device=device)
            first.scatter_reduce_(0, ids, torch.arange(ids.numel(), device=device), "amin")
            for start in range(0, len(positions), CHUNK):
                at = positions[start:start + CHUNK]
                logits = head(hidden[row, at]).float()
                seen = first[None, :] <= at[:, None]
                real = targets[at][:, None]
                for k, (temperature, penalty) in enumerate(grid):
                    probs = torch.log_softmax(penalised(logits, seen, penalty) / temperature, dim=-1)
                    own = probs.gather(1, real)
                    loss[k] -= own.sum().item()
                    probs, own = probs.exp_(), own.exp()
                    needed[k].append(((probs * (probs > own)).sum(1) + own.squeeze(1)).cpu())
                count += len(at)
    model.train()
    if not count:
        return None
    best = int(loss.argmin())
    temperature, penalty = grid[best]
    need = torch.cat(needed[best]).sort().values
    top_p = min(1.0, max(0.8, math.ceil(float(need[int(COVERAGE * (len(need) - 1))]) * 100) / 100))
    lengths = sorted(reply_lengths(held))
    max_tokens = max(16, math.ceil(1.5 * lengths[int(0.95 * (len(lengths) - 1))]))
    return {"temperature": temperature, "top_p": top_p, "repetition_penalty": penalty,
            "max_tokens": max_tokens,
            "fitted_on": {"replies": len(lengths), "tokens": count,
                          "loss": {"fitted": loss[best].item() / count,
                                   "plain": loss[grid.index((1.0, 1.0))].item() / count}}}


def served_sampling(companion: Companion, fitted: dict | None, longest: int) -> dict:
    """How the server would draw a reply (the card's sampling, then the version's fitted
    sampling: Sampling.drawn, as serve/chat.py does), as transformers' generate arguments, at
    most `longest` tokens. The report reads replies drawn the way the companion speaks, not
    greedy ones: greedy text is not what anyone reads, and fitted sampling moves only drawn
    replies."""
    drawn = companion.sampling.drawn(fitted)
    drawn["max_new_tokens"] = min(longest, drawn.pop("max_tokens"))
    if drawn["temperature"] == 0:                         # a card at temperature 0 speaks greedily
        return {"do_sample": False, "repetition_penalty": drawn["repetition_penalty"],
                "max_new_tokens": drawn["max_new_tokens"]}
    return drawn | {"do_sample": True}
