"""What outlives a machine: `homefire bundle` and `companion export-card` (a companion in one
file), `homefire backup` and `restore` (a whole data directory)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from serve.cli_base import Bar, UsageError, client, hold_lock, resolve_data_dir
from serve.config import load_settings
from store.db import Database, integrity
from store.users import LOCAL


def cmd_bundle_export(args: argparse.Namespace) -> None:
    from serve import bundle

    out: Path = args.output or Path(f"{args.companion}{bundle.SUFFIX}")
    with client(args, "model") as here:   # the manifest names the base model its adapters fit
        here.download(f"/api/v1/companions/{args.companion}/bundle", out)
    with bundle.read_bundle(out) as read:
        manifest = read.manifest
    counts = manifest["counts"]
    print(f"{out}: {manifest['companion']['name']} with {counts['conversations']} conversations, "
          f"{counts['messages']} messages, {counts['memories']} memories, {counts['adapters']} adapter "
          f"versions" + (f" ({manifest['adapter_in_use']} in use)" if manifest["adapter_in_use"] else ""))


def cmd_bundle_import(args: argparse.Namespace) -> None:
    path: Path = args.file
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    params = {"filename": path.name} | ({"as_id": args.as_id} if args.as_id else {})
    with client(args, "memory", "model") as here, path.open("rb") as body:
        report = here.request("POST", "/api/v1/bundles", content=body, params=params)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print(report["message"])


def cmd_export_card(args: argparse.Namespace) -> None:
    out: Path = args.output
    if out.suffix.lower() not in (".png", ".json"):
        raise UsageError(f"-o {out}: a card is written as .png (with 'chara' and 'ccv3' chunks) or .json "
                         "(Character Card V3)")
    with client(args) as here:
        here.download(f"/api/v1/companions/{args.id}/card?format={out.suffix[1:].lower()}", out)
    print(f"wrote {out}")


def cmd_backup(args: argparse.Namespace) -> None:
    from serve import backup, bundle

    data_dir = resolve_data_dir(args)
    try:
        made = backup.backup(data_dir, args.dir.expanduser().resolve(), load_settings(args.config), args.keep,
                             bundle.homefire_version())
    except backup.BackupError as err:
        raise UsageError(str(err)) from err
    counts = json.loads((made / "manifest.json").read_text())["counts"]
    print(f"{made}: {counts['messages']} messages in {counts['conversations']} conversations, "
          f"{counts['memories']} memories, {counts['users']} users; integrity ok"
          + (f"; keeping the newest {args.keep}" if args.keep else ""))


def cmd_restore(args: argparse.Namespace) -> None:
    from memory.embedder import open_embedder
    from memory.store import MemoryStore
    from serve import backup
    from store.memory_index import IndexGenerations

    data_dir = resolve_data_dir(args)
    folder: Path = args.backup.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = hold_lock(data_dir)
    try:
        manifest = backup.restore(folder, data_dir)
        settings = load_settings(args.config)
        db = Database(data_dir / "homefire.db")   # a backup of an older Homefire is migrated here
        embedder = open_embedder(settings.memory.embedder)
        IndexGenerations(db).reset(embedder.identity, settings.memory.embedder)
        store = MemoryStore(db, data_dir / "index", embedder)
        with Bar("rebuilding the memory index", 0, "memory") as bar:
            store.rebuild(bar, everyone=True)
        if not store.index_is_consistent():
            raise UsageError(f"{data_dir}: the rebuilt memory index does not match SQLite; run "
                             "`homefire memory rebuild`")
        checked = integrity(data_dir / "homefire.db")
    except backup.BackupError as err:
        raise UsageError(str(err)) from err
    finally:
        lock.close()
    counts = manifest["counts"]
    print(f"restored {folder.name} into {data_dir}: {counts['messages']} messages, {counts['memories']} "
          f"memories (index rebuilt), {counts['users']} users; integrity {checked}")
    if (folder / "configs").is_dir():
        print(f"the settings and persona files that server ran with are in {folder / 'configs'}")


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of backups, 1 or more")
    return int(text)


def add_commands(sub, remote: argparse.ArgumentParser, companion_sub,
                 common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "backup", parents=[common], help="back the data directory up, even while the server runs",
        description="Write a backup folder into DIR: the database copied by SQLite's online backup API "
        "(consistent while the server writes) and checked with PRAGMA integrity_check, the adapters, "
        "pictures, the API key file, the model pin, and the settings and persona files; every file's "
        "SHA-256 in its manifest. For a daily one, set backup.dir in the settings.")
    p.add_argument("dir", type=Path, help="the folder that holds the backups")
    p.add_argument("--keep", type=_at_least_one, metavar="N", help="keep only the newest N backups in DIR")
    p.set_defaults(func=cmd_backup)
    p = sub.add_parser(
        "restore", parents=[common], help="restore a backup into an empty data directory",
        description="Check every file of the backup against its manifest, copy it into an empty data "
        "directory (--data-dir), check the database's integrity and rebuild the memory index.")
    p.add_argument("backup", type=Path, help="a backup folder (DIR/homefire-YYYYmmdd-HHMMSS)")
    p.set_defaults(func=cmd_restore)

    p = companion_sub.add_parser(
        "export-card", parents=[remote], help="write a companion's Character Card (.png or .json)",
        description="Write the companion's card for SillyTavern and other front ends: a PNG (its picture, "
        "or a plain one) carrying the card in a 'chara' chunk (V2) and a 'ccv3' chunk (V3), or a "
        "Character Card V3 JSON file. Homefire's id and sampling settings ride in extensions.homefire.")
    p.add_argument("id", help="companion id")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="the file to write: NAME.png or NAME.json")
    p.set_defaults(func=cmd_export_card)

    bundle = sub.add_parser(
        "bundle", help="carry a companion to another machine in one file",
        description="A bundle (.homefire, a zip file) holds a companion whole: its card and picture, your "
        "history and memories with it, every adapter version trained on your history with its voice "
        "report, which one is in use, and its sampling settings; every member has its SHA-256 in the "
        "manifest. Through the running server if there is one, else in the data directory.")
    bsub = bundle.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = bsub.add_parser("export", parents=[remote], help="write a companion's bundle",
                        description="Write COMPANION with your history, memories and adapters to one file.")
    p.add_argument("companion", help="companion id")
    p.add_argument("-o", "--output", type=Path, help="the bundle to write (default: COMPANION.homefire)")
    p.add_argument("--user", default=LOCAL, help="whose history (without a server; default: local)")
    p.set_defaults(func=cmd_bundle_export)
    p = bsub.add_parser(
        "import", parents=[remote], help="bring a companion's bundle in",
        description="Bring a bundle in, all or nothing: every checksum is verified before anything is "
        "written. Adapters made for another base model are left out with the reason (the history and "
        "memories still come in); importing the same bundle again adds nothing.")
    p.add_argument("file", type=Path, help="the .homefire file")
    p.add_argument("--as", dest="as_id", help="import under this companion id instead of the bundle's")
    p.add_argument("--user", default=LOCAL,
                   help="whose history it becomes (without a server; default: local)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_bundle_import)
