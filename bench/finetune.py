"""LoRA training throughput: ours, run as a job of the server (POST /api/v1/companions/{id}/finetunes,
trained in its child process), against a plain transformers Trainer + peft baseline (random
batches padded to the longest), same data, same run; and what a training beside the engine
costs replies: time to first token with and without a `concurrent` training running.

The data is a generated history whose conversations vary in length the way chat does
(a line or two up to long evening talks), turned into examples by finetune.dataset. Both
train one epoch with the same LoRA config and the same average number of examples per
step; the figure is real (unpadded) tokens per second. The job runs with
finetune.gpu_sharing: stop (the engine is stopped, so it has the cores the baseline has).

Memory: the job's peak resident memory (its child's, in its metrics) against the trainer's
step as it was before issue 26 (`before`: transformers' loss over the full vocabulary's
logits, LoRA dropout 0.05, fp32, no gradient checkpointing, glibc's default allocator
settings), same batches, in a process of its own; peak RSS and tokens/s of each, one run.

    .venv/bin/python bench/finetune.py [--conversations 48] [--batch-tokens 4096]
        [--max-seq-len 1024] [--rounds 12]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.clients import ttft  # noqa: E402
from bench.serving import homefire_server  # noqa: E402
from finetune.config import FinetuneConfig  # noqa: E402
from finetune.dataset import build  # noqa: E402
from finetune.lora import tokenizer_for  # noqa: E402
from finetune.train import collate, length_grouped, load_model, peak_rss_gb  # noqa: E402
from serve.default_model import ensure_default_model  # noqa: E402
from store.companions import Companion, CompanionStore  # noqa: E402
from store.db import Database  # noqa: E402
from store.history import History  # noqa: E402

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


def before(model_path: str, examples, config: FinetuneConfig, pad_id: int) -> dict:
    """One epoch with the trainer's step as it was before issue 26, in a fresh process."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.05,
                                             target_modules=list(config.target_modules), bias="none",
                                             task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    batches = length_grouped(examples, config.batch_tokens)
    random.Random(config.seed).shuffle(batches)
    started, tokens = time.perf_counter(), 0
    for group in batches:
        batch = collate(group, pad_id)
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch.tokens
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "steps": len(batches),
            "peak_rss_gb": peak_rss_gb()}


def apart(function, *args):
    """function(*args) in a fresh process: its peak memory and allocator settings its own."""
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(function, *args).result()


def with_history(conversations: list[tuple[str, list[dict]]]) -> Path:
    """A data directory where the owner has had these conversations with kit."""
    data_dir = Path(tempfile.mkdtemp(prefix="homefire-bench-finetune-"))
    db = Database(data_dir / "homefire.db")
    CompanionStore(db).put(KIT, "api")
    history = History(db)
    for _, messages in conversations:
        conversation = history.create_conversation("kit").id
        for message in messages:
            history.append(conversation, message["role"], message["content"])
    db.close()
    return data_dir


def server_config(sharing: str) -> str:
    return (f"companions_dir: {REPO / 'configs' / 'companions'}\nlimits:\n  requests_per_minute: 0\n"
            f"memory:\n  top_k: 0\nfinetune:\n  gpu_sharing: {sharing}\n  samples: 1\n")


def follow(client: httpx.Client, job_id: str, until) -> dict:
    while not until(job := client.get(f"/api/v1/finetunes/{job_id}").json()):
        if job["state"] in ("failed", "cancelled", "interrupted"):
            sys.exit(f"job {job_id} {job['state']}: {job['error']}")
        time.sleep(0.5)
    return job


def ours(conversations, settings: dict) -> dict:
    """Our trainer as the server runs it: a job, in its child process, the engine stopped."""
    with homefire_server(with_history(conversations), server_config("stop")) as (url, key):
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        answer = client.post("/api/v1/companions/kit/finetunes", json=settings)
        assert answer.status_code == 202, answer.text
        job = follow(client, answer.json()["id"], lambda j: j["state"] == "done")
    metrics = job["metrics"]
    return {"tokens": metrics["tokens"], "seconds": metrics["seconds"],
            "tokens_per_s": metrics["tokens_per_s"], "steps": metrics["steps"], "job": job["id"],
            "peak_rss_gb": metrics.get("peak_rss_gb")}


