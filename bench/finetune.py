"""LoRA training throughput: ours (length-grouped batches) against a plain transformers
Trainer + peft baseline (random batches padded to the longest), same data, same run.

The data is a generated history whose conversations vary in length the way chat does
(a line or two up to long evening talks), turned into examples by finetune.dataset. Both
train one epoch with the same LoRA config and the same average number of examples per
step; the figure is real (unpadded) tokens per second.

    .venv/bin/python bench/finetune.py [--conversations 48] [--batch-tokens 2048]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune.config import FinetuneConfig  # noqa: E402
from finetune.dataset import build  # noqa: E402
from finetune.lora import tokenizer_for  # noqa: E402
from finetune.train import Trainer, length_grouped, load_model  # noqa: E402
from memory.companions import Companion  # noqa: E402
from serve.default_model import ensure_default_model  # noqa: E402

WORDS = "the rain garden piano soup stars train sister film coffee walk letter music river quiet".split()


def history(n: int, seed: int = 0) -> list[tuple[str, list[dict]]]:
    rng = random.Random(seed)
    conversations = []
    for c in range(n):
        turns = rng.choice([1, 1, 2, 3, 5, 8])
        messages = []
        for _ in range(turns):
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))})
            reply = " ".join(rng.choices(WORDS, k=rng.randint(5, 60)))
            messages.append({"role": "assistant", "content": f"oh, {reply} ~ purr ~"})
        conversations.append((f"c{c}", messages))
    return conversations


def baseline(model_path: str, tokenizer, examples, config: FinetuneConfig, batch_size: int) -> dict:
    from transformers import DataCollatorForSeq2Seq, TrainingArguments
    from transformers import Trainer as HFTrainer

    model, _ = load_model(model_path, config)
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
            for e in examples]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch_size, num_train_epochs=1,
                                 learning_rate=config.learning_rate, lr_scheduler_type="linear",
                                 warmup_steps=config.warmup_steps, max_grad_norm=config.max_grad_norm,
                                 logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True,
                                 dataloader_num_workers=0, remove_unused_columns=False, seed=config.seed,
                                 disable_tqdm=True)
        trainer = HFTrainer(model=model, args=args, train_dataset=rows,
                            data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest",
                                                                 label_pad_token_id=-100))
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    tokens = sum(len(e.input_ids) for e in examples)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "steps": trainer.state.global_step}


def ours(model_path: str, examples, config: FinetuneConfig, pad_id: int) -> dict:
    model, device = load_model(model_path, config)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, device, examples, [], config, pad_id, Path(out))
        metrics = trainer.run()
    return {"tokens": metrics["tokens"], "seconds": metrics["seconds"],
            "tokens_per_s": metrics["tokens_per_s"], "steps": metrics["steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=48)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--max-seq-len", type=int, default=512)
    args = parser.parse_args()
    model_path = str(ensure_default_model(Path(tempfile.gettempdir()) / "homefire-bench-models"))
    tokenizer = tokenizer_for(model_path)
    config = FinetuneConfig(epochs=1, batch_tokens=args.batch_tokens, max_seq_len=args.max_seq_len,
                            eval_share=0, warmup_steps=2)
    data = build(tokenizer, Companion(id="kit", name="Kit"), history(args.conversations), config)
    examples = data.train
    lengths = [len(e.input_ids) for e in examples]
    mean = statistics.fmean(lengths)
    # The same average number of examples per optimizer step as ours.
    batch_size = max(1, round(len(examples) / len(length_grouped(examples, args.batch_tokens))))
    print(f"{len(examples)} examples, {sum(lengths)} tokens, length {min(lengths)}-{max(lengths)} "
          f"(mean {mean:.0f}); baseline batch size {batch_size}", flush=True)
    mine = ours(model_path, examples, config, tokenizer.pad_token_id)
    print(f"ours    : {mine['tokens_per_s']:.0f} tokens/s ({mine['steps']} steps, {mine['seconds']:.1f} s)",
          flush=True)
    base = baseline(model_path, tokenizer, examples, config, batch_size)
    print(f"baseline: {base['tokens_per_s']:.0f} tokens/s ({base['steps']} steps, {base['seconds']:.1f} s)")
    print(f"\nmachine: {platform.machine()}, {'cuda' if torch.cuda.is_available() else 'cpu'}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"ratio ours / baseline: {mine['tokens_per_s'] / base['tokens_per_s']:.2f}   (goal >= 1.3)")


if __name__ == "__main__":
    main()
