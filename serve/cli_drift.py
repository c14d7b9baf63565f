"""`homefire drift` and `homefire migrate`: no silent change of voice, and a voice carried to a
new base model with the figures shown before anything is switched."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from serve.cli_base import Bar, UsageError, resolve_data_dir
from serve.cli_voice import _base_model, _companion, _finetune_config, add_training_flags, version_arg
from store.db import Database
from store.users import LOCAL


def _model_dir(path: Path) -> str:
    from store import adapters

    if not path.is_dir():
        raise UsageError(f"--model {path}: not a directory; give a local model directory (safetensors "
                         "weights, config and tokenizer)")
    adapters.model_sha256(path)   # refuses a folder without safetensors weights, with its name
    return str(path.resolve())


def cmd_drift(args: argparse.Namespace) -> None:
    from finetune.config import load_config
    from finetune.drift import Setup, compare, fitting_version
    from store import adapters

    data_dir = resolve_data_dir(args)
    companion = _companion(args)   # compared here, on this machine
    base_path, _ = _base_model(args)
    current = Setup(base_path, adapters.current(data_dir, companion.key))
    if (args.against is None) == (args.model is None):
        raise UsageError("say what to compare the current setup with: --against vN (or base), "
                         "or --model PATH")
    if args.model is not None:
        other_path = _model_dir(args.model)
        other = Setup(other_path, fitting_version(data_dir, companion, other_path))
    else:
        other = Setup(base_path, None if args.against == "base" else args.against)
    result = compare(data_dir, Database(data_dir / "homefire.db"), companion, current, other,
                     load_config(args.finetune_config), args.user, args.probes, args.max_new_tokens)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    figures = result["figures"]
    _side_by_side(result["current"], result["other"], figures["current"], figures["other"])
    for i, row in enumerate(result["probes"], start=1):
        print(f"\nprobe {i}: {row['prompt'][:100]}")
        print(f"  real     {row['real'][:100]}")
        print(f"  current  {row['current'][:100]}")
        print(f"  other    {'(the same)' if row['same'] else row['other'][:100]}")
    differ = f"; figures differ: {', '.join(result['figures_differ'])}" if result["figures_differ"] else ""
    verdict = (f"drift: {result['replies_differ']} of {len(result['probes'])} replies differ{differ}"
               if result["drift"] else "no drift: the same replies and the same figures")
    print(f"\n{verdict}")


def _side_by_side(left: str, right: str, a: dict, b: dict) -> None:
    def number(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    print(f"{'':28}{left:>20}{right:>20}")
    rows = [("held-out loss", number(a["held_out_loss"]), number(b["held_out_loss"])),
            ("perplexity", number(a["perplexity"], 2), number(b["perplexity"], 2)),
            ("similarity to real replies", number(a["similarity_to_real"]), number(b["similarity_to_real"])),
            ("words per reply", number(a["style"]["words_mean"], 1), number(b["style"]["words_mean"], 1)),
            ("emoji per 100 chars", number(a["style"]["emoji_per_100_chars"], 2),
             number(b["style"]["emoji_per_100_chars"], 2)),
            ("questions per reply", number(a["style"]["questions_per_reply"], 2),
             number(b["style"]["questions_per_reply"], 2)),
            ("lowercase share", number(a["style"]["lowercase_share"], 2),
             number(b["style"]["lowercase_share"], 2))]
    for name, x, y in rows:
        print(f"{name:<28}{x:>20}{y:>20}")


def cmd_migrate(args: argparse.Namespace) -> None:
    from finetune.drift import Setup, probes, voice
    from finetune.lora import finetune
    from store import adapters

    data_dir = resolve_data_dir(args)
    companion = _companion(args)   # trained here, beside the server
    base_path, _ = _base_model(args)
    new_path = _model_dir(args.model)
    if adapters.model_sha256(Path(new_path)) == adapters.model_sha256(Path(base_path)):
        raise UsageError(f"--model {args.model}: these are the weights the server runs already; nothing to "
                         f"migrate to (to tune the voice again: homefire finetune {companion.id})")
    config = _finetune_config(args)
    db = Database(data_dir / "homefire.db")
    asked = probes(db, companion, config, args.user, args.samples)   # before hours of training, not after
    with Bar(f"tuning {companion.id} on {Path(new_path).name}", 0, "step", leave=True) as bar:
        out = finetune(data_dir, db, companion, new_path, new_path, config, report=bar.step, user=args.user)
    old = Setup(base_path, adapters.current(data_dir, companion.key))
    new = Setup(new_path, out.name)
    print(f"evaluating both on {len(asked)} held-out replies...", file=sys.stderr)
    sides = {"old": voice(data_dir, db, companion, old, asked, config, args.user, args.max_new_tokens),
             "new": voice(data_dir, db, companion, new, asked, config, args.user, args.max_new_tokens)}
    result = {"companion": companion.id, "version": out.name, "old": sides["old"], "new": sides["new"],
              "probes": [{"prompt": m[-1]["content"], "real": real, "old": sides["old"]["replies"][i],
                          "new": sides["new"]["replies"][i]} for i, (m, real) in enumerate(asked)],
              "switched": False}
    (out / "migrate.json").write_text(json.dumps(result, ensure_ascii=False, indent=2))
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    _side_by_side(old.label(base_path), f"{Path(new_path).name} {out.name}", sides["old"], sides["new"])
    for row in result["probes"][:3]:
        print(f"\n{row['prompt'][:100]}\n  real  {row['real'][:100]}\n  old   {row['old'][:100]}"
              f"\n  new   {row['new'][:100]}")
    print(f"\nnothing was switched. {companion.id} {out.name} was trained on {new_path}: to move to it, set "
          f"engine.model: {new_path} in the settings and restart the server (it names the change), then "
          f"`homefire adapter use {companion.id} {out.name}`; `homefire drift {companion.id} --model "
          f"{new_path}` compares again at any time.")


def add_commands(sub, remote: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "drift", parents=[remote], help="compare the companion's voice in two setups, side by side",
        description="Run fixed probes (the prompts before the companion's real replies in its held-out "
        "conversations) through the current setup (the server's base model and the adapter in use) and "
        "another: an adapter version (--against vN, or base), or another base model (--model PATH, with "
        "the newest version trained on it, if any). Prints greedy replies and the voice figures of "
        "`homefire eval` side by side; the same setup gives the same replies and figures.")
    p.add_argument("companion", help="companion id")
    p.add_argument("--against", metavar="vN|base", type=lambda v: v if v == "base" else version_arg(v),
                   help="another adapter version of the companion, or base")
    p.add_argument("--model", type=Path, metavar="PATH", help="another base model (a local directory)")
    p.add_argument("--probes", type=int, default=8,
                   help="how many held-out replies to probe with (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest generated reply (default 48)")
    p.add_argument("--finetune-config", type=Path, help="fine-tuning YAML whose eval_share picks the probes")
    p.add_argument("--user", default=LOCAL, help="whose held-out conversations (default: local)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_drift)

    p = sub.add_parser(
        "migrate", parents=[remote], help="carry a companion's voice to a new base model",
        description="Tune the companion's voice again on another base model (--model PATH) from its "
        "history, evaluate the old setup and the new one on the same held-out probes, and show their "
        "voice figures side by side. Nothing is switched: the new version waits until the server runs "
        "that model and you choose it (`homefire adapter use`).")
    p.add_argument("companion", help="companion id")
    p.add_argument("--model", type=Path, required=True, metavar="PATH",
                   help="the new base model's directory")
    p.add_argument("--samples", type=int, default=8, help="held-out replies to compare on (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest generated reply (default 48)")
    p.add_argument("--user", default=LOCAL, help="whose history to learn from (default: local)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_training_flags(p)
    p.set_defaults(func=cmd_migrate)
