"""The `homefire` command: serve, chat, and manage companions.

Run `homefire --help`, or `homefire COMMAND --help` for one command.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from finetune.config import FinetuneError
from memory.cards import parse_card
from memory.companions import CompanionError, CompanionStore, load_dir
from memory.db import Database
from memory.imports import FORMATS, ImportFailed
from serve.client import Client, ServerError, running_url, server_file
from serve.config import ConfigError, check_exposure, default_data_dir, load_settings


class UsageError(RuntimeError):
    """A mistake on the command line; printed without a traceback."""


def _data_dir(args: argparse.Namespace) -> Path:
    return (args.data_dir or default_data_dir()).expanduser().resolve()


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from serve.app import create_app

    settings = load_settings(args.config)
    settings.host = args.host or settings.host
    settings.port = settings.port if args.port is None else args.port
    check_exposure(settings)
    load_dir(settings.companions_dir)  # fail here, with the file named, not mid-start-up
    data_dir = _data_dir(args)
    lock = _lock(data_dir)  # noqa: F841 (held until the process exits)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:
        sock = socket.create_server((settings.host, settings.port), family=family)
    except OSError as err:
        raise UsageError(f"cannot listen on {settings.host}:{settings.port}: {err.strerror}") from err
    port = sock.getsockname()[1]
    host = f"[{settings.host}]" if family == socket.AF_INET6 else settings.host
    url = f"http://{host}:{port}"
    server_file(data_dir).write_text(json.dumps({"url": url, "pid": os.getpid()}))
    logging.getLogger("homefire").info("listening on %s (data in %s)", url, data_dir)
    app = create_app(settings, data_dir)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5, access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        server_file(data_dir).unlink(missing_ok=True)


def _lock(data_dir: Path):
    """The data directory's one-writer lock (an open file; released when it closes)."""
    (data_dir / "run").mkdir(parents=True, exist_ok=True)
    lock = (data_dir / "run" / "serve.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"another `homefire serve` already uses {data_dir} "
                         f"(at {running_url(data_dir) or 'an unknown address'}); stop it first, "
                         "or pass another --data-dir") from None
    return lock


def _client(args: argparse.Namespace) -> Client:
    url = args.url or running_url(_data_dir(args))
    if url is None:
        raise UsageError(f"no Homefire server is running for {_data_dir(args)}; start one with "
                         "`homefire serve`, or pass --url")
    return Client(url)


