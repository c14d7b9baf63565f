"""`homefire import`: chat exports into a companion, through the server or the same application here."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from memory.imports import FORMATS
from serve.cli_base import Bar, UsageError, client
from serve.client import Client, ServerError
from serve.sse import DONE, PROGRESS


def cmd_import(args: argparse.Namespace) -> None:
    """Preview here; import through the running server, or the same application here."""
    from memory.imports import open_export

    path = str(args.path)
    if args.dry_run:
        from memory.importer import preview

        with open_export(path, args.format) as export, Bar(f"reading {args.path.name}", export.size,
                                                            "B") as bar:
            def each(conv) -> None:
                bar(export.done)
                if args.json:
                    print(json.dumps(conv.as_json(), ensure_ascii=False))

            result = preview(export, each)
        if not args.json:
            _print_import(result.as_dict(), dry_run=True)
        return
    with client(args, "memory") as here:
        result = _upload(here, args)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        _print_import(result, dry_run=False)


def _upload(client: Client, args: argparse.Namespace) -> dict:
    path: Path = args.path
    try:
        size = path.stat().st_size
        file = path.open("rb")
    except OSError as err:
        raise UsageError(f"{path}: {err.strerror}") from err
    params = {"filename": path.name, **({"format": args.format} if args.format else {})}
    bars = {}
    with file, Bar(f"uploading {path.name}", size, "B") as upload:
        def chunks():
            while data := file.read(1 << 20):
                yield data
                upload(file.tell())

        try:
            for name, data in client.stream_events(
                    f"/api/v1/companions/{args.companion}/imports", None, params=params, content=chunks(),
                    headers={"Content-Length": str(size)}):
                if name == PROGRESS:
                    stage = data["stage"]
                    if stage not in bars:
                        upload.close()
                        label = "reading export" if stage == "read" else "indexing memories"
                        bars[stage] = Bar(label, data["total"], "B" if stage == "read" else "memory")
                        bars[stage].__enter__()
                    bars[stage](data["done"], data["total"])
                elif name == DONE:
                    return data["result"]
        finally:
            for bar in bars.values():
                bar.close()
    raise ServerError("the server ended the import stream without a result")


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


def add_commands(sub, remote: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "import", parents=[remote], help="import chat history exported from another service",
        description="Import an export from ChatGPT (the .zip or conversations.json), Claude.ai, "
        "Character.AI (CAI Tools .json), SillyTavern (.jsonl chat) or plain JSONL ({\"messages\": "
        "[...]} a line) into a companion's history and memory. The format is detected. All or "
        "nothing; importing the same or a newer export again adds only what is new. Goes through "
        "the running server if there is one, else through the same application run here on the data "
        "directory, under its lock.")
    p.add_argument("path", type=Path, help="the export file")
    p.add_argument("--companion", required=True, help="the companion that receives the history")
    p.add_argument("--user", default="local", help="whose history it is (default: local)")
    p.add_argument("--format", choices=FORMATS, help="skip detection and read the file as this format")
    p.add_argument("--dry-run", action="store_true", help="import nothing; show what would be imported")
    p.add_argument("--json", action="store_true", help="with --dry-run: one JSON object per "
                   "conversation; otherwise the result as JSON")
    p.set_defaults(func=cmd_import)