def replies_beside_training(conversations, settings: dict, rounds: int) -> dict:
    """TTFT p50 of streamed replies, alone and while a `concurrent` training (these settings,
    50 epochs: it outlasts the replies) runs."""
    body = {"model": "kit", "max_tokens": 16, "stream": True, "store": False, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me about the garden tonight."}]}
    with homefire_server(with_history(conversations), server_config("concurrent")) as (url, key):
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        ttft(client, body)   # warm-up
        alone = [ttft(client, body) for _ in range(rounds)]
        job = client.post("/api/v1/companions/kit/finetunes", json=settings | {"epochs": 50}).json()
        follow(client, job["id"], lambda j: j["state"] == "running" and (j["step"] or 0) >= 1)
        during = [ttft(client, body) for _ in range(rounds)]
        still = client.get(f"/api/v1/finetunes/{job['id']}").json()
        assert still["state"] == "running", f"the training ended before the replies did: {still}"
        client.post(f"/api/v1/finetunes/{job['id']}/cancel")
    return {"alone_ms": 1000 * statistics.median(alone), "during_ms": 1000 * statistics.median(during),
            "alone_p95_ms": 1000 * sorted(alone)[int(0.95 * (rounds - 1))],
            "during_p95_ms": 1000 * sorted(during)[int(0.95 * (rounds - 1))],
            "steps_meanwhile": still["step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=48)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=12, help="replies timed alone and beside a training")
    args = parser.parse_args()
    model_path = str(ensure_default_model(Path(tempfile.gettempdir()) / "homefire-bench-models"))
    tokenizer = tokenizer_for(model_path)
    settings = {"epochs": 1, "batch_tokens": args.batch_tokens, "max_seq_len": args.max_seq_len,
                "eval_share": 0, "warmup_steps": 2}
    config = FinetuneConfig(**settings)
    conversations = history(args.conversations)
    data = build(tokenizer, KIT, conversations, config)
    examples = data.train
    lengths = [len(e.input_ids) for e in examples]
    mean = statistics.fmean(lengths)
    # The same average number of examples per optimizer step as ours.
    batch_size = max(1, round(len(examples) / len(length_grouped(examples, args.batch_tokens))))
    print(f"{len(examples)} examples, {sum(lengths)} tokens, length {min(lengths)}-{max(lengths)} "
          f"(mean {mean:.0f}); baseline batch size {batch_size}", flush=True)
    mine = ours(conversations, settings)
    print(f"ours (job {mine['job']}): {mine['tokens_per_s']:.0f} tokens/s ({mine['steps']} steps, "
          f"{mine['seconds']:.1f} s), peak {mine['peak_rss_gb']} GB", flush=True)
    old = apart(before, model_path, examples, config, tokenizer.pad_token_id)
    print(f"before issue 26: {old['tokens_per_s']:.0f} tokens/s ({old['steps']} steps, "
          f"{old['seconds']:.1f} s), peak {old['peak_rss_gb']} GB", flush=True)
    base = baseline(model_path, tokenizer, examples, config, batch_size)
    print(f"baseline: {base['tokens_per_s']:.0f} tokens/s ({base['steps']} steps, {base['seconds']:.1f} s)",
          flush=True)
    replies = replies_beside_training(conversations, settings, args.rounds)
    print(f"\nmachine: {platform.machine()}, {'cuda' if torch.cuda.is_available() else 'cpu'}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"ratio ours / baseline: {mine['tokens_per_s'] / base['tokens_per_s']:.2f}   (goal >= 1.3)")
    print(f"memory: peak {mine['peak_rss_gb']} GB against {old['peak_rss_gb']} GB before (goal < 4), "
          f"tokens/s ratio {mine['tokens_per_s'] / old['tokens_per_s']:.2f} (goal >= 0.9)")
    print(f"replies' TTFT p50 alone {replies['alone_ms']:.0f} ms, beside a concurrent training "
          f"{replies['during_ms']:.0f} ms ({replies['steps_meanwhile']} steps meanwhile): ratio "
          f"{replies['during_ms'] / replies['alone_ms']:.2f}; p95 {replies['alone_p95_ms']:.0f} / "
          f"{replies['during_p95_ms']:.0f} ms")
    print(json.dumps({"ours": mine, "before": old, "baseline": base, "replies": replies}))


KIT = Companion(id="kit", name="Kit")


if __name__ == "__main__":
    main()