def cmd_chat(args: argparse.Namespace) -> None:
    client = _client(args)
    companion = args.companion or "ember"
    if args.conversation:
        data = client.request("GET", f"/api/v1/conversations/{args.conversation}")
        conversation_id = data["conversation"]["id"]
        for m in data["messages"][-6:]:
            print(f"{'you' if m['role'] == 'user' else companion}> {m['content']}")
    else:
        data = client.request("POST", "/api/v1/conversations", json={"companion": companion})
        conversation_id = data["conversation"]["id"]
        for m in data["messages"]:
            print(f"{companion}> {m['content']}")
    interactive = sys.stdin.isatty()
    print(f"(conversation {conversation_id}; Ctrl-D to leave)", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            print(file=sys.stderr)
            return
        if not line.strip():
            continue
        print(f"{companion}> ", end="", flush=True)
        for name, data in client.stream_events(
            f"/api/v1/conversations/{conversation_id}/messages", {"content": line, "stream": True}
        ):
            if name == "delta":
                print(data["content"], end="", flush=True)
            elif name == "error":
                raise ServerError(data["error"]["message"])
        print()


def _local_store(args: argparse.Namespace) -> CompanionStore:
    settings = load_settings(args.config)
    store = CompanionStore(Database(_data_dir(args) / "homefire.db"))
    store.sync_dir(settings.companions_dir)
    return store


def cmd_companion_list(args: argparse.Namespace) -> None:
    url = args.url or running_url(_data_dir(args))
    rows = Client(url).request("GET", "/api/v1/companions") if url else [
        c.model_dump() for c in _local_store(args).list()]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    for c in rows:
        print(f"{c['id']:<20} {c['name']:<20} {c['personality'][:40]}")


def cmd_companion_show(args: argparse.Namespace) -> None:
    url = args.url or running_url(_data_dir(args))
    if url:
        data = Client(url).request("GET", f"/api/v1/companions/{args.id}")
    else:
        store = _local_store(args)
        companion = store.get(args.id)
        if companion is None:
            raise UsageError(f"no companion named {args.id!r}; known companions: {', '.join(store.ids())}")
        data = companion.model_dump()
    print(json.dumps(data, ensure_ascii=False, indent=2))


def cmd_companion_import(args: argparse.Namespace) -> None:
    path: Path = args.file
    try:
        content = path.read_bytes()
    except OSError as err:
        raise UsageError(f"{path}: {err.strerror}") from err
    url = args.url or running_url(_data_dir(args))
    if url:
        params = {"filename": path.name, "replace": str(args.replace).lower()}
        data = Client(url).request("POST", "/api/v1/companions/import", content=content, params=params)
    else:
        companion = parse_card(content, str(path))
        store = _local_store(args)
        origin = store.origin(companion.id)
        if origin and not args.replace:
            raise UsageError(f"{path}: a companion with id {companion.id!r} exists; use --replace")
        if origin and origin[0] == "config":
            raise UsageError(f"{path}: {companion.id!r} is defined in {origin[1]}; edit that file")
        store.put(companion, "card", str(path))
        data = companion.model_dump()
    print(f"imported {data['name']!r} as {data['id']!r}")


def cmd_memory(args: argparse.Namespace) -> None:
    """Through the running server if there is one, else on the data directory under its lock."""
    url = args.url or running_url(_data_dir(args))
    action = args.action
    if url:
        client = Client(url)
        calls = {
            "list": lambda: client.request("GET", f"/api/v1/companions/{args.companion}/memories",
                                           params={"limit": args.limit, "offset": args.offset}),
            "search": lambda: client.request("GET", f"/api/v1/companions/{args.companion}/memories/search",
                                             params={"q": args.query, "k": args.k}),
            "add": lambda: client.request("POST", f"/api/v1/companions/{args.companion}/memories",
                                          json={"text": args.text, "pinned": args.pin}),
            "edit": lambda: client.request("PATCH", f"/api/v1/memories/{args.id}", json={"text": args.text}),
            "pin": lambda: client.request("PATCH", f"/api/v1/memories/{args.id}",
                                          json={"pinned": not args.unpin}),
            "delete": lambda: client.request("DELETE", f"/api/v1/memories/{args.id}"),
            "forget-conversation": lambda: client.request("DELETE", f"/api/v1/conversations/{args.id}"),
            "rebuild": lambda: client.request("POST", "/api/v1/memories/rebuild"),
        }
        result = calls[action]()
    else:
        result = _memory_locally(args)
    _print_memory_result(action, result, args)


def _memory_locally(args: argparse.Namespace) -> object:
    from memory.embedder import Embedder
    from memory.store import MemoryStore

    data_dir = _data_dir(args)
    lock = _lock(data_dir)
    try:
        settings = load_settings(args.config)
        db = Database(data_dir / "homefire.db")
        companions = CompanionStore(db)
        companions.sync_dir(settings.companions_dir)
        if getattr(args, "companion", None) and companions.get(args.companion) is None:
            raise UsageError(f"no companion named {args.companion!r}; known companions: "
                             f"{', '.join(companions.ids())}")
        store = MemoryStore(db, data_dir / "index", Embedder(settings.memory.embedder))
        action = args.action
        if action == "list":
            return [m.model_dump() for m in store.list(args.companion, args.limit, args.offset)]
        if action == "search":
            return [m.model_dump() for m in store.search(args.companion, args.query, args.k)]
        if action == "add":
            fact = store.add_fact(args.companion, args.text, args.pin)
            store.index_pending()
            return store.get(fact.id).model_dump()
        if action == "rebuild":
            return {"memories": store.rebuild()}
        if action == "forget-conversation":
            if not store.forget_conversation(args.id):
                raise UsageError(f"no conversation with id {args.id!r}")
            return None
        if store.get(args.id) is None:
            raise UsageError(f"no memory with id {args.id}")
        if action == "delete":
            store.delete(args.id)
            return None
        edited = store.edit(args.id, text=getattr(args, "text", None),
                            pinned=None if action == "edit" else not args.unpin)
        store.index_pending()
        return edited.model_dump()
    finally:
        lock.close()


def _print_memory_result(action: str, result: object, args: argparse.Namespace) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result, ensure_ascii=False, indent=2))
    elif action in ("list", "search"):
        for m in result:
            when = time.strftime("%Y-%m-%d", time.localtime(m["created_at"]))
            flag = "*" if m["pinned"] else " "
            score = f" {m['score']:.2f}" if "score" in m else ""
            print(f"{m['id']:>6}{flag} {when} {m['kind']:<8}{score} {m['text'].splitlines()[0][:90]}")
    elif action in ("delete", "forget-conversation"):
        print("deleted")
    elif action == "rebuild":
        print(f"rebuilt the index of {result['memories']} memories")
    else:
        print(f"memory {result['id']}: {result['text']}" + (" (pinned)" if result["pinned"] else ""))


