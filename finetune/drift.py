"""Is it still the same companion? Two setups (a base model, and an adapter or none) side by side.

    homefire drift COMPANION --against vN|base      homefire drift COMPANION --model PATH
    homefire migrate COMPANION --model PATH

The probes are fixed: the prompts before the companion's real replies in its held-out
conversations (the split training uses), each rendered with the persona by each model's own
chat template. Each setup writes greedy replies to them (the same setup, the same words) and
gets the voice figures of `homefire eval`: held-out loss and perplexity of the real replies,
style, and similarity to the real replies.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune.config import FinetuneConfig, FinetuneError
from finetune.dataset import Builder, held_out_ids, load_history
from finetune.discriminate import told_apart
from finetune.evaluate import style
from finetune.lora import dataset_for, tokenizer_for
from finetune.template import alternate
from finetune.train import evaluate
from store import adapters
from store.companions import Companion
from store.db import Database
from store.users import LOCAL


@dataclass
class Setup:
    model_path: str
    version: str | None        # an adapter version of the companion, or None: the base model alone

    def label(self, current_path: str) -> str:
        model = "" if self.model_path == current_path else f"{Path(self.model_path).name} "
        return f"{model}{self.version or 'base'}".strip()


def probes(db: Database, companion: Companion, config: FinetuneConfig, user: str = LOCAL,
           count: int = 8, context: int = 6) -> list[tuple[list[dict], str]]:
    """(the conversation before a real reply, at most `context` messages; the reply) from the
    held-out conversations, oldest first."""
    history = load_history(db, companion.key, user)
    held = held_out_ids([cid for cid, _ in history], config.eval_share)   # as training holds them out
    found = []
    for cid, messages in history:
        if cid not in held:
            continue
        messages = alternate(messages)
        for i, message in enumerate(messages):
            if message["role"] == "assistant" and i > 0 and len(found) < count:
                found.append((messages[max(0, i - context):i], message["content"]))
    if not found:
        raise FinetuneError(f"companion {companion.id!r} has no held-out conversations to probe with "
                            "(eval_share is 0, or there is only one conversation with replies)")
    return found


def voice(data_dir: Path, db: Database, companion: Companion, setup: Setup,
          asked: list[tuple[list[dict], str]], config: FinetuneConfig, user: str = LOCAL,
          max_new_tokens: int = 48) -> dict:
    """Greedy replies to the probes and the voice figures of one setup."""
    from transformers import AutoModelForCausalLM

    from memory.embedder import Embedder

    tokenizer = tokenizer_for(setup.model_path)
    model = AutoModelForCausalLM.from_pretrained(setup.model_path, dtype=torch.float32)
    if setup.version is not None:
        from peft import PeftModel

        folder = adapters.version_dir(data_dir, companion.key, setup.version)
        adapters.manifest(data_dir, companion.key, setup.version)   # names the known versions if missing
        adapters.verify(folder, adapters.Base.of(Path(setup.model_path)))
        model = PeftModel.from_pretrained(model, folder)
    model.eval()
    builder = Builder(tokenizer, companion, config)
    replies = []
    for messages, _ in asked:
        ids = tokenizer(builder.render(messages, generation_prompt=True), add_special_tokens=False,
                        return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    held = dataset_for(db, companion, tokenizer, config, user).eval
    loss = evaluate(model, held, config.batch_tokens, tokenizer.pad_token_id, torch.device("cpu")) if held \
        else None
    del model
    gc.collect()
    embedder = Embedder()
    real = [reply for _, reply in asked]
    vectors = np.array(embedder.embed(replies)) * np.array(embedder.embed(real))
    similarity = float(vectors.sum(axis=1).mean())
    # How well a reader tells the real replies from this setup's (None with under 6 probes).
    told = told_apart(real, replies, embedder.embed)
    return {"model": setup.model_path, "model_sha256": adapters.model_sha256(Path(setup.model_path)),
            "adapter": setup.version, "replies": replies, "held_out_loss": loss,
            "perplexity": math.exp(loss) if loss is not None else None, "style": style(replies),
            "similarity_to_real": similarity, "told_apart": told}


def compare(data_dir: Path, db: Database, companion: Companion, current: Setup, other: Setup,
            config: FinetuneConfig, asked: list[tuple[list[dict], str]], user: str = LOCAL,
            max_new_tokens: int = 48) -> dict:
    """Both setups on the same probes (`probes`), side by side."""
    sides = {name: voice(data_dir, db, companion, setup, asked, config, user, max_new_tokens)
             for name, setup in (("current", current), ("other", other))}
    rows = [{"prompt": messages[-1]["content"], "real": real, "current": sides["current"]["replies"][i],
             "other": sides["other"]["replies"][i],
             "same": sides["current"]["replies"][i] == sides["other"]["replies"][i]}
            for i, (messages, real) in enumerate(asked)]
    figures = {name: {k: v for k, v in side.items() if k != "replies"} for name, side in sides.items()}
    changed = [k for k in ("held_out_loss", "similarity_to_real", "told_apart")
               if figures["current"][k] != figures["other"][k]]
    if figures["current"]["style"] != figures["other"]["style"]:
        changed.append("style")
    return {"companion": companion.id, "current": current.label(current.model_path),
            "other": other.label(current.model_path), "probes": rows, "figures": figures,
            "replies_differ": sum(not r["same"] for r in rows), "figures_differ": changed,
            "drift": any(not r["same"] for r in rows) or bool(changed)}


def fitting_version(data_dir: Path, companion: Companion, model_path: str) -> str | None:
    """The newest version of the companion trained on the weights at model_path."""
    sha = adapters.model_sha256(Path(model_path))
    fit = [v for v in adapters.versions(data_dir, companion.key)
           if adapters.manifest(data_dir, companion.key, v).get("base_model", {}).get("sha256") == sha]
    return fit[-1] if fit else None
