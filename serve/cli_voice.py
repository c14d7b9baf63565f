"""`homefire finetune`, `eval` and `adapter`: a companion's voice, trained, measured, switched."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from serve.cli_base import Bar, UsageError, client, local_store, resolve_data_dir
from serve.client import ServerError
from serve.config import load_settings
from serve.sse import DONE
from store.db import Database
from store.users import LOCAL


def _base_model(args: argparse.Namespace) -> tuple[str, str]:
    """(local path, id) of the base model the server runs, converting the embedded one if needed."""
    from serve.default_model import MODEL_NAME, ensure_default_model

    settings = load_settings(args.config)
    if settings.engine.url and not settings.engine.model:
        raise UsageError("engine.url points at an external vLLM: fine-tuning needs the base model's "
                         "weights on this machine (set engine.model to a local directory holding the "
                         "model the workers run)")
    if settings.engine.model:
        if not Path(settings.engine.model).is_dir():
            raise UsageError(f"engine.model {settings.engine.model!r} is not a local directory; "
                             "fine-tuning needs the weights on disk")
        return settings.engine.model, settings.engine.model
    return str(ensure_default_model(resolve_data_dir(args) / "models")), MODEL_NAME


def _companion(args: argparse.Namespace):
    """The companion as `--user` (default local) knows it, for the one command that reads the
    data directory itself, which a running server shares (WAL): a training's dry run."""
    user = getattr(args, "user", LOCAL)
    store = local_store(args)
    companion = store.get(args.companion, user)
    if companion is None:
        raise UsageError(f"no companion named {args.companion!r} that {user} may use; known companions: "
                         f"{', '.join(store.ids(user))}")
    return companion


def _finetune_config(args: argparse.Namespace):
    import yaml

    from finetune.config import load_config

    overrides = {"max_steps": args.steps, "rank": args.rank, "learning_rate": args.lr,
                 "epochs": args.epochs, "max_seq_len": args.max_seq_len}
    if args.filter_boilerplate:
        overrides["filter_boilerplate"] = True
    for item in args.set or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set eval_every=10")
        overrides[key.strip()] = yaml.safe_load(value)
    return load_config(args.finetune_config, overrides)


def version_arg(text: str) -> str | None:
    """An adapter version on the command line: v1, v2, ... ('base' where the base model is meant)."""
    from store.adapters import AdapterError, checked_version

    try:
        return checked_version(text, "adapter version")
    except AdapterError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _job_settings(args: argparse.Namespace) -> dict:
    """What a server's job is asked to change: the flags given, or a whole --finetune-config."""
    import yaml

    settings = _finetune_config(args).model_dump() if args.finetune_config else {}
    settings |= {k: v for k, v in {"max_steps": args.steps, "rank": args.rank, "learning_rate": args.lr,
                                   "epochs": args.epochs, "max_seq_len": args.max_seq_len}.items()
                 if v is not None}
    if args.filter_boilerplate:
        settings["filter_boilerplate"] = True
    for item in args.set or ():
        key, _, value = item.partition("=")
        settings[key.strip()] = yaml.safe_load(value)
    return settings


def _follow(client, job: dict, what: str) -> dict:
    """Follow a job with a progress bar until it ends. Ctrl-C offers to cancel a server's job;
    the command's own Homefire stops it, and it can be resumed from its last checkpoint."""
    bar = Bar(what, 0, "step", leave=True)
    path = f"/api/v1/finetunes/{job['id']}"
    try:
        queue = f" ({job['queue_position']} in the queue)" if job.get("queue_position") else ""
        print(f"{what} (job {job['id']}); Ctrl-C stops it" if client.in_process else
              f"{what} runs in the server as job {job['id']}{queue}; Ctrl-C to cancel it",
              file=sys.stderr, flush=True)
        for name, job in client.stream_events(path, None, method="GET"):  # noqa: B020 (the same job, newer)
            bar.step(job)
            bar.describe(f"{what} ({job['state']})")
            if name == DONE:
                return job
    except KeyboardInterrupt:
        bar.close()
        if client.in_process:
            resume = (f"; `homefire finetune {job['companion']} --resume {job['version']}` continues it from "
                      "its last checkpoint" if job.get("version") and job["kind"] == "train" else "")
            raise UsageError(f"stopped: job {job['id']} is interrupted{resume}") from None
        try:
            answer = input(f"\ncancel job {job['id']}? [y/N] ")
        except (EOFError, KeyboardInterrupt):
            answer = ""
        if answer.strip().lower() in ("y", "yes"):
            client.request("POST", f"/api/v1/finetunes/{job['id']}/cancel")
            raise UsageError(f"job {job['id']} cancelled; no version is left behind") from None
        raise UsageError(f"job {job['id']} goes on in the server; follow it with GET "
                         f"/api/v1/finetunes/{job['id']}, or cancel it with POST "
                         f"/api/v1/finetunes/{job['id']}/cancel") from None
    finally:
        bar.close()
    raise ServerError(f"the stream of job {job['id']} ended before the job did")