def cmd_import(args: argparse.Namespace) -> None:
    """Preview locally; import through the running server, or under the data directory's lock."""
    from memory.imports import open_export

    if args.user != "local":
        raise UsageError(f"unknown user {args.user!r}; this server has one user, 'local'")
    path = str(args.path)
    if args.dry_run:
        from memory.importer import preview

        with open_export(path, args.format) as export, _bar(f"reading {args.path.name}", export.size,
                                                            "B") as bar:
            def each(conv) -> None:
                bar(export.done)
                if args.json:
                    print(json.dumps(conv.as_json(), ensure_ascii=False))

            result = preview(export, each)
        if not args.json:
            _print_import(result.as_dict(), dry_run=True)
        return
    url = args.url or running_url(_data_dir(args))
    result = _import_remote(Client(url), args) if url else _import_locally(args)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        _print_import(result, dry_run=False)


def _import_remote(client: Client, args: argparse.Namespace) -> dict:
    path: Path = args.path
    try:
        size = path.stat().st_size
        file = path.open("rb")
    except OSError as err:
        raise UsageError(f"{path}: {err.strerror}") from err
    params = {"filename": path.name, **({"format": args.format} if args.format else {})}
    bars = {}
    with file, _bar(f"uploading {path.name}", size, "B") as upload:
        def chunks():
            while data := file.read(1 << 20):
                yield data
                upload(file.tell())

        try:
            for name, data in client.stream_events(
                    f"/api/v1/companions/{args.companion}/imports", None, params=params, content=chunks(),
                    headers={"Content-Length": str(size)}):
                if name == "progress":
                    stage = data["stage"]
                    if stage not in bars:
                        upload.close()
                        label = "reading export" if stage == "read" else "indexing memories"
                        bars[stage] = _bar(label, data["total"], "B" if stage == "read" else "memory")
                        bars[stage].__enter__()
                    bars[stage](data["done"], data["total"])
                elif name == "error":
                    raise ServerError(data["error"]["message"])
                elif name == "done":
                    return data["result"]
        finally:
            for bar in bars.values():
                bar.close()
    raise ServerError("the server ended the import stream without a result")


