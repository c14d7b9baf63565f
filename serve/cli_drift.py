"""`homefire drift` and `homefire migrate`: no silent change of voice, and a voice carried to a
new base model with the figures shown before anything is switched."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from serve.cli_base import UsageError, client
from serve.cli_voice import _follow, _job_settings, add_training_flags, version_arg
from serve.client import ServerError
from store.users import LOCAL


def _model(path: Path) -> str:
    """--model, as the server (on this machine) finds it: a directory, absolute."""
    if not path.is_dir():
        raise UsageError(f"--model {path}: not a directory; give a local model directory (safetensors "
                         "weights, config and tokenizer)")
    return str(path.resolve())


def _run(args: argparse.Namespace, route: str, body: dict, what: str) -> dict:
    """A drift or migration job of the running server (else of the command's own Homefire),
    followed to its end: its comparison."""
    own = {"config": str(args.finetune_config)} if getattr(args, "finetune_config", None) else {}
    with client(args, "jobs", settings={"finetune": own}) as here:
        if own and not here.in_process:
            print("the server's finetune.config picks the probes; --finetune-config applies without a "
                  "server", file=sys.stderr)
        job = here.request("POST", f"/api/v1/companions/{args.companion}/{route}", json=body)
        job = _follow(here, job, what)
    if job["state"] != "done":
        raise ServerError(f"job {job['id']} {job['state']}: {job.get('error') or 'no reason given'}")
    return job


def cmd_drift(args: argparse.Namespace) -> None:
    if (args.against is None) == (args.model is None):
        raise UsageError("say what to compare the current setup with: --against vN (or base), "
                         "or --model PATH")
    body = {"probes": args.probes, "max_new_tokens": args.max_new_tokens}
    body |= {"model": _model(args.model)} if args.model is not None else {"against": args.against}
    result = _run(args, "drifts", body, f"comparing {args.companion}")["comparison"]
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
            ("told apart from the real", number((a.get("told_apart") or {}).get("characters"), 2),
             number((b.get("told_apart") or {}).get("characters"), 2)),
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
    new_path = _model(args.model)
    body = {"model": new_path, "samples": args.samples, "max_new_tokens": args.max_new_tokens,
            "settings": _job_settings(args)}
    job = _run(args, "migrations", body, f"tuning {args.companion} on {args.model.name}")
    result, version, companion = job["comparison"], job["version"], args.companion
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    old = result["old"]["adapter"] or "base"
    _side_by_side(old, f"{Path(new_path).name} {version}", result["old"], result["new"])
    for row in result["probes"][:3]:
        print(f"\n{row['prompt'][:100]}\n  real  {row['real'][:100]}\n  old   {row['old'][:100]}"
              f"\n  new   {row['new'][:100]}")
    print(f"\nnothing was switched. {companion} {version} was trained on {new_path}: to move to it, set "
          f"engine.model: {new_path} in the settings and restart the server (it names the change), then "
          f"`homefire adapter use {companion} {version}`; `homefire drift {companion} --model "
          f"{new_path}` compares again at any time.")


def add_commands(sub, remote: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "drift", parents=[remote], help="compare the companion's voice in two setups, side by side",
        description="Run fixed probes (the prompts before the companion's real replies in its held-out "
        "conversations) through the current setup (the server's base model and the adapter in use) and "
        "another: an adapter version (--against vN, or base), or another base model (--model PATH, with "
        "the newest version trained on it, if any). Prints greedy replies and the voice figures of "
        "`homefire eval` side by side; the same setup gives the same replies and figures. It is a job "
        "(POST /api/v1/companions/ID/drifts): of the server running on the data directory, in its "
        "training queue, else of this command's own Homefire.")
    p.add_argument("companion", help="companion id")
    p.add_argument("--against", metavar="vN|base", type=lambda v: v if v == "base" else version_arg(v),
                   help="another adapter version of the companion, or base")
    p.add_argument("--model", type=Path, metavar="PATH", help="another base model (a local directory)")
    p.add_argument("--probes", type=int, default=8,
                   help="how many held-out replies to probe with (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest generated reply (default 48)")
    p.add_argument("--finetune-config", type=Path, help="fine-tuning YAML whose eval_share picks the probes")
    p.add_argument("--user", default=LOCAL, help="act for this member, without a server (default: local): "
                   "their held-out conversations")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_drift)

    p = sub.add_parser(
        "migrate", parents=[remote], help="carry a companion's voice to a new base model",
        description="Tune the companion's voice again on another base model (--model PATH) from its "
        "history, evaluate the old setup and the new one on the same held-out probes, and show their "
        "voice figures side by side. Nothing is switched: the new version waits until the server runs "
        "that model and you choose it (`homefire adapter use`). It is an admin's job (POST "
        "/api/v1/companions/ID/migrations): of the server running on the data directory, in its training "
        "queue, else of this command's own Homefire.")
    p.add_argument("companion", help="companion id")
    p.add_argument("--model", type=Path, required=True, metavar="PATH",
                   help="the new base model's directory")
    p.add_argument("--samples", type=int, default=8, help="held-out replies to compare on (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest generated reply (default 48)")
    p.add_argument("--user", default=LOCAL, help="act for this member, without a server (default: local): "
                   "their history (an admin's: a member may not name a directory on the server)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_training_flags(p)
    p.set_defaults(func=cmd_migrate)