GOOD_ENOUGH = 0.65   # told apart at most this often: a reader is mostly guessing (issue 26's goal)


def told_apart_line(found: dict) -> str:
    """How well a reader tells the real replies from each model's, in figures and in words."""
    from finetune.discriminate import in_words

    told, calibration = found["told_apart"], found.get("calibration") or {}
    figures = "   ".join(f"{name} {scores['characters']:.2f}" for name, scores in told.items() if scores)
    tuned = (told.get("tuned") or {}).get("characters")
    same = f" (real vs real {calibration['characters']:.2f})" if "characters" in calibration else ""
    line = f"{figures}{same}: tuned, {in_words(tuned)}"
    if tuned is not None and tuned > GOOD_ENOUGH:
        line += ("\n  next         not there yet: more history to learn from, more steps (--epochs), "
                 "or a bigger base model")
    return line


def _print_voice(job: dict) -> None:
    voice = job.get("voice") or {}
    if "perplexity" in voice:
        p, sim = voice["perplexity"], voice["similarity_to_real"]
        print(f"  perplexity   base {p['base']:.2f}   tuned {p['tuned']:.2f}   "
              f"similarity to the real replies   base {sim['base']:.3f}   tuned {sim['tuned']:.3f}")
        if voice.get("told_apart"):
            print(f"  told apart   {told_apart_line(voice)}")
    elif voice.get("error"):
        print(f"  no voice report: {voice['error']}")


def _dry_run(args: argparse.Namespace) -> None:
    """The dataset a training would build, read here (nothing is written, no lock is taken)."""
    from finetune.dataset import show
    from finetune.lora import dataset_for, tokenizer_for

    config = _finetune_config(args)
    model_path, _ = _base_model(args)
    companion = _companion(args)
    tokenizer = tokenizer_for(model_path)
    db = Database(resolve_data_dir(args) / "homefire.db")
    data = dataset_for(db, companion, tokenizer, config, args.user)
    summary = data.summary()
    for part in ("train", "eval"):
        s = summary[part]
        print(f"{part}: {s['examples']} examples, {s['tokens']} tokens, {s['trained_tokens']} trained "
              f"({summary['conversations'][part]} conversations)")
    if summary["skipped"]:
        print("skipped: " + ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()))
    print("\nan example (« » marks the tokens that are trained):\n")
    print(show(tokenizer, data.train[0]))


def cmd_finetune(args: argparse.Namespace) -> None:
    """A training job: of the running server, else of the command's own Homefire (one way)."""
    if args.dry_run:
        _dry_run(args)
        return
    _finetune_config(args)   # the flags are checked before anything starts
    settings = _job_settings(args)
    with client(args, "jobs") as here:
        if args.resume:
            jobs = here.request("GET", "/api/v1/finetunes")
            job = next((j for j in jobs if j["version"] == args.resume and j["companion"] == args.companion
                        and j["state"] == "interrupted"), None)
            if job is None:
                raise UsageError(f"no interrupted job of yours wrote {args.resume} of {args.companion}; "
                                 "`GET /api/v1/finetunes` lists your jobs")
            job = here.request("POST", f"/api/v1/finetunes/{job['id']}/resume")
        else:
            job = here.request("POST", f"/api/v1/companions/{args.companion}/finetunes", json=settings)
        job = _follow(here, job, f"training {args.companion}")
        later = "; the server uses it from its next start" if here.in_process else ""
    if job["state"] != "done":
        raise ServerError(f"job {job['id']} {job['state']}: {job.get('error') or 'no reason given'}")
    m, name, version = job["metrics"], job["companion"], job["version"]
    held = f", held-out loss {m['eval_loss']:.3f}" if m.get("eval_loss") is not None else ""
    memory = f", peak memory {m['peak_rss_gb']:.1f} GB" if m.get("peak_rss_gb") else ""
    print(f"adapter {version} for {name}: {m['steps']} steps, loss {m['first_loss']:.3f} -> "
          f"{m['train_loss']:.3f}{held}, {m['tokens_per_s']:.0f} tokens/s{memory} (job {job['id']})")
    _print_voice(job)
    print(f"{name} speaks through {version}: {job['switch_reason']}{later}" if job["switched"] else
          f"{name} goes on as before: {job['switch_reason']} (homefire adapter use {name} {version} "
          "switches by hand)")