def _import_locally(args: argparse.Namespace) -> dict:
    from memory.embedder import Embedder
    from memory.importer import Importer, remove_leftovers
    from memory.imports import open_export
    from memory.store import MemoryStore

    data_dir = _data_dir(args)
    lock = _lock(data_dir)
    try:
        remove_leftovers(data_dir / "run")
        settings = load_settings(args.config)
        db = Database(data_dir / "homefire.db")
        companions = CompanionStore(db)
        companions.sync_dir(settings.companions_dir)
        companion = companions.get(args.companion)
        if companion is None:
            raise UsageError(f"no companion named {args.companion!r}; known companions: "
                             f"{', '.join(companions.ids())}")
        with open_export(str(args.path), args.format) as export, \
                _bar(f"importing {args.path.name}", export.size, "B") as bar:
            result = Importer(db, data_dir / "run").run(export, companion.id, companion.name,
                                                        lambda done, total: bar(done))
        store = MemoryStore(db, data_dir / "index", Embedder(settings.memory.embedder))
        pending = db.query("SELECT COUNT(*) FROM memories WHERE chunks = 0")[0][0]
        with _bar("indexing memories", pending, "memory") as bar:
            store.index_pending(lambda done, total: bar(done, total))
        return result.as_dict()
    finally:
        lock.close()


class _bar:
    """A tqdm progress bar on stderr, called with (done[, total]); silent when not a terminal."""

    def __init__(self, description: str, total: int, unit: str):
        from tqdm import tqdm

        self._tqdm = tqdm(desc=description, total=total, unit=unit, unit_scale=unit == "B",
                          disable=None, leave=False, file=sys.stderr)

    def __enter__(self) -> _bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self._tqdm.total = total
        self._tqdm.update(done - self._tqdm.n)

    def close(self) -> None:
        self._tqdm.close()


def _print_import(result: dict, dry_run: bool) -> None:
    def day(t: float | None) -> str:
        return time.strftime("%Y-%m-%d", time.localtime(t)) if t else "?"

    would = "would be imported" if dry_run else "imported"
    print(f"format: {', '.join(result['formats'])}")
    print(f"conversations {would}: {result['conversations_added']}"
          + (f" new, {result['conversations_extended']} continued" if not dry_run else "")
          + (f" ({result['conversations_unchanged']} already imported)" if result["conversations_unchanged"]
             else "")
          + (f"; {result['conversations_empty']} empty, skipped" if result["conversations_empty"] else ""))
    print(f"messages {would}: {result['messages_added']}"
          + (f"; memories: {result['memories_added']}" if not dry_run else ""))
    if result["first_at"]:
        print(f"dates: {day(result['first_at'])} to {day(result['last_at'])}")
    if dropped := [f"{n} {why}" for why, n in result["dropped"].items() if n]:
        print("left out: " + ", ".join(dropped))
    if result["attachments"]:
        print(f"attachments (images, files) without text, not imported: {result['attachments']}")
    for persona in result["suggested_persona"]:
        print(f"suggested persona (your custom instructions):\n  {persona}")
    for profile in result["user_profile"]:
        print(f"what you told it about yourself:\n  {profile}")
    if dry_run:
        print("(dry run: nothing was imported)")


def _base_model(args: argparse.Namespace) -> tuple[str, str]:
    """(local path, id) of the base model the server runs, converting the embedded one if needed."""
    from serve.default_model import MODEL_NAME, ensure_default_model

    settings = load_settings(args.config)
    if settings.engine.url:
        raise UsageError("engine.url points at an external vLLM: fine-tuning needs the base model's "
                         "weights on this machine (set engine.model to a local directory)")
    if settings.engine.model:
        if not Path(settings.engine.model).is_dir():
            raise UsageError(f"engine.model {settings.engine.model!r} is not a local directory; "
                             "fine-tuning needs the weights on disk")
        return settings.engine.model, settings.engine.model
    return str(ensure_default_model(_data_dir(args) / "models")), MODEL_NAME


def _companion(args: argparse.Namespace, url: str | None):
    from memory.companions import Companion

    if url:
        return Companion.model_validate(Client(url).request("GET", f"/api/v1/companions/{args.companion}"))
    store = _local_store(args)
    companion = store.get(args.companion)
    if companion is None:
        raise UsageError(f"no companion named {args.companion!r}; known companions: {', '.join(store.ids())}")
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


