"""The fine-tuning stage: history -> dataset -> LoRA training -> a versioned adapter.

    homefire finetune COMPANION [--dry-run] [--steps N] [--rank R] [--resume VERSION]
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from finetune.config import FinetuneConfig, FinetuneError
from finetune.dataset import Dataset, build, load_history
from finetune.preference import drawn_pairs, preference_tune
from finetune.sampling import fit_sampling, served_sampling
from finetune.train import Report, Trainer, evaluate, load_model
from store import adapters
from store.companions import Companion
from store.db import Database
from store.users import LOCAL


def tokenizer_for(model_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def dataset_for(db: Database, companion: Companion, tokenizer, config: FinetuneConfig,
                user: str = LOCAL, until: int | None = None) -> Dataset:
    return build(tokenizer, companion, load_history(db, companion.key, user, until), config)


def finetune(data_dir: Path, db: Database, companion: Companion, model_path: str, model_id: str,
             config: FinetuneConfig, resume: str | None = None, report: Report | None = None,
             user: str = LOCAL, until: int | None = None,
             begun: Callable[[Path], None] | None = None, step_limit: int | None = None) -> Path:
    """Train a new adapter version on `user`'s history (messages up to `until`, if given), or
    finish `resume`; returns its folder. `begun` hears the folder once the dataset is built,
    before the model is loaded; `step_limit` caps the steps, however many the config asks."""
    tokenizer = tokenizer_for(model_path)
    data = dataset_for(db, companion, tokenizer, config, user, until)
    base_sha = adapters.model_sha256(Path(model_path))
    if resume:
        out = adapters.version_dir(data_dir, companion.key, resume)
        saved = out / "checkpoint" / "run.json"
        if not saved.exists():
            raise FinetuneError(f"nothing to resume in {out}: no checkpoint")
        if json.loads(saved.read_text())["dataset"] != data.digest():
            raise FinetuneError(f"{out}: the history changed since this run started; start a new run")
    else:
        out = adapters.new_version(data_dir, companion.key)
    if begun:
        begun(out)
    model, device = load_model(model_path, config)
    trainer = Trainer(model, device, data.train, data.eval, config, tokenizer.pad_token_id, out, report,
                      step_limit)
    (out / "checkpoint").mkdir(exist_ok=True)
    (out / "checkpoint" / "run.json").write_text(json.dumps({"dataset": data.digest()}))
    if resume:
        trainer.resume()
    started = time.time()
    metrics = trainer.run()
    sampling, preference = None, None
    if data.eval:   # fitted to the version as saved: the best held-out loss, not the last step
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(out / "adapter_model.safetensors"))
        sampling = fit_sampling(model, data.eval, tokenizer.pad_token_id, device, trainer.autocast,
                                config.batch_tokens)
    if config.preference_pairs:
        drawn = served_sampling(companion, sampling, companion.sampling.max_tokens)   # as the server would
        pairs = drawn_pairs(model, tokenizer, data.train, config, drawn, device)
        preference = preference_tune(model, tokenizer.pad_token_id, pairs, config, device, trainer.autocast)
        if preference["pairs"]:
            trainer.save(out)
            if data.eval:   # the saved adapter is the preference-tuned one: its loss and sampling
                preference["main_eval_loss"] = metrics["eval_loss"]
                metrics["eval_loss"] = evaluate(model, data.eval, config.batch_tokens, tokenizer.pad_token_id,
                                                device, trainer.autocast)
                sampling = fit_sampling(model, data.eval, tokenizer.pad_token_id, device, trainer.autocast,
                                        config.batch_tokens)
    info = {
        "version": out.name, "companion": companion.id, "user": user, "created_at": started,
        "base_model": {"id": model_id, "sha256": base_sha},
        "dataset": data.summary(), "config": config.model_dump(),
        "metrics": {k: v for k, v in metrics.items() if k != "history"},
        "preference": preference,
        "device": str(device),
        # Used when the companion speaks through this version, unless a request names its own.
        "sampling": sampling,
    }
    (out / "history.json").write_text(json.dumps(metrics["history"]))
    # The manifest comes last: a version without one is an unfinished run.
    (out / "manifest.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return out