def cmd_eval(args: argparse.Namespace) -> None:
    """An evaluation job, as cmd_finetune's; --samples and --max-new-tokens size the command's own
    Homefire's report (a server's are its settings')."""
    own = {k: v for k, v in (("samples", args.samples), ("sample_tokens", args.max_new_tokens)) if v}
    with client(args, "jobs", settings={"finetune": own}) as here:
        if own and not here.in_process:
            print("the server's finetune.samples and finetune.sample_tokens size its report; "
                  "--samples and --max-new-tokens apply without a server", file=sys.stderr)
        companion = args.companion
        listing = here.request("GET", f"/api/v1/companions/{companion}/adapters")
        version = args.adapter or listing["current"] or next(
            (v["version"] for v in reversed(listing["versions"])), None)
        if version is None:
            raise UsageError(f"companion {companion!r} has no adapters yet; run `homefire finetune` first")
        job = here.request("POST", f"/api/v1/companions/{companion}/adapters/{version}/evaluations")
        job = _follow(here, job, f"evaluating {companion} {version}")
        if job["state"] != "done":
            raise ServerError(f"job {job['id']} {job['state']}: {job.get('error') or 'no reason given'}")
        if (job.get("voice") or {}).get("error"):
            raise UsageError(job["voice"]["error"])
        result = here.request("GET", f"/api/v1/companions/{companion}/adapters/{version}/report")
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    p, sim = result["perplexity"], result["similarity_to_real"]
    print(f"{companion} {version} on {result['held_out_tokens']} held-out reply tokens:")
    print(f"  perplexity   base {p['base']:.2f}   tuned {p['tuned']:.2f}")
    print(f"  similarity   base {sim['base']:.3f}   tuned {sim['tuned']:.3f}  (to the real replies)")
    if found := result.get("discriminator"):
        print(f"  told apart   {told_apart_line(found)}")
        for p in found["signatures"]:
            print(f"  {p['phrase']!r:>24} in {p['real']:.0%} of the real replies, {p.get('tuned', 0):.0%} of "
                  f"the tuned, {p.get('base', 0):.0%} of the base")
    print(f"the whole report, with samples and a plot: the web app's voice view, or GET "
          f"/api/v1/companions/{companion}/adapters/{version}/report")


def cmd_adapter(args: argparse.Namespace) -> None:
    with client(args, "model") as here:
        listing = here.request("GET", f"/api/v1/companions/{args.companion}/adapters")
        if args.action == "list":
            _print_adapters(args.companion, listing)
            return
        version = getattr(args, "version", None)   # rollback: the one before the version in use
        if args.action == "rollback":
            now = listing["current"]
            if now is None:
                raise UsageError(f"companion {args.companion!r} uses no adapter; nothing to roll back")
            older = [v["version"] for v in listing["versions"] if int(v["version"][1:]) < int(now[1:])]
            version = older[-1] if older else None
        here.request("PUT", f"/api/v1/companions/{args.companion}/adapter", json={"version": version})
        where = ("the server uses it from its next start" if here.in_process
                 else "the running server uses it now")
    print(f"{args.companion} speaks through {version or 'the base model'}; {where}")


def _print_adapters(companion_id: str, listing: dict) -> None:
    for v in listing["versions"]:
        m = v.get("metrics") or {}
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(v.get("created_at") or 0))
        held = f"held-out loss {m['eval_loss']:.3f}" if m.get("eval_loss") is not None else ""
        mark = "*" if v["version"] == listing["current"] else " "
        print(f"{mark} {v['version']:<6} {when}  {m.get('steps', '?')} steps  {held}")
    if not listing["versions"]:
        print(f"{companion_id} has no adapters yet (homefire finetune {companion_id})")
    if listing.get("problem"):
        print(f"(not in use: {listing['problem']})")