def cmd_finetune(args: argparse.Namespace) -> None:
    from finetune.dataset import show
    from finetune.lora import dataset_for, finetune, tokenizer_for

    config = _finetune_config(args)
    data_dir = _data_dir(args)
    url = args.url or running_url(data_dir)
    companion = _companion(args, url)
    model_path, model_id = _base_model(args)
    db = Database(data_dir / "homefire.db")
    if args.dry_run:
        tokenizer = tokenizer_for(model_path)
        data = dataset_for(db, companion, tokenizer, config)
        summary = data.summary()
        for part in ("train", "eval"):
            s = summary[part]
            print(f"{part}: {s['examples']} examples, {s['tokens']} tokens, {s['trained_tokens']} trained "
                  f"({summary['conversations'][part]} conversations)")
        if summary["skipped"]:
            print("skipped: " + ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()))
        print("\nan example (« » marks the tokens that are trained):\n")
        print(show(tokenizer, data.train[0]))
        return
    from tqdm import tqdm

    bar = tqdm(desc=f"training {companion.id}", unit="step", file=sys.stderr, disable=None)

    def report(point: dict) -> None:
        bar.total = point["total_steps"]
        note = {"loss": f"{point['loss']:.3f}", "tok/s": f"{point['tokens_per_s']:.0f}"}
        if "eval_loss" in point:
            note["eval"] = f"{point['eval_loss']:.3f}"
        bar.set_postfix(note, refresh=False)
        bar.update(1)

    try:
        out = finetune(data_dir, db, companion, model_path, model_id, config, args.resume, report)
    finally:
        bar.close()
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    print(f"adapter {out.name} for {companion.id}: {metrics['steps']} steps, loss {metrics['first_loss']:.3f}"
          f" -> {metrics['train_loss']:.3f}" + (f", held-out loss {metrics['eval_loss']:.3f}"
                                                 if metrics["eval_loss"] is not None else "")
          + f", {metrics['tokens_per_s']:.0f} tokens/s; in {out}")
    _switch_adapter(args, companion.id, out.name, url)


def _switch_adapter(args: argparse.Namespace, companion_id: str, version: str | None,
                    url: str | None) -> None:
    from finetune import adapters

    if url:
        Client(url).request("PUT", f"/api/v1/companions/{companion_id}/adapter", json={"version": version})
        where = "the running server uses it now"
    else:
        if version is not None:
            model_path, _ = _base_model(args)
            adapters.verify(adapters.adapters_dir(_data_dir(args), companion_id) / version,
                            adapters.model_sha256(Path(model_path)))
        adapters.set_current(_data_dir(args), companion_id, version)
        where = "the server uses it from its next start"
    print(f"{companion_id} speaks through {version or 'the base model'}; {where}")


