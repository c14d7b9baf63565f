"""LoRA training with peft: length-grouped batches, evaluation, early stopping, checkpoints.

Batches are built from examples of similar length up to `batch_tokens` (padding
included), so little compute goes to padding; their order is shuffled each epoch. On a
GPU: bf16 and gradient checkpointing (QLoRA with `qlora`). On the CPU: fp32 weights, bf16
autocast where the CPU computes bf16 natively (AVX512-BF16, AMX), every second decoder layer
checkpointed, and glibc told to give large freed blocks back (see `steady_memory`).

The loss never holds the full vocabulary's logits for a batch: only the positions that are
trained on go through the output layer, a chunk at a time, each chunk recomputed in the
backward pass (`token_loss`). With 4,096-token batches and a 49k vocabulary the logits alone
were 0.8 GB, three times over (float copy, log-softmax, its gradient).
"""

from __future__ import annotations

import ctypes
import json
import math
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

from finetune.config import FinetuneConfig, FinetuneError
from finetune.dataset import IGNORE, Example
from store.files import written_whole

Report = Callable[[dict], None]


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    tokens: int          # real (unpadded) tokens


def collate(examples: list[Example], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return Batch(ids, mask, labels, sum(len(e.input_ids) for e in examples))


def length_grouped(examples: list[Example], batch_tokens: int) -> list[list[Example]]:
    """Batches of similar lengths whose padded size stays within batch_tokens."""
    batches, current = [], []
    for example in sorted(examples, key=lambda e: len(e.input_ids)):
        width = len(example.input_ids)   # the longest so far: examples come shortest first
        if current and width * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(example)
    if current:
        batches.append(current)
    return batches


def pick_device(config: FinetuneConfig) -> tuple[torch.device, torch.dtype]:
    """Where the model lives and its weights' dtype (bf16 on a GPU that supports it)."""
    cuda = torch.cuda.is_available()
    if config.device == "cuda" and not cuda:
        raise FinetuneError("device: cuda was asked for, but torch sees no CUDA GPU")
    device = torch.device("cuda" if config.device == "cuda" or (config.device == "auto" and cuda) else "cpu")
    if device.type == "cuda" and (config.precision == "bf16" or (config.precision == "auto"
                                                                and torch.cuda.is_bf16_supported())):
        return device, torch.bfloat16
    return device, torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), so autocast speeds it up."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(config: FinetuneConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast over fp32 weights on the CPU: `precision: bf16`, or `auto` where the CPU
    has bf16 (elsewhere emulated bf16 is slower than fp32). None: the weights' own dtype."""
    if device.type != "cpu" or config.precision == "fp32":
        return None
    return torch.bfloat16 if config.precision == "bf16" or cpu_has_bf16() else None


def steady_memory() -> None:
    """Let glibc return freed blocks over 4 MiB to the system at once. By default it raises
    that threshold as blocks are freed, up to 32 MiB, and keeps the activations freed by each
    backward pass in its heap, where the next step's differently sized tensors rarely fit: the
    CPU training's resident memory grew to several times what was live (7 GB for 2 GB). A
    fixed threshold costs page faults; 4 MiB was the best trade measured (bench/finetune.py)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)    # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass                                                # not glibc: nothing to tune


def checkpoint_layers(model, config: FinetuneConfig, device: torch.device) -> None:
    """Gradient checkpointing: every decoder layer on a GPU (or when asked), every second one
    on the CPU by default (half the activations, for about a fifth of the speed in fp32), none
    when off."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if config.gradient_checkpointing is False:
        return
    every = 1 if config.gradient_checkpointing or device.type == "cuda" else 2
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % every == 0


def load_model(model_path: str, config: FinetuneConfig):
    """The base model wrapped with fresh LoRA adapters."""
    from transformers import AutoModelForCausalLM

    device, dtype = pick_device(config)
    kwargs: dict = {"dtype": dtype}
    if config.qlora:
        if device.type != "cuda":
            raise FinetuneError("qlora: 4-bit loading needs a CUDA GPU (bitsandbytes)")
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as err:
            raise FinetuneError("qlora needs bitsandbytes: pip install bitsandbytes") from err
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": 0}
    if device.type == "cpu":
        steady_memory()
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if config.qlora:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model)
    else:
        model.to(device)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if missing := [m for m in config.target_modules if m not in names]:
        raise FinetuneError(f"target_modules: {', '.join(missing)} not found in {model_path}")
    checkpoint_layers(model, config, device)
    model.config.use_cache = False
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), device


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GB (what a training asks of the machine)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1e9 if sys.platform == "darwin" else 1e6), 2)


LOSS_CHUNK = 256   # positions per pass through the output layer: 50 MB of float32 logits


def decoded(model, batch: Batch, device: torch.device, autocast: torch.dtype | None = None):
    """The causal LM under the adapters, and the decoder's last hidden states for the batch
    (before the output layer, which callers run only where they need logits)."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        hidden = causal.get_decoder()(input_ids=batch.input_ids.to(device),
                                      attention_mask=batch.attention_mask.to(device)).last_hidden_state
    return causal, hidden


def token_loss(model, batch: Batch, device: torch.device, autocast: torch.dtype | None = None
               ) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's trained positions, and how many there are."""
    losses, _ = token_losses(model, batch, device, autocast)
    return losses.sum(), len(losses)