def add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--finetune-config", type=Path, help="fine-tuning YAML (default configs/finetune.yaml)")
    p.add_argument("--steps", type=int, help="stop after this many steps (max_steps)")
    p.add_argument("--epochs", type=float, help="passes over the data")
    p.add_argument("--rank", type=int, help="LoRA rank (1, 8, 16, 32, 64, 128, 256, 320, 512)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--max-seq-len", type=int, help="longest example in tokens")
    p.add_argument("--filter-boilerplate", action="store_true",
                   help='do not train on refusals and "As an AI" replies')
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other setting of the YAML")


def add_commands(sub, remote: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "finetune", parents=[remote], help="LoRA-tune a companion's voice on its history",
        description="Train a LoRA adapter on the companion's stored history (imported and live), "
        "loss on the companion's replies only, with a held-out share of whole conversations "
        "for evaluation and early stopping, then its voice report. Writes adapters/COMPANION/vN/ "
        "in the data directory and makes the companion speak through it if it is better "
        "(finetune.switch; at once, if the server runs). Settings: configs/finetune.yaml; flags "
        "override it. The training is a job (POST /api/v1/companions/ID/finetunes): of the server "
        "running on the data directory, where it waits its turn, shares the GPU as "
        "finetune.gpu_sharing says, and Ctrl-C offers to cancel it; else of this command's own "
        "Homefire, where it has the machine to itself and Ctrl-C interrupts it (--resume continues). "
        "The voice report that follows gives the perplexity of the real held-out replies under the "
        "base model and the adapter (lower: the real replies are likelier), and whether a reader "
        "could tell the adapter's replies from the real ones: a classifier's accuracy, 0.50 a coin "
        "and 1.00 always right, said in words (\"a reader tells them apart 7 times in 10\"). "
        "When the voice is not there yet: import more history, train longer (--epochs, --steps), "
        "or tune a bigger base model.")
    p.add_argument("companion", help="companion id")
    p.add_argument("--dry-run", action="store_true",
                   help="build the dataset only: print its size and one example with trained tokens marked")
    add_training_flags(p)
    p.add_argument("--resume", metavar="VERSION", type=version_arg,
                   help="continue an interrupted run from its checkpoint")
    p.add_argument("--user", default=LOCAL, help="act for this member, without a server (default: local): "
                   "their companion, on their history, as their own job would (a shared companion is "
                   "an admin's to tune; everyone who talks to it hears the adapter)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "eval", parents=[remote], help="measure how close an adapter's voice is to the original",
        description="On the held-out conversations: perplexity of the companion's real replies under "
        "the base model and the adapter, and style and similarity of replies both generate (drawn as the "
        "companion speaks: the card's sampling for the base, the version's fitted sampling for it); then how "
        "well a reader tells the real replies from each model's (0.50: a coin, could not tell; 1.00: "
        "always), beside real told from real, with the phrases the real replies use and how often each "
        "model does. Writes report.md, voice.png and eval.json into the adapter's folder. It is a job: "
        "of the server running on the data directory (its finetune.samples replies each), else of this "
        "command's own Homefire.")
    p.add_argument("companion", help="companion id")
    p.add_argument("--adapter", metavar="VERSION", type=version_arg,
                   help="adapter version (default: the one in use)")
    p.add_argument("--samples", type=int, help="replies to generate with each model (default: the "
                   "settings' finetune.samples, 24; without a server only)")
    p.add_argument("--max-new-tokens", type=int, help="longest generated reply (default: the settings' "
                   "finetune.sample_tokens, 64; without a server only)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--user", default=LOCAL, help="act for this member, without a server (default: local): "
                   "their held-out conversations")
    p.set_defaults(func=cmd_eval)

    adapter = sub.add_parser("adapter", help="list, use and roll back a companion's adapters",
                             description="Adapters are versioned; the companion speaks through one "
                             "at a time. Through the running server if there is one (it loads the "
                             "version at once), else for the next start.")
    asub = adapter.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = asub.add_parser("list", parents=[remote], help="versions, newest last; * marks the one in use")
    p.add_argument("companion", help="companion id")
    p = asub.add_parser("use", parents=[remote], help="speak through this version (or 'base')")
    p.add_argument("companion", help="companion id")
    p.add_argument("version", type=lambda v: None if v == "base" else version_arg(v), help="e.g. v2, or base")
    p = asub.add_parser("rollback", parents=[remote], help="go back to the version before the one in use")
    p.add_argument("companion", help="companion id")
    for action_parser in asub.choices.values():
        action_parser.set_defaults(func=cmd_adapter)
