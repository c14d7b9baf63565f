"""Fine-tuning settings: one pydantic model, values from configs/finetune.yaml, flags override."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from store.adapters import VLLM_RANKS
from store.settings_file import read_settings

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "finetune.yaml"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class FinetuneError(ValueError):
    """A training setting or its dataset is wrong; the message says what and where (an adapter
    version or the registry: store.adapters.AdapterError)."""


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    rank: int = 16
    """LoRA rank; vLLM serves 1, 8, 16, 32, 64, 128, 256, 320 or 512."""
    alpha: float = Field(32, gt=0)
    """LoRA scaling numerator (the update is scaled by alpha / rank)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input during training (any above 0 keeps a copy of every adapted
    projection's input for the backward pass: 3.5 GB of 9 on 4,096-token batches)."""
    target_modules: list[str] = PROJECTIONS
    """Projections that get adapters: every attention and MLP projection by default."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate (AdamW), reached after warmup_steps, then linear decay to 0."""
    warmup_steps: int = Field(10, ge=0)
    """Steps of linear warmup."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay on the LoRA weights."""
    epochs: float = Field(3, gt=0)
    """Passes over the training examples (fractions allowed); max_steps wins if set."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps."""
    batch_tokens: int = Field(4096, ge=64)
    """Tokens per optimizer step, padding included: examples of similar length are batched
    together up to this budget, so little compute goes to padding."""
    max_seq_len: int = Field(1024, ge=64)
    """Longest training example in tokens; longer conversations are split into windows."""
    overlap_messages: int = Field(2, ge=0)
    """Messages repeated as context (without loss) at the start of the next window."""
    eval_share: float = Field(0.1, ge=0, lt=1)
    """Share of whole conversations held out for evaluation (chosen by a hash of their id)."""
    eval_every: int = Field(20, ge=1)
    """Evaluate on the held-out set every this many steps."""
    patience: int = Field(3, ge=1)
    """Stop early after this many evaluations without a better held-out loss."""
    save_every: int = Field(50, ge=1)
    """Write a checkpoint (for --resume) every this many steps."""
    filter_boilerplate: bool = False
    """Do not train on replies that are not the companion's voice: refusals and
    'As an AI language model' boilerplate (they stay in as context)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping."""
    preference_pairs: int = Field(0, ge=0)
    """After the main training, DPO on this many moments of the training conversations: the
    real reply chosen, the tuned model's own drawn reply rejected (finetune/preference.py);
    0: none."""
    preference_beta: float = Field(0.1, gt=0)
    """DPO's beta: how far the adapter may move from where the main training left it."""
    preference_learning_rate: float = Field(5e-5, gt=0)
    """Learning rate of the preference steps (constant)."""
    preference_epochs: float = Field(1, gt=0)
    """Passes over the pairs."""
    preference_batch: int = Field(8, ge=1)
    """Pairs per preference step."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto picks CUDA when there is a GPU."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on a GPU that supports it; on the CPU, fp32 weights with bf16 autocast where
    the CPU has bf16 instructions (AVX512-BF16, AMX), plain fp32 elsewhere."""
    gradient_checkpointing: bool | None = None
    """Trade compute for memory: true checkpoints every decoder layer, false none; empty means
    every layer on a GPU, every second layer on the CPU."""
    qlora: bool = False
    """Load the base model in 4 bits (bitsandbytes, CUDA only): fits 7-8B models in 24 GB."""
    seed: int = 0
    """Seed for shuffling and initialisation."""

    @field_validator("rank")
    @classmethod
    def _vllm_rank(cls, rank: int) -> int:
        if rank not in VLLM_RANKS:
            raise ValueError(f"vLLM serves LoRA ranks {', '.join(map(str, VLLM_RANKS))}; got {rank}")
        return rank


def load_config(path: Path | None = None, overrides: dict | None = None) -> FinetuneConfig:
    """Settings from YAML (default configs/finetune.yaml), then overrides; errors name the file."""
    return read_settings(path or DEFAULT_CONFIG, FinetuneConfig, FinetuneError, overrides or {})
