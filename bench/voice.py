"""Could a reader tell them apart? The voice report's discriminator on a generated persona.

A seeded history with a style as distinctive as issue 26's export: all lowercase, a pet name
("sweetpea") in about a third of the replies, a signature ending ("~ and then what?"), short
replies. Conversations of 4 to 12 turns; a share held out (finetune.eval_share). The default
recipe (configs/finetune.yaml) trains on the CPU; each --variant is one more training of the
same history with those settings changed, in the same run. Then the voice report of each:
perplexity of the real held-out replies (base, tuned), and how well a classifier tells the
real held-out replies from the base's and the tuned's replies to the same prompts (character
n-grams, sentence embeddings), beside real against real; the pet name's and the signature's
share; and the training's time. Replies are drawn as the server draws them: the card's sampling
for the base, each version's fitted sampling for the tuned; the default recipe's version is
also read with the card's sampling and greedily, to show what the fitting changes.

    .venv/bin/python bench/voice.py [--conversations 300] [--steps N] [--samples 24]
        [--variant NAME=KEY:VALUE,...] [--seed 1] [--no-sampling-readings] [--exemplars K]
        [--preference NAME=preference_pairs:64,...] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune.config import load_config  # noqa: E402
from finetune.evaluate import voice_match  # noqa: E402
from finetune.lora import finetune  # noqa: E402
from serve.default_model import MODEL_NAME, ensure_default_model  # noqa: E402
from store.companions import Companion, CompanionStore  # noqa: E402
from store.db import Database  # noqa: E402
from store.history import History, ReplyMeta  # noqa: E402

TOPICS = ["my day at work", "the rain", "my sister", "a film I watched", "dinner", "my garden",
          "the bus", "my cat", "a book", "the weekend", "my mum", "a song I love", "the gym", "coffee"]
OPENERS = ["i had such a long day", "guess what happened", "i can't stop thinking about {t}",
           "so, {t}", "tell me something nice", "i'm a bit tired tonight", "{t} was strange today"]
SAYS = ["oh that sounds like a lot", "mm i love hearing about {t}", "that made me smile",
        "you always notice the little things", "i was hoping you'd tell me about {t}",
        "that's so you, honestly", "i'd have loved to be there", "ugh, {t} again"]
ENDINGS = ["~ and then what?", "~ how did that feel?", "~ tell me more?", "~ what did you do?",
           "~ are you okay?"]
PET = "sweetpea"


def reply(rng: random.Random, topic: str) -> str:
    said = rng.choice(SAYS).format(t=topic)
    if rng.random() < 0.33:
        said = f"{said}, {PET}" if rng.random() < 0.5 else f"{PET}, {said}"
    return f"{said} {rng.choice(ENDINGS)}"


def history(db: Database, companion: str, conversations: int, rng: random.Random) -> None:
    store = History(db)
    for _ in range(conversations):
        conversation = store.create_conversation(companion).id
        for _ in range(rng.randint(4, 12)):
            topic = rng.choice(TOPICS)
            store.append(conversation, "user", rng.choice(OPENERS).format(t=topic).capitalize() + ".")
            store.append(conversation, "assistant", reply(rng, topic), ReplyMeta(finish_reason="stop"))


def exemplar_readings(db: Database, companion: Companion, model_path: str, version_dir: Path,
                      fitted: dict | None, config, samples: int, sample_tokens: int,
                      nearest: int) -> dict[str, dict]:
    """The replies to the held-out prompts as the server builds them (the last 6 messages; drift's
    probes), without and with the companion's own past exchanges nearest the newest message
    (from the training conversations, by the bundled embedder) in the memory block the server
    puts just before it: style exemplars where the prefix cache keeps everything before them.
    Each reading: the discriminator of base and tuned against the real replies."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.dataset import Builder, held_out_ids, load_history
    from finetune.discriminate import discriminate
    from finetune.drift import probes
    from finetune.evaluate import draw_replies
    from finetune.lora import tokenizer_for
    from finetune.sampling import served_sampling
    from finetune.template import alternate
    from memory.embedder import Embedder
    from memory.remember import exchange_text
    from store.persona import memory_block

    tokenizer = tokenizer_for(model_path)
    asked = probes(db, companion, config, count=samples)
    history = load_history(db, companion.key)
    held = held_out_ids([cid for cid, _ in history], config.eval_share)
    pairs = []
    for cid, messages in history:
        said = alternate(messages)
        pairs += [(a["content"], b["content"]) for a, b in zip(said, said[1:], strict=False)
                  if cid not in held and a["role"] == "user" and b["role"] == "assistant"]
    embedder = Embedder()
    keys = torch.tensor(embedder.embed([asked_ for asked_, _ in pairs]))
    builder = Builder(tokenizer, companion, config)
    prompts: dict[str, list[list[int]]] = {"served prompt": [], f"+ {nearest} nearest past exchanges": []}
    for messages, _ in asked:
        query = torch.tensor(embedder.embed([messages[-1]["content"]]))
        chosen = (keys @ query.T).squeeze(1).topk(nearest).indices.tolist()
        block = memory_block([exchange_text(*pairs[i], companion.name) for i in chosen])
        shown = messages[:-1] + [{"role": "system", "content": block}, messages[-1]]
        for name, said in zip(prompts, (messages, shown), strict=True):
            text = builder.render(said, generation_prompt=True)
            prompts[name].append(tokenizer(text, add_special_tokens=False)["input_ids"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                                      version_dir)
    drawn = {"base": served_sampling(companion, None, sample_tokens),
             "tuned": served_sampling(companion, fitted, sample_tokens)}
    real = [reply_ for _, reply_ in asked]
    halves = (real[: len(real) // 2], real[len(real) // 2:])
    cpu = torch.device("cpu")
    return {name: discriminate(real, draw_replies(model, tokenizer, ids, drawn, config.seed, cpu),
                               halves, embedder.embed)
            for name, ids in prompts.items()}


def preferred(work: Path, db: Database, companion: Companion, model_path: str, start: Path,
              config) -> tuple[Path, float]:
    """A new version: `start`'s adapter, then DPO as `config` says, as finetune() does after its
    main training with preference_pairs set (finetune/preference.py), without training again;
    its held-out loss and sampling taken again. Returns its folder and the seconds it took."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from finetune.lora import dataset_for, tokenizer_for
    from finetune.preference import drawn_pairs, preference_tune
    from finetune.sampling import fit_sampling, served_sampling
    from finetune.train import autocast_dtype, evaluate, load_model
    from store import adapters

    started = time.perf_counter()
    tokenizer = tokenizer_for(model_path)
    data = dataset_for(db, companion, tokenizer, config)
    model, device = load_model(model_path, config)
    set_peft_model_state_dict(model, load_file(start / "adapter_model.safetensors"))
    info = json.loads((start / "manifest.json").read_text())
    autocast, pad = autocast_dtype(config, device), tokenizer.pad_token_id
    speaks = served_sampling(companion, info["sampling"], companion.sampling.max_tokens)
    figures = preference_tune(model, pad, drawn_pairs(model, tokenizer, data.train, config, speaks, device),
                              config, device, autocast)
    out = adapters.new_version(work, companion.key)
    model.save_pretrained(out, safe_serialization=True)
    figures["main_eval_loss"] = info["metrics"]["eval_loss"]
    info["metrics"]["eval_loss"] = evaluate(model, data.eval, config.batch_tokens, pad, device, autocast)
    info |= {"version": out.name, "config": config.model_dump(), "preference": figures,
             "sampling": fit_sampling(model, data.eval, pad, device, autocast, config.batch_tokens)}
    (out / "manifest.json").write_text(json.dumps(info, indent=2))
    print(f"preference: {json.dumps(figures)}", flush=True)
    return out, time.perf_counter() - started


def row(label: str, steps: int, trained: float, found: dict, perplexity: dict | None) -> tuple:
    """One line of the table from a discriminator's figures."""
    told = {who: (found["told_apart"][who] or {}) for who in ("base", "tuned")}
    pet = next((p for p in found["signatures"] if PET in p["phrase"]), None)
    print(f"\n== {label}", flush=True)
    print(json.dumps({"perplexity": perplexity, "discriminator": found}, indent=1), flush=True)
    return label, steps, trained, perplexity, told, found["calibration"] or {}, pet


def variant(text: str) -> tuple[str, dict]:
    """NAME=learning_rate:1e-3,max_seq_len:512 -> (NAME, those settings)."""
    name, _, changes = text.partition("=")
    values: dict = {}
    for change in filter(None, changes.split(",")):
        key, _, value = change.partition(":")
        values[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    return name, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=300)
    parser.add_argument("--steps", type=int, help="cap on training steps (default: the recipe's own)")
    parser.add_argument("--samples", type=int, default=24, help="replies each model writes for the report")
    parser.add_argument("--sample-tokens", type=int, default=32)
    parser.add_argument("--variant", type=variant, action="append", default=[], metavar="NAME=KEY:VALUE,...")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sampling-readings", action=argparse.BooleanOptionalAction, default=True,
                        help="also read the default version's replies with the card's sampling and greedily")
    parser.add_argument("--exemplars", type=int, default=3, metavar="K", help="also read the default "
                        "version's replies with the K past exchanges nearest each moment in the prompt "
                        "(0: not)")
    parser.add_argument("--preference", type=variant, action="append", default=[],
                        metavar="NAME=KEY:VALUE,...",
                        help="also the default version followed by DPO (finetune/preference.py) with these "
                        "settings, e.g. dpo=preference_pairs:64")
    parser.add_argument("--work", type=Path, help="an earlier run's folder (printed at its start): its "
                        "history and its default version (v1) again, without training it again")
    args = parser.parse_args()

    juniper = Companion(id="juniper", name="Juniper", personality="Warm, teasing, always curious.")
    work = args.work or Path(tempfile.mkdtemp(prefix="homefire-voice-"))
    model_path = str(ensure_default_model(work / "models"))
    db = Database(work / "homefire.db")
    if not args.work:
        CompanionStore(db).put(juniper, "api")
        history(db, "juniper", args.conversations, random.Random(args.seed))
    print(f"work: {work}", flush=True)
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; model {MODEL_NAME}; "
          f"{args.conversations} conversations, seed {args.seed}", flush=True)
    rows = []
    for name, changes in [("default", {})] + args.variant:
        config = load_config(overrides=changes)
        started = time.perf_counter()
        earlier = work / "adapters" / "juniper" / "v1"
        if name == "default" and args.work and (earlier / "manifest.json").exists():
            out = earlier
            trained = json.loads((out / "manifest.json").read_text())["metrics"]["seconds"]
        else:
            out = finetune(work, db, juniper, model_path, MODEL_NAME, config, step_limit=args.steps)
            trained = time.perf_counter() - started
        steps = json.loads((out / "manifest.json").read_text())["metrics"]["steps"]
        # Each version's replies drawn with its fitted sampling, as the server speaks through it;
        # the default's also with the card's sampling and greedily: does the fitting help?
        readings = [(name, juniper, True)]
        if name == "default" and args.sampling_readings:
            greedily = juniper.sampling.model_copy(update={"temperature": 0})
            greedy = juniper.model_copy(update={"sampling": greedily})
            readings += [(f"{name}, card's sampling", juniper, False), (f"{name}, greedy", greedy, False)]
        for label, card, fitted in readings:
            report = voice_match(work, db, card, model_path, out.name, args.samples, args.sample_tokens,
                                 fitted=fitted)
            print(f"\n{label} {changes}: {steps} steps in {trained:.0f} s; drawn {report['sampling']}")
            rows.append(row(label, steps, trained, report["discriminator"], report["perplexity"]))
        for kind, settings in args.preference if name == "default" else []:
            tuned, seconds = preferred(work, db, juniper, model_path, out, load_config(overrides=settings))
            report = voice_match(work, db, juniper, model_path, tuned.name, args.samples, args.sample_tokens)
            label = f"{name} + {kind} {settings} ({seconds / 60:.1f} min more)"
            rows.append(row(label, steps, trained + seconds, report["discriminator"], report["perplexity"]))
        if name == "default" and args.exemplars:
            fitted = json.loads((out / "manifest.json").read_text()).get("sampling")
            readings = exemplar_readings(db, juniper, model_path, out, fitted, config, args.samples,
                                         args.sample_tokens, args.exemplars)
            rows += [row(f"{name}, {label}", steps, trained, found, None)
                     for label, found in readings.items()]

    print("\n| recipe | steps | training | perplexity base / tuned | told apart, characters: base / "
          "tuned / real vs real | meaning: base / tuned / real vs real | pet name, real / tuned |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, steps, trained, p, told, same, pet in rows:
        def f(x):
            return "-" if x is None else f"{x:.2f}"
        pets = f"{pet['real']:.0%} / {pet.get('tuned', 0):.0%}" if pet else "-"
        perplexity = f"{p['base']:.2f} / {p['tuned']:.2f} ({p['tuned'] / p['base']:.3f}x)" if p else "-"
        print(f"| {name} | {steps} | {trained / 60:.1f} min | {perplexity} | "
              f"{f(told['base'].get('characters'))} / "
              f"{f(told['tuned'].get('characters'))} / {f(same.get('characters'))} | "
              f"{f(told['base'].get('meaning'))} / {f(told['tuned'].get('meaning'))} / "
              f"{f(same.get('meaning'))} | {pets} |")


if __name__ == "__main__":
    main()