def token_losses(model, batch: Batch, device: torch.device, autocast: torch.dtype | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy at each of the batch's trained positions (row by row), and the row of
    each. The decoder runs once; the output layer only over trained positions, LOSS_CHUNK at a
    time, each chunk's logits recomputed in the backward pass instead of kept."""
    causal, hidden = decoded(model, batch, device, autocast)
    labels = batch.labels.to(device)[:, 1:]
    trained = labels != IGNORE
    rows = trained.nonzero()[:, 0]
    hidden, labels = hidden[:, :-1][trained], labels[trained]
    head = causal.get_output_embeddings()
    cap = getattr(causal.config, "final_logit_softcapping", None)

    def chunk_losses(states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = head(states)
        logits = logits.float()
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return F.cross_entropy(logits, targets, reduction="none")

    parts = [hidden.new_zeros(0, dtype=torch.float32)]
    for start in range(0, len(labels), LOSS_CHUNK):
        part = (hidden[start:start + LOSS_CHUNK], labels[start:start + LOSS_CHUNK])
        parts.append(checkpoint(chunk_losses, *part, use_reentrant=False) if torch.is_grad_enabled()
                     else chunk_losses(*part))
    return torch.cat(parts), rows


@torch.no_grad()
def evaluate(model, examples: list[Example], batch_tokens: int, pad_id: int, device,
             autocast: torch.dtype | None = None) -> float:
    """Mean loss per trained token over the examples."""
    model.eval()
    total, count = 0.0, 0
    for group in length_grouped(examples, batch_tokens):
        loss, trained = token_loss(model, collate(group, pad_id), device, autocast)
        total += loss.item()
        count += trained
    model.train()
    return total / max(count, 1)


class Trainer:
    def __init__(self, model, device, train: list[Example], held: list[Example], config: FinetuneConfig,
                 pad_id: int, out_dir: Path, report: Report | None = None, step_limit: int | None = None):
        self.model, self.device, self.config = model, device, config
        self.train_examples, self.held = train, held
        self.pad_id, self.out_dir, self.report = pad_id, out_dir, report or (lambda _: None)
        self.autocast = autocast_dtype(config, device)
        self.batches = length_grouped(train, config.batch_tokens)
        per_epoch = len(self.batches)
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
        if step_limit:   # the server's ceiling for a member's job (finetune.limits.max_steps)
            self.total_steps = min(self.total_steps, step_limit)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        warmup = min(config.warmup_steps, self.total_steps // 2)
        decay = max(self.total_steps - warmup, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(
            (step + 1) / max(warmup, 1), max(0.0, (self.total_steps - step) / decay)))
        self.step, self.best, self.bad_evals = 0, math.inf, 0
        self.history: list[dict] = []

    def order(self, epoch: int) -> list[int]:
        order = list(range(len(self.batches)))
        random.Random(self.config.seed + epoch).shuffle(order)
        return order

    def run(self) -> dict:
        torch.manual_seed(self.config.seed)
        self.model.train()
        started, tokens, stopped_early = time.perf_counter(), 0, False
        while self.step < self.total_steps:
            epoch, index = divmod(self.step, len(self.batches))
            batch = collate(self.batches[self.order(epoch)[index]], self.pad_id)
            total, trained = token_loss(self.model, batch, self.device, self.autocast)
            loss = total / max(trained, 1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            tokens += batch.tokens
            elapsed = time.perf_counter() - started
            point = {"step": self.step, "loss": loss.item(), "tokens_per_s": tokens / elapsed,
                     "lr": self.scheduler.get_last_lr()[0], "total_steps": self.total_steps}
            if self.held and (self.step % self.config.eval_every == 0 or self.step == self.total_steps):
                point["eval_loss"] = evaluate(self.model, self.held, self.config.batch_tokens,
                                              self.pad_id, self.device, self.autocast)
                if point["eval_loss"] < self.best - 1e-4:
                    self.best, self.bad_evals = point["eval_loss"], 0
                    self.save(self.out_dir)
                else:
                    self.bad_evals += 1
            self.history.append(point)
            self.report(point)
            if self.step % self.config.save_every == 0 and self.step < self.total_steps:
                self.checkpoint()
            if self.bad_evals >= self.config.patience:
                stopped_early = True
                break
        if not self.held:
            self.save(self.out_dir)
        seconds = time.perf_counter() - started
        tail = [point["loss"] for point in self.history[-5:]]   # a resumed run's history is whole
        return {"steps": self.step, "first_loss": self.history[0]["loss"],
                "train_loss": sum(tail) / len(tail),
                "eval_loss": None if math.isinf(self.best) else self.best, "tokens": tokens,
                "seconds": seconds, "tokens_per_s": tokens / seconds, "stopped_early": stopped_early,
                "peak_rss_gb": peak_rss_gb(), "history": self.history}

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory, safe_serialization=True)

    def checkpoint(self) -> None:
        """Adapter, optimizer and history in `checkpoint/`; trainer_state.pt comes last, by
        rename, so the state file is never half-written. A kill between the files leaves the
        previous state beside an adapter up to save_every steps newer: the resumed run repeats
        those steps on it, and keeps the history only up to the state's step."""
        directory = self.out_dir / "checkpoint"
        self.save(directory)
        (directory / "history.json").write_text(json.dumps(self.history))
        with written_whole(directory / "trainer_state.pt") as partial:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "step": self.step, "best": self.best, "bad_evals": self.bad_evals}, partial)

    def resume(self) -> None:
        directory = self.out_dir / "checkpoint"
        state_file = directory / "trainer_state.pt"
        if not state_file.exists():
            raise FinetuneError(f"nothing to resume: no checkpoint in {directory}")
        set_peft_model_state_dict(self.model, load_file(directory / "adapter_model.safetensors"))
        state = torch.load(state_file, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.best, self.bad_evals = state["step"], state["best"], state["bad_evals"]
        self.history = [p for p in json.loads((directory / "history.json").read_text())
                        if p["step"] <= self.step]
