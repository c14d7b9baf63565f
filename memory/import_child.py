"""The reading half of a server's import, in a child process at the lowest CPU priority.

Parsing and hashing a large export is minutes of pure Python. In the server's own process it
would hold the interpreter lock that every stream's tokens pass through (bench/import_commit.py
measured gaps between tokens of other users' replies). Here it runs in a process of its own:
it opens the export, checks it against the stored history (reads only) and fills the staging
file; the server commits that file in short batches (memory/importer.py).

The child speaks as every child does (store/child.py): {"progress": [done, total]}, then
{"result": {...}} or {"failed": [where, why]}. Run as `python -m memory.import_child JOB`.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from memory.importer import Importer, ImportResult
from memory.imports import ImportFailed, open_export
from store.child import apart, run_child, say
from store.db import Database, Progress


def run_apart(importer: Importer, source: Path, fmt: str | None, label: str, companion_key: str,
              companion_name: str, progress: Progress | None = None, dry_run: bool = False) -> ImportResult:
    """Importer.run, with the export at `source` opened and staged by a child process."""
    return importer.run_with(lambda path: _stage_apart(importer, source, fmt, label, companion_key,
                                                       companion_name, path, progress),
                             companion_key, label, dry_run)


def _stage_apart(importer: Importer, source: Path, fmt: str | None, label: str, companion_key: str,
                 companion_name: str, staging: Path, progress: Progress | None) -> ImportResult:
    job = {"db": str(importer.db.path.resolve()), "user": importer.user, "source": str(source.resolve()),
           "format": fmt, "label": label, "companion": companion_key, "name": companion_name,
           "staging": str(staging.resolve())}
    answer = run_child("memory.import_child", job, label, progress)
    if "failed" in answer:
        raise ImportFailed(*answer["failed"])
    return ImportResult(**answer["result"])


def main(job: dict) -> None:
    apart()
    db = Database(Path(job["db"]))
    try:
        with open_export(job["source"], job["format"], job["label"]) as export:
            result = Importer(db, Path(job["staging"]).parent, job["user"]).stage(
                export, job["companion"], job["name"], Path(job["staging"]),
                lambda done, total: say({"progress": [done, total]}))
        say({"result": result.as_dict()})
    except ImportFailed as err:
        say({"failed": [err.where, err.why]})
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    finally:
        db.close()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
