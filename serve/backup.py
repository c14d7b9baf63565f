"""Backups of a data directory, taken while the server runs, and their restore.

    homefire backup DIR [--keep N]        homefire restore DIR/homefire-YYYYmmdd-HHMMSS

A backup is a folder `homefire-YYYYmmdd-HHMMSS` in DIR, written as a hidden partial folder
and renamed once whole:

    homefire.db      a consistent copy made by SQLite's online backup API (a file copy of a
                     live WAL database can miss committed pages or catch a torn one), checked
                     with PRAGMA integrity_check before the backup counts
    adapters/        every finished adapter version and which one each companion uses
    pictures/        companions' pictures
    api_key          the local owner's key (mode 0600, as the folder)
    model.json       the model pin: the base model and vLLM version the data was made with
    configs/         the settings the server ran with and its persona files
    manifest.json    the SHA-256 of every file above, counts, the Homefire version

No vectors: restore rebuilds the memory index from SQLite, the truth it is an index of.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import yaml

from store import adapters
from store.db import copy_database, integrity
from store.files import sha256_file, written_whole

PREFIX = "homefire-"
STAMP = "%Y%m%d-%H%M%S"


class BackupError(RuntimeError):
    """A backup that cannot be made or restored; the message says what and where."""


def backup(data_dir: Path, root: Path, settings=None, keep: int | None = None,
           homefire_version: str = "") -> Path:
    """Back `data_dir` up into a new folder of `root`; with keep, only the newest `keep` backups
    stay. Safe while a server writes: nothing here takes the server's lock."""
    database = data_dir / "homefire.db"
    if not database.is_file():
        raise BackupError(f"{data_dir} holds no Homefire data (no homefire.db)")
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime(STAMP)
    while (root / f"{PREFIX}{stamp}").exists():   # two in one second: the next second's name
        time.sleep(0.2)
        stamp = time.strftime(STAMP)
    final = root / f"{PREFIX}{stamp}"
    with written_whole(final) as partial:
        partial.mkdir(mode=0o700)
        counts = _copy_database(database, partial / "homefire.db")
        for key_dir in sorted((data_dir / "adapters").glob("*")):
            key = key_dir.name
            for version in adapters.versions(data_dir, key):   # finished ones: a training's half is not
                shutil.copytree(key_dir / version, partial / "adapters" / key / version,
                                ignore=shutil.ignore_patterns("checkpoint", "*.partial"))
            if (key_dir / "CURRENT").is_file():
                (partial / "adapters" / key).mkdir(parents=True, exist_ok=True)
                shutil.copy2(key_dir / "CURRENT", partial / "adapters" / key / "CURRENT")
        if (data_dir / "pictures").is_dir():
            shutil.copytree(data_dir / "pictures", partial / "pictures",
                            ignore=shutil.ignore_patterns("*.partial"))
        for name in ("api_key", "model.json"):
            if (data_dir / name).is_file():
                shutil.copy2(data_dir / name, partial / name)
        if settings is not None:
            (partial / "configs").mkdir()
            (partial / "configs" / "homefire.yaml").write_text(
                yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
            if settings.companions_dir.is_dir():
                shutil.copytree(settings.companions_dir, partial / "configs" / "companions",
                                ignore=lambda _, names: [n for n in names
                                                         if not n.endswith((".yaml", ".yml"))])
        files = sorted(p for p in partial.rglob("*") if p.is_file())
        manifest = {"homefire": homefire_version, "created_at": time.time(), "data_dir": str(data_dir),
                    "counts": counts,
                    "files": {str(p.relative_to(partial)): sha256_file(p) for p in files}}
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if keep:
        for old in backups(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def backups(root: Path) -> list[Path]:
    """The finished backups in `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir() and (p / "manifest.json").is_file())


def last_backup_at(root: Path) -> float | None:
    found = backups(root)
    if not found:
        return None
    try:
        return json.loads((found[-1] / "manifest.json").read_text())["created_at"]
    except (OSError, ValueError, KeyError):
        return None


def _copy_database(source: Path, target: Path) -> dict:
    check, counts = copy_database(source, target)
    if check != "ok":
        raise BackupError(f"the copy of {source} fails PRAGMA integrity_check: {check}")
    return counts


# -- restore -----------------------------------------------------------------------------------

RESTORABLE = ("homefire.db", "adapters", "pictures", "api_key", "model.json")


def check(folder: Path) -> dict:
    """The backup's manifest, once every file it lists is there with its checksum."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise BackupError(f"{folder}: no manifest.json; not a Homefire backup (or an unfinished "
                          "one)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise BackupError(f"{folder}/manifest.json: not a backup manifest ({err})") from err
    for name, digest in files.items():
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise BackupError(f"{folder}/manifest.json: {name!r} points outside the backup")
        if not path.is_file():
            raise BackupError(f"{path}: missing from the backup")
        if sha256_file(path) != digest:
            raise BackupError(f"{path}: its SHA-256 differs from the manifest's; the backup is damaged")
    if "homefire.db" not in files:
        raise BackupError(f"{folder}: the backup holds no homefire.db")
    return manifest


def restore(folder: Path, data_dir: Path) -> dict:
    """Copy a checked backup into an empty data directory (models/ and run/ may be there); the
    caller rebuilds the memory index. Returns the manifest."""
    manifest = check(folder)
    present = [p.name for p in data_dir.iterdir()] if data_dir.is_dir() else []
    if held := [name for name in present if name not in ("models", "run")]:
        raise BackupError(f"{data_dir} is not empty ({', '.join(sorted(held)[:5])}); restore into an empty "
                          "data directory (pass another --data-dir), so nothing there is overwritten")
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    scratch = data_dir / ".restore.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        for name in RESTORABLE:
            source = folder / name
            if source.is_dir():
                shutil.copytree(source, scratch / name)
            elif source.is_file():
                shutil.copy2(source, scratch / name)
        result = integrity(scratch / "homefire.db")
        if result != "ok":
            raise BackupError(f"{folder}/homefire.db fails PRAGMA integrity_check: {result}")
        for name in RESTORABLE:   # the database last: a data directory with it is a whole one
            if (scratch / name).exists() and name != "homefire.db":
                (scratch / name).rename(data_dir / name)
        (scratch / "homefire.db").rename(data_dir / "homefire.db")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest
