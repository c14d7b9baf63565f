"""Quick trainings: a few steps that learn a distinctive voice on the embedded model (the
held-out loss falls far below the base model's), in as little time as the machine allows."""

from __future__ import annotations

# Two 192-token windows a step: a step takes about 2 s on two cores, and four learn the voice.
QUICK = {"learning_rate": 2e-3, "max_seq_len": 192, "batch_tokens": 384, "warmup_steps": 1,
         "eval_every": 2}
# A server's voice reports: two short samples from each model.
REPORTS = {"samples": 2, "sample_tokens": 12}


def flags(settings: dict) -> list[str]:
    """The same settings as `homefire finetune` flags."""
    named = {"max_steps": "--steps", "learning_rate": "--lr", "max_seq_len": "--max-seq-len"}
    out: list[str] = []
    for key, value in settings.items():
        out += [named[key], str(value)] if key in named else ["--set", f"{key}={value}"]
    return out