def cmd_eval(args: argparse.Namespace) -> None:
    from finetune import adapters
    from finetune.evaluate import voice_match

    data_dir = _data_dir(args)
    companion = _companion(args, args.url or running_url(data_dir))
    version = args.adapter or adapters.current(data_dir, companion.id) or (
        adapters.versions(data_dir, companion.id) or [None])[-1]
    if version is None:
        raise UsageError(f"companion {companion.id!r} has no adapters yet; run `homefire finetune` first")
    model_path, _ = _base_model(args)
    result = voice_match(data_dir, Database(data_dir / "homefire.db"), companion, model_path, version,
                         samples=args.samples, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    p, sim = result["perplexity"], result["similarity_to_real"]
    print(f"{companion.id} {version} on {result['held_out_tokens']} held-out reply tokens:")
    print(f"  perplexity   base {p['base']:.2f}   tuned {p['tuned']:.2f}")
    print(f"  similarity   base {sim['base']:.3f}   tuned {sim['tuned']:.3f}  (to the real replies)")
    print(f"report: {adapters.adapters_dir(data_dir, companion.id) / version / 'report.md'}")


def cmd_adapter(args: argparse.Namespace) -> None:
    from finetune import adapters

    data_dir = _data_dir(args)
    url = args.url or running_url(data_dir)
    _companion(args, url)
    if args.action == "list":
        current = adapters.current(data_dir, args.companion)
        if url:
            current = Client(url).request("GET", f"/api/v1/companions/{args.companion}/adapters")["current"]
        for version in adapters.versions(data_dir, args.companion):
            info = adapters.manifest(data_dir, args.companion, version)
            m = info.get("metrics", {})
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.get("created_at", 0)))
            held = f"held-out loss {m['eval_loss']:.3f}" if m.get("eval_loss") is not None else ""
            mark = "*" if version == current else " "
            print(f"{mark} {version:<6} {when}  {m.get('steps', '?')} steps  {held}")
        if not adapters.versions(data_dir, args.companion):
            print(f"{args.companion} has no adapters yet (homefire finetune {args.companion})")
        return
    version = args.version if args.action == "use" else adapters.previous(data_dir, args.companion)
    _switch_adapter(args, args.companion, version, url)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="homefire", description="A self-hosted AI companion server: your model, your history.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, help="data directory (default: $HOMEFIRE_DATA_DIR "
                        "or ~/.local/share/homefire)")
    common.add_argument("--config", type=Path, help="settings YAML (see configs/homefire.yaml)")
    remote = argparse.ArgumentParser(add_help=False, parents=[common])
    remote.add_argument("--url", help="server URL (default: the server running on --data-dir)")

    p = sub.add_parser("serve", parents=[common], help="run the companion server",
                       description="Run the server: it prepares the model, starts vLLM as a private "
                       "child process and serves the OpenAI-compatible and native APIs.")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; others need HOMEFIRE_API_KEY)")
    p.add_argument("--port", type=int, help="port to listen on (default 8000; 0 picks a free one)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", parents=[remote], help="chat with a companion in the terminal",
                       description="Chat in the terminal with a companion of a running server; "
                       "replies stream as they are written and the server keeps the history.")
    p.add_argument("companion", nargs="?", help="companion id (default: ember)")
    p.add_argument("--conversation", help="continue this conversation id instead of starting one")
    p.set_defaults(func=cmd_chat)

    companion = sub.add_parser("companion", help="list, show and import companions",
                               description="Manage companions, through the running server if there "
                               "is one, else directly in the data directory.")
    csub = companion.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = csub.add_parser("list", parents=[remote], help="list companions")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_companion_list)
    p = csub.add_parser("show", parents=[remote], help="show one companion's card as JSON")
    p.add_argument("id", help="companion id")
    p.set_defaults(func=cmd_companion_show)
    p = csub.add_parser("import-card", parents=[remote], help="import a Character Card (.json or .png)",
                        description="Import a Character Card V1/V2/V3 from a .json file or a .png "
                        "with the card in its 'chara' or 'ccv3' text chunk.")
    p.add_argument("file", type=Path, help="the card file")
    p.add_argument("--replace", action="store_true", help="replace a companion with the same id")
    p.set_defaults(func=cmd_companion_import)

    memory = sub.add_parser("memory", help="see and control what companions remember",
                            description="List, search, add, correct, pin and delete long-term memories, "
                            "through the running server if there is one, else directly in the data "
                            "directory (under the same lock the server takes).")
    msub = memory.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = msub.add_parser("list", parents=[remote], help="list memories, pinned first, newest first")
    p.add_argument("companion", help="companion id")
    p.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    p.add_argument("--offset", type=int, default=0, help="skip this many")
    p = msub.add_parser("search", parents=[remote], help="find memories by meaning")
    p.add_argument("companion", help="companion id")
    p.add_argument("query", help="what to look for")
    p.add_argument("-k", type=int, default=10, help="how many results (default 10)")
    p = msub.add_parser("add", parents=[remote], help="add a fact the companion should know")
    p.add_argument("companion", help="companion id")
    p.add_argument("text", help='the fact, e.g. "I am allergic to walnuts"')
    p.add_argument("--pin", action="store_true", help="pin it")
    p = msub.add_parser("edit", parents=[remote], help="correct a memory's text")
    p.add_argument("id", type=int, help="memory id")
    p.add_argument("text", help="the corrected text")
    p = msub.add_parser("pin", parents=[remote], help="pin a memory (or --unpin it)")
    p.add_argument("id", type=int, help="memory id")
    p.add_argument("--unpin", action="store_true", help="unpin instead")
    p = msub.add_parser("delete", parents=[remote], help="delete a memory for good")
    p.add_argument("id", type=int, help="memory id")
    p = msub.add_parser("forget-conversation", parents=[remote],
                        help="delete a conversation with all its messages and memories")
    p.add_argument("id", help="conversation id")
    msub.add_parser("rebuild", parents=[remote], help="recreate the vector index from SQLite")
    for action_parser in msub.choices.values():
        action_parser.add_argument("--json", action="store_true", help="print JSON")
        action_parser.set_defaults(func=cmd_memory)

    p = sub.add_parser(
        "import", parents=[remote], help="import chat history exported from another service",
        description="Import an export from ChatGPT (the .zip or conversations.json), Claude.ai, "
        "Character.AI (CAI Tools .json), SillyTavern (.jsonl chat) or plain JSONL ({\"messages\": "
        "[...]} a line) into a companion's history and memory. The format is detected. All or "
        "nothing; importing the same or a newer export again adds only what is new. Goes through "
        "the running server if there is one, else works on the data directory under its lock.")
    p.add_argument("path", type=Path, help="the export file")
    p.add_argument("--companion", required=True, help="the companion that receives the history")
    p.add_argument("--user", default="local", help="whose history it is (default: local)")
    p.add_argument("--format", choices=FORMATS, help="skip detection and read the file as this format")
    p.add_argument("--dry-run", action="store_true", help="import nothing; show what would be imported")
    p.add_argument("--json", action="store_true", help="with --dry-run: one JSON object per "
                   "conversation; otherwise the result as JSON")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "finetune", parents=[remote], help="LoRA-tune a companion's voice on its history",
        description="Train a LoRA adapter on the companion's stored history (imported and live), "
        "loss on the companion's replies only, with a held-out share of whole conversations "
        "for evaluation and early stopping. Writes adapters/COMPANION/vN/ in the data directory "
        "and makes the companion speak through it (at once, if the server runs). Settings: "
        "configs/finetune.yaml; flags override it.")
    p.add_argument("companion", help="companion id")
    p.add_argument("--dry-run", action="store_true",
                   help="build the dataset only: print its size and one example with trained tokens marked")
    p.add_argument("--finetune-config", type=Path, help="fine-tuning YAML (default configs/finetune.yaml)")
    p.add_argument("--steps", type=int, help="stop after this many steps (max_steps)")
    p.add_argument("--epochs", type=float, help="passes over the data")
    p.add_argument("--rank", type=int, help="LoRA rank (1, 8, 16, 32, 64, 128, 256, 320, 512)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--max-seq-len", type=int, help="longest example in tokens")
    p.add_argument("--filter-boilerplate", action="store_true",
                   help='do not train on refusals and "As an AI" replies')
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other setting of the YAML")
    p.add_argument("--resume", metavar="VERSION", help="continue an interrupted run from its checkpoint")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "eval", parents=[remote], help="measure how close an adapter's voice is to the original",
        description="On the held-out conversations: perplexity of the companion's real replies under "
        "the base model and the adapter, and style and similarity of replies both generate. Writes "
        "report.md, voice.png and eval.json into the adapter's folder.")
    p.add_argument("companion", help="companion id")
    p.add_argument("--adapter", metavar="VERSION", help="adapter version (default: the one in use)")
    p.add_argument("--samples", type=int, default=8, help="replies to generate with each model (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest generated reply (default 64)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
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
    p.add_argument("version", type=lambda v: None if v == "base" else v, help="e.g. v2, or base")
    p = asub.add_parser("rollback", parents=[remote], help="go back to the version before the one in use")
    p.add_argument("companion", help="companion id")
    for action_parser in asub.choices.values():
        action_parser.set_defaults(func=cmd_adapter)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UsageError, ConfigError, CompanionError, ServerError, ImportFailed, FinetuneError) as err:
        print(f"homefire: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # `homefire ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
