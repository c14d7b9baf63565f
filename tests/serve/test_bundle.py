"""Companion bundles on real SQLite, real zip files and real PEFT adapters: the round trip, a
second import that adds nothing, and every damaged or hostile bundle refused with nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import threading
import time
import zipfile
from contextlib import closing
from pathlib import Path

import pytest

from memory.store import MemoryStore
from serve import bundle
from serve.default_model import MODEL_NAME
from store import adapters
from store.companions import Companion, CompanionStore, Sampling
from store.db import Database
from store.history import History, ReplyMeta, chain_root, chains
from store.summaries import Summaries
from store.users import Users
from tests.support.adapters import make_adapter
from tests.support.cards import v3_card_with_decorators

# With a V3 lorebook (decorators, extensions): a bundle brings it home field for field.
KIT = Companion(id="kit", name="Kit", description="A fox who remembers.", first_mes="Hey you.",
                sampling=Sampling(temperature=0.3, max_tokens=64),
                character_book=v3_card_with_decorators()["data"]["character_book"])


def rows(db: Database, sql: str) -> list[tuple]:
    return [tuple(r) for r in db.query(sql)]


@pytest.fixture(scope="module")
def setup(model_dir) -> bundle.Setup:
    return bundle.Setup(MODEL_NAME, adapters.Base.of(model_dir), bundle.DEFAULT_EMBEDDER)


@pytest.fixture(scope="module")
def source(tmp_path_factory, model_dir, setup) -> tuple[Path, Path]:
    """A data directory where Kit has two conversations (one with a running summary, edited),
    memories of each kind (one deleted, one edited, one pinned) and two adapter versions, v2 in
    use; and Kit's bundle."""
    data = tmp_path_factory.mktemp("source")
    db = Database(data / "homefire.db")
    CompanionStore(db).put(KIT, "api")
    history, memory = History(db), MemoryStore(db, data / "index", embedder=None)
    first = history.create_conversation("kit", "Moving day").id
    history.append(first, "user", "I moved to Porto last week.")
    reply = history.append(first, "assistant", "Porto! Tell me about the river.",
                           ReplyMeta(tokens=7, model=MODEL_NAME, finish_reason="stop", sampling={"t": 0.3}))
    memory.add_exchange("kit", first, reply.id, "I moved to Porto last week.",
                        "User: I moved to Porto last week.\nKit: Porto! Tell me about the river.",
                        reply.created_at)
    summaries = Summaries(db)
    summary = summaries.add(first, "kit", [("user", "I moved to Porto last week."),
                                           ("assistant", "Porto! Tell me about the river.")], reply.id,
                            "They talked about the move to Porto.")
    summaries.edit(summary.id, "Sam moved to Porto, by the river.")   # in the user's words
    second = history.create_conversation("kit").id
    history.append(second, "user", "My cat Miso hates the rain.")
    gone = history.append(second, "assistant", "Poor Miso.", ReplyMeta(finish_reason="stop"))
    gone_memory = memory.add_exchange("kit", second, gone.id, "My cat Miso hates the rain.",
                                      "User: My cat Miso hates the rain.\nKit: Poor Miso.", gone.created_at)
    memory.delete(gone_memory)   # forgotten: it must not come back on the other side either
    memory.add_fact("kit", "I am allergic to walnuts", pinned=True)
    edited = memory.add_fact("kit", "My sister is called Ana")
    memory.edit(edited.id, text="My sister is called Ada")
    for version in ("v1", "v2"):
        make_adapter(data / "adapters" / "kit" / version, model_dir, "local")
    adapters.set_current(data, "kit", "v2")
    out = data / "kit.homefire"
    bundle.export_bundle(db, data, CompanionStore(db).get("kit"), "local", out, setup, "test")
    db.close()
    return data, out


def empty(tmp_path: Path) -> tuple[Path, Database]:
    data = tmp_path / "data"
    return data, Database(data / "homefire.db")


def nothing_written(data: Path, db: Database) -> None:
    assert rows(db, "SELECT COUNT(*) FROM companions") == [(0,)]
    assert rows(db, "SELECT COUNT(*) FROM conversations") == [(0,)]
    assert rows(db, "SELECT COUNT(*) FROM memories") == [(0,)]
    assert not (data / "adapters").exists() or not any((data / "adapters").rglob("*.safetensors"))
    assert not list((data / "run").glob("bundle-*"))


def test_the_manifest_names_every_member_with_its_checksum_and_the_setup(source, setup):
    _, out = source
    with zipfile.ZipFile(out) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        for name, digest in manifest["members"].items():
            assert hashlib.sha256(archive.read(name)).hexdigest() == digest
        assert set(manifest["members"]) | {"manifest.json"} == set(archive.namelist())
        card = json.loads(archive.read("card.json"))
    assert manifest["base_model"] == {"id": MODEL_NAME, "sha256": setup.model_sha256}
    assert manifest["embedder"] == bundle.DEFAULT_EMBEDDER and manifest["adapter_in_use"] == "v2"
    assert manifest["sampling"]["temperature"] == 0.3
    assert manifest["counts"] == {"conversations": 2, "messages": 4, "memories": 3, "adapters": 2}
    assert card["spec"] == "chara_card_v3" and card["data"]["name"] == "Kit"
    assert "adapters/v1/adapter_model.safetensors" in manifest["members"]
    assert not any("checkpoint" in name for name in manifest["members"])


def test_a_bundle_comes_home_whole_and_a_second_import_adds_nothing(source, setup, tmp_path):
    origin, out = source
    data, db = empty(tmp_path)
    report = bundle.import_bundle(db, data, bundle.read_bundle(out), "local", None, setup)
    assert report.created and report.conversations_added == 2 and report.messages_added == 4
    assert report.memories_added == 3 and report.adapters_added == ["v1", "v2"]
    assert report.adapter_in_use == "v2" and report.adapters_refused is None
    before = Database(origin / "homefire.db")
    assert CompanionStore(db).get("kit").model_dump() == KIT.model_dump()
    assert KIT.model_dump()["character_book"] == v3_card_with_decorators()["data"]["character_book"]
    same = ("SELECT c.id, c.title, c.created_at, m.role, m.content, m.created_at, m.tokens, m.model, "
            "m.sampling, m.finish_reason, m.forgotten, m.chain FROM messages m JOIN conversations c "
            "ON c.id = m.conversation_id ORDER BY m.id")
    assert rows(db, same) == rows(before, same)
    facts = "SELECT kind, text, source, pinned, created_at, updated_at, asked FROM memories ORDER BY id"
    assert rows(db, facts) == rows(before, facts)
    assert rows(db, "SELECT COUNT(*) FROM memories WHERE chunks = 0") == [(3,)], "vectors are rebuilt"
    for version in ("v1", "v2"):
        here = adapters.version_dir(data, "kit", version) / "adapter_model.safetensors"
        there = adapters.version_dir(origin, "kit", version) / "adapter_model.safetensors"
        assert here.read_bytes() == there.read_bytes()
        adapters.verify(here.parent, setup.base)
    # The chains are this data directory's: a client resending the conversation is matched.
    turns = [("user", "I moved to Porto last week."), ("assistant", "Porto! Tell me about the river.")]
    assert rows(db, "SELECT chain FROM messages ORDER BY id")[1] == (chains(chain_root("kit"), turns)[1],)
    conversation, added = History(db).record_resent("kit", turns)
    assert added == []
    assert conversation == rows(before, "SELECT id FROM conversations ORDER BY created_at")[0][0]
    # The running summary comes along, in the user's words, for the same messages.
    kept = "SELECT conversation_id, turns, chain, text, edited, created_at, updated_at FROM summaries"
    assert rows(db, kept) == rows(before, kept) and len(rows(db, kept)) == 1
    assert Summaries(db).covering("kit", turns).text == "Sam moved to Porto, by the river."

    again = bundle.import_bundle(db, data, bundle.read_bundle(out), "local", None, setup)
    assert not again.created and again.conversations_added == again.messages_added == 0
    assert again.memories_added == 0 and again.adapters_added == [] and again.adapters_known == ["v1", "v2"]
    assert rows(db, "SELECT COUNT(*) FROM messages") == [(4,)]
    assert rows(db, "SELECT COUNT(*) FROM summaries") == [(1,)]
    assert adapters.versions(data, "kit") == ["v1", "v2"]


def test_a_conversation_the_bundle_continues_is_extended(source, setup, tmp_path):
    origin, out = source
    data, db = empty(tmp_path)
    bundle.import_bundle(db, data, bundle.read_bundle(out), "local", None, setup)
    conversation = rows(db, "SELECT id FROM conversations ORDER BY created_at")[0][0]
    History(db).append(conversation, "user", "The river is called the Douro.")
    later = tmp_path / "later.homefire"
    bundle.export_bundle(db, data, CompanionStore(db).get("kit"), "local", later, setup, "test")
    data2, db2 = empty(tmp_path / "other")
    bundle.import_bundle(db2, data2, bundle.read_bundle(out), "local", None, setup)
    report = bundle.import_bundle(db2, data2, bundle.read_bundle(later), "local", None, setup)
    assert report.conversations_extended == 1 and report.messages_added == 1
    assert report.conversations_added == 0
    assert rows(db2, "SELECT content FROM messages ORDER BY id")[-1] == ("The river is called the Douro.",)


def test_adapters_for_another_base_model_are_left_out_with_the_reason(source, setup, tmp_path):
    _, out = source
    data, db = empty(tmp_path)
    other = bundle.Setup("other-model", adapters.Base("f" * 64, {}), bundle.DEFAULT_EMBEDDER)
    report = bundle.import_bundle(db, data, bundle.read_bundle(out), "local", None, other)
    assert report.adapters_added == [] and report.adapter_in_use is None
    assert f"trained on base model {MODEL_NAME!r}" in report.adapters_refused
    assert "other-model" in report.adapters_refused and "v1, v2" in report.adapters_refused
    assert "homefire finetune kit" in report.message and "came in" in report.message
    assert rows(db, "SELECT COUNT(*) FROM messages") == [(4,)]
    assert rows(db, "SELECT COUNT(*) FROM memories") == [(3,)]
    assert adapters.versions(data, "kit") == []


def test_another_companion_of_the_same_id_is_never_merged_into(source, setup, tmp_path):
    _, out = source
    data, db = empty(tmp_path)
    CompanionStore(db).put(Companion(id="kit", name="Another Kit"), "api")
    with pytest.raises(bundle.BundleConflict, match="a different companion already has the id 'kit'.*--as"):
        bundle.import_bundle(db, data, bundle.read_bundle(out), "local", None, setup)
    assert rows(db, "SELECT COUNT(*) FROM conversations") == [(0,)]
    report = bundle.import_bundle(db, data, bundle.read_bundle(out), "local", None, setup, as_id="kit2")
    assert report.companion == "kit2" and report.messages_added == 4
    assert CompanionStore(db).get("kit2").name == "Kit" and adapters.versions(data, "kit2") == ["v1", "v2"]
    turns = [("user", "I moved to Porto last week."), ("assistant", "Porto! Tell me about the river.")]
    assert History(db).record_resent("kit2", turns)[1] == [], "its chains were made for its new id"


def test_a_members_bundle_never_takes_a_shared_companions_id_nor_the_utility_models(source, setup, tmp_path):
    _, out = source
    data, db = empty(tmp_path)
    CompanionStore(db).put(Companion(id="kit", name="Shared Kit"), "api")   # shared: no owner
    Users(db).add("bob")
    with pytest.raises(bundle.BundleConflict, match="the id 'kit' is a shared companion's.*--as"):
        bundle.import_bundle(db, data, bundle.read_bundle(out), "bob", "bob", setup)
    with pytest.raises(bundle.BundleConflict, match="the id 'homefire-utility' is the utility model's"):
        bundle.import_bundle(db, data, bundle.read_bundle(out), "bob", "bob", setup, as_id="homefire-utility",
                             reserved=("homefire-utility",))
    assert rows(db, "SELECT COUNT(*) FROM conversations") == [(0,)]
    report = bundle.import_bundle(db, data, bundle.read_bundle(out), "bob", "bob", setup, as_id="kit2")
    assert report.companion == "kit2" and CompanionStore(db).get("kit2", "bob").name == "Kit"


def test_a_bundle_of_a_companion_this_server_defines_in_a_file_comes_into_it(source, setup, tmp_path):
    # `kit` is this server's own (configs/companions/kit.yaml, as every server has `ember`):
    # the bundle brings its history, memories and voices into it; the card stays the file's.
    _, out = source
    data, db = empty(tmp_path)
    companions = CompanionStore(db)
    here = KIT.model_copy(update={"description": "{{char}} as this server describes it."})
    companions.put(here, "config", "/etc/homefire/companions/kit.yaml")
    Users(db).add("bob")
    report = bundle.import_bundle(db, data, bundle.read_bundle(out), "local", None, setup)
    assert not report.created and report.messages_added == 4 and report.memories_added == 3
    assert report.adapters_added == ["v1", "v2"] and report.adapter_in_use == "v2"
    assert report.card_kept == ("the card stays the one in /etc/homefire/companions/kit.yaml; "
                                "the bundle's differs in description")
    assert report.card_kept in report.message
    assert companions.get("kit").description == here.description
    assert companions.origin("kit")[0] == "config"
    turns = [("user", "I moved to Porto last week."), ("assistant", "Porto! Tell me about the river.")]
    assert History(db).record_resent("kit", turns)[1] == [], "the history is kit's, as resent by a client"
    # A member's bundle of it brings their history and memories; a shared voice is an admin's.
    report = bundle.import_bundle(db, data, bundle.read_bundle(out), "bob", "bob", setup)
    assert report.messages_added == 4 and report.memories_added == 3 and report.adapters_added == []
    assert "only an admin may bring voices" in report.adapters_refused
    whose = "SELECT user_id, COUNT(*) FROM conversations WHERE companion_id = 'kit' GROUP BY user_id"
    assert rows(db, whose) == [("bob", 2), ("local", 2)]
    assert rows(db, "SELECT COUNT(*) FROM companions") == [(1,)]


def repack(out: Path, to: Path, change) -> Path:
    """The bundle `out` written again as `to`, each member passed through change(info, data),
    which returns [(ZipInfo or name, data), ...] to write in its place."""
    with zipfile.ZipFile(out) as source, zipfile.ZipFile(to, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            for name, data in change(info, source.read(info)):
                target.writestr(name, data)
    return to


def listed(out: Path, extra: dict[str, bytes]):
    """A change that adds members and lists them in the manifest, so only their shape is wrong."""
    def change(info, data):
        if info.filename == "manifest.json":
            manifest = json.loads(data)
            manifest["members"] |= {n: hashlib.sha256(d).hexdigest() for n, d in extra.items()}
            return [("manifest.json", json.dumps(manifest)), *extra.items()]
        return [(info, data)]
    return change


def link(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


HOSTILE = {
    "zip-slip": (lambda out: listed(out, {"../../evil.txt": b"x"}), "points outside the archive"),
    "absolute": (lambda out: listed(out, {"/etc/cron.d/evil": b"x"}), "points outside the archive"),
    "pickle": (lambda out: listed(out, {"adapters/v1/adapter_model.bin": b"\x80\x04K\x01."}),
               "pickled weights are never loaded"),
    "unknown member": (lambda out: listed(out, {"run.sh": b"rm -rf ~"}), "a bundle holds no such member"),
    "bomb": (lambda out: listed(out, {"history.jsonl.bak": b"\0" * (64 << 20)}), "possible zip bomb"),
    "unlisted": (lambda out: lambda info, data: [(info, data), *([("picture.png", b"\x89PNG")]
                                                              if info.filename == "card.json" else [])],
                 "not listed: picture.png"),
    "oversized": (lambda out: lambda info, data: [(info, data + os.urandom(1 << 20).hex().encode())
                                                 if info.filename == "manifest.json" else (info, data)],
                  "more than such a member may hold"),
}


@pytest.mark.parametrize("shape", [*HOSTILE, "link", "duplicate", "not a zip", "no manifest"])
def test_a_hostile_bundle_is_refused_whole_with_nothing_written(source, setup, tmp_path, shape):
    _, out = source
    bad = tmp_path / f"{shape}.homefire"
    if shape in HOSTILE:
        make, said = HOSTILE[shape]
        repack(out, bad, make(out))
    elif shape == "link":
        repack(out, bad, lambda info, data: [
            (info, data), *([(link("picture.png"), b"/etc/passwd")] if info.filename == "card.json" else [])])
        said = "is a symbolic link"
    elif shape == "duplicate":
        with pytest.warns(UserWarning):   # zipfile itself warns of the duplicate name
            repack(out, bad, lambda info, data: [(info, data)] * (2 if info.filename == "card.json" else 1))
        said = "member 'card.json' appears twice"
    elif shape == "not a zip":
        bad.write_bytes(b"this is not a bundle\n" * 10)
        said = "not a Homefire bundle"
    else:
        repack(out, bad, lambda info, data: [] if info.filename == "manifest.json" else [(info, data)])
        said = "no manifest.json"
    data, db = empty(tmp_path)
    with pytest.raises(bundle.BundleError, match=said) as refused:
        bundle.import_bundle(db, data, bundle.read_bundle(bad, "bad.homefire"), "local", None, setup)
    assert str(refused.value).startswith("bad.homefire")
    nothing_written(data, db)


def test_one_changed_byte_in_any_member_is_found(source, setup, tmp_path):
    """Each member in turn with one byte flipped, its zip CRC made right again (as a careful forger
    or a bit flip before the zip was written would leave it): the checksum still catches it."""
    _, out = source
    with zipfile.ZipFile(out) as archive:
        names = [n for n in archive.namelist() if n != "manifest.json"]
    data, db = empty(tmp_path)
    for name in names:
        bad = tmp_path / "changed.homefire"

        def flip(info, payload, name=name):
            if info.filename != name:
                return [(info, payload)]
            middle = len(payload) // 2
            return [(info.filename, payload[:middle] + bytes([payload[middle] ^ 1]) + payload[middle + 1:])]

        repack(out, bad, flip)
        with pytest.raises(bundle.BundleError, match=f"{name}: its SHA-256 differs from the manifest's"):
            bundle.import_bundle(db, data, bundle.read_bundle(bad), "local", None, setup)
    nothing_written(data, db)
    # And a byte changed in the file as stored (CRC and all): the zip's own check refuses it.
    raw = bytearray(out.read_bytes())
    start = raw.find(b"I moved to Porto") if b"I moved to Porto" in raw else len(raw) // 3
    raw[start] ^= 0x20
    (tmp_path / "flipped.homefire").write_bytes(bytes(raw))
    with pytest.raises(bundle.BundleError):
        bundle.read_bundle(tmp_path / "flipped.homefire")


STOLEN = {"id": "y", "created_at": 1, "updated_at": 1,
          "messages": [{"id": 99, "role": "user", "content": "hi", "created_at": 1}],
          "summaries": [{"through": 1, "text": "another's", "created_at": 1, "updated_at": 1}]}


@pytest.mark.parametrize(("line", "said"), [
    ('{"id": "x", "messages": "no"}', r"history.jsonl line 3: created_at: Field required"),
    (json.dumps(STOLEN), r"history.jsonl line 3: summaries: message 1 is not one of this conversation's"),
])
def test_a_malformed_history_line_is_named(source, setup, tmp_path, line, said):
    _, out = source

    def break_history(info, payload):
        if info.filename == "history.jsonl":
            payload = payload + line.encode() + b"\n"
        return [(info, payload)]

    bad = repack(out, tmp_path / "bad.homefire", break_history)
    with zipfile.ZipFile(bad) as archive:   # listed with its new checksum: only its content is wrong
        manifest = json.loads(archive.read("manifest.json"))
        manifest["members"]["history.jsonl"] = hashlib.sha256(archive.read("history.jsonl")).hexdigest()
    fixed = repack(bad, tmp_path / "relisted.homefire", lambda info, payload: [
        (info, json.dumps(manifest).encode() if info.filename == "manifest.json" else payload)])
    with pytest.raises(bundle.BundleError, match=said):
        bundle.read_bundle(fixed)


def staged_change(read: bundle.Bundle, sql: str) -> None:
    """A change to what read_bundle checked, as a damaged disk or a bug would make it."""
    with closing(read.connect()) as conn:
        conn.execute(sql)


def test_a_history_that_fails_midway_leaves_nothing_behind(source, setup, tmp_path):
    """The history goes in a conversation per transaction here (batch=1), owned by nobody until it is
    handed over; the last message breaks a CHECK constraint: every row written before it, and the
    companion made for it, are gone again, and no adapter is moved into place."""
    _, out = source
    data, db = empty(tmp_path)
    read = bundle.read_bundle(out)
    staged_change(read, "UPDATE messages SET role = 'nonsense' WHERE n = (SELECT MAX(n) FROM messages)")
    written = []

    def count(*_) -> None:
        written.append(rows(db, "SELECT COUNT(*) FROM messages"))

    with pytest.raises(sqlite3.IntegrityError):
        bundle.import_bundle(db, data, read, "local", None, setup, batch=1, progress=count)
    assert written == [[(2,)]], "the first conversation was committed on its own"
    nothing_written(data, db)


def test_memories_that_fail_midway_come_in_when_the_same_bundle_is_imported_again(source, setup, tmp_path):
    _, out = source
    data, db = empty(tmp_path)
    read = bundle.read_bundle(out)
    staged_change(read, "UPDATE memories SET kind = 'nonsense' WHERE n = (SELECT MAX(n) FROM memories)")
    with pytest.raises(sqlite3.IntegrityError):
        bundle.import_bundle(db, data, read, "local", None, setup, batch=1)
    assert rows(db, "SELECT COUNT(*) FROM messages") == [(4,)]
    assert rows(db, "SELECT COUNT(*) FROM memories") == [(2,)]
    again = bundle.import_bundle(db, data, bundle.read_bundle(out), "local", None, setup)
    assert again.conversations_unchanged == 2 and again.messages_added == 0 and again.memories_added == 1
    assert rows(db, "SELECT COUNT(*) FROM memories") == [(3,)]


def test_another_members_writes_go_in_between_the_batches_of_an_import(source, setup, tmp_path):
    """Between any two batches of Ana's import, Bob's reply and memory edit commit at once (on
    code that wrote a bundle in one transaction, they waited for all of it)."""
    _, out = source
    data, db = empty(tmp_path)
    CompanionStore(db).put(KIT.model_copy(update={"id": "owl", "name": "Owl"}), "api")
    bobs = History(db, "bob")
    conversation = bobs.create_conversation("owl").id
    memory = MemoryStore(db, data / "index", embedder=None, user="bob")
    fact = memory.add_fact("owl", "I keep bees")
    done: list[int] = []

    def bob_writes(step: int, _total: int) -> None:
        hidden = rows(db, "SELECT COUNT(*) FROM conversations WHERE user_id LIKE '~import-%'")[0][0]
        worker = threading.Thread(target=lambda: (bobs.append(conversation, "user", f"step {step}"),
                                                  memory.edit(fact.id, text=f"I keep bees ({step})")))
        worker.start()
        worker.join(60)   # no timing: a deadlock guard; this thread holds no lock between batches
        assert not worker.is_alive(), "Bob's writes waited for the import"
        done.append(hidden)

    report = bundle.import_bundle(db, data, bundle.read_bundle(out), "ana", "ana", setup, batch=1,
                                  progress=bob_writes)
    assert report.messages_added == 4 and report.memories_added == 3
    assert done[0] == 1, "Bob wrote while Ana's first conversation was in, not yet hers"
    assert len(done) >= 4 and rows(db, "SELECT COUNT(*) FROM messages WHERE conversation_id = "
                                       f"'{conversation}'") == [(len(done),)]
    assert rows(db, "SELECT COUNT(*) FROM conversations WHERE user_id LIKE '~%'") == [(0,)]


def test_the_card_export_carries_v2_and_v3_and_opens_in_our_import(tmp_path):
    """`homefire companion export-card` without a server: a PNG whose 'chara' chunk is a V2 card
    and 'ccv3' a V3 one (front ends read either), and a V3 JSON file; both open as the same card."""
    import base64

    from serve.config import REPO_ROOT
    from store.cards import parse_card, png_texts
    from store.companions import load_dir

    ember = next(c for c, _ in load_dir(REPO_ROOT / "configs" / "companions") if c.id == "ember")
    for suffix in ("png", "json"):
        out = tmp_path / f"ember.{suffix}"
        done = cli(tmp_path / "data", "companion", "export-card", "ember", "-o", str(out))
        assert done.returncode == 0, done.stderr
        assert parse_card(out.read_bytes(), out.name).model_dump() == ember.model_dump()
    texts = png_texts((tmp_path / "ember.png").read_bytes())
    v2, v3 = (json.loads(base64.b64decode(texts[k])) for k in ("chara", "ccv3"))
    assert v2["spec"] == "chara_card_v2" and v3["spec"] == "chara_card_v3"
    assert v2["data"]["description"] == v3["data"]["description"] == ember.description
    assert v3["data"]["extensions"]["homefire"]["sampling"] == ember.sampling.model_dump()
    wrong = cli(tmp_path / "data", "companion", "export-card", "ember", "-o", str(tmp_path / "ember.txt"))
    assert wrong.returncode == 2 and "a card is written as .png" in wrong.stderr
    unknown = cli(tmp_path / "data", "companion", "export-card", "nobody", "-o", str(tmp_path / "x.png"))
    assert unknown.returncode == 2 and "no companion named 'nobody'" in unknown.stderr


# -- through real servers ------------------------------------------------------------------------

PROMPTS = ["Where do I live now?", "What should I cook for my sister?"]


def greedy(http, companion: str, prompt: str) -> dict:
    conversation = http.post("/api/v1/conversations", json={"companion": companion}).json()["conversation"]
    answer = http.post(f"/api/v1/conversations/{conversation['id']}/messages",
                       json={"content": prompt, "max_tokens": 12, "temperature": 0})
    assert answer.status_code == 200, answer.text
    return answer.json()["reply"]


def searched(http, companion: str, query: str) -> list[tuple[str, float]]:
    found = http.get(f"/api/v1/companions/{companion}/memories/search", params={"q": query, "k": 5})
    assert found.status_code == 200, found.text
    return [(m["text"], round(m["score"], 3)) for m in found.json()]


def cli(data_dir: Path, *args: str, key: str | None = None, server=None):
    import subprocess
    import sys

    env = os.environ | ({"HOMEFIRE_API_KEY": key} if key else {})
    config = ["--config", str(server.config_path)] if server else []
    return subprocess.run([sys.executable, "-m", "serve.cli", *args, "--data-dir", str(data_dir), *config],
                          capture_output=True, text=True, env=env, timeout=600)


def test_a_companion_moves_to_a_fresh_machine_and_speaks_and_remembers_the_same(
        server, make_server, model_dir, tmp_path):
    """Ana's own companion, with her history, facts and an adapter in use, exported through the
    running server; imported by the command line into an empty data directory; served there."""
    ana = server.http(key := server.add_user("ana"))
    fox = {"id": "fox", "name": "Fox", "description": "{{char}} is a fox who keeps notes.",
           "sampling": {"temperature": 0.5, "max_tokens": 48}}
    assert ana.post("/api/v1/companions", json=fox).status_code == 201
    conversation = ana.post("/api/v1/conversations", json={"companion": "fox"}).json()["conversation"]["id"]
    for said in ("I moved to Porto last month.", "My sister Ada is vegetarian."):
        sent = ana.post(f"/api/v1/conversations/{conversation}/messages",
                        json={"content": said, "max_tokens": 8, "temperature": 0})
        assert sent.status_code == 200, sent.text
    assert ana.post("/api/v1/companions/fox/memories",
                    json={"text": "I am allergic to walnuts", "pinned": True}).status_code == 201
    make_adapter(server.data_dir / "adapters" / "ana.fox" / "v1", model_dir, "ana", seed=3)
    used = ana.put("/api/v1/companions/fox/adapter", json={"version": "v1"})
    assert used.status_code == 200, used.text
    out = tmp_path / "fox.homefire"
    done = cli(server.data_dir, "bundle", "export", "fox", "-o", str(out), key=key)
    assert done.returncode == 0, done.stderr
    assert "Fox with 1 conversations, 4 messages, 3 memories, 1 adapter versions (v1 in use)" in done.stdout
    there = {prompt: searched(ana, "fox", prompt) for prompt in PROMPTS}
    replies = {prompt: greedy(ana, "fox", prompt) for prompt in PROMPTS}
    assert all(r["adapter"] for r in replies.values()), "the adapter spoke"
    # vLLM names the adapters it served in its metrics (OWNER.ID--vN): Homefire's /metrics,
    # which every member may read, carries none of them.
    with server.engine() as engine:
        assert "ana.fox--v1" in engine.get("/metrics").text
    assert "vllm:" in ana.get("/metrics").text and "ana.fox" not in ana.get("/metrics").text

    # The card alone, as a front end gets it, opens in our own card import with every field.
    from store.cards import parse_card

    card = ana.get("/api/v1/companions/fox/card", params={"format": "png"})
    assert card.status_code == 200 and card.headers["content-type"] == "image/png"
    stored = ana.get("/api/v1/companions/fox").json()
    assert parse_card(card.content).model_dump() == stored
    assert parse_card(ana.get("/api/v1/companions/fox/card", params={"format": "json"}).content
                      ).model_dump() == stored

    # An empty data directory on another "machine": imported without a server, then served.
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / MODEL_NAME).symlink_to(model_dir, target_is_directory=True)
    fresh = make_server(home, config={"backup": {"dir": str(tmp_path / "nightly"), "keep": 2}})
    done = cli(home, "bundle", "import", str(out), "--json", server=fresh)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["created"] and report["messages_added"] == 4 and report["memories_added"] == 3
    assert report["adapter_in_use"] == "v1", report
    fresh.start()
    with fresh.http() as here:
        assert here.get("/api/v1/companions/fox/adapters").json()["current"] == "v1"
        assert {prompt: searched(here, "fox", prompt) for prompt in PROMPTS} == there
        again = {prompt: greedy(here, "fox", prompt) for prompt in PROMPTS}
        assert [r["content"] for r in again.values()] == [r["content"] for r in replies.values()]
        assert all(r["adapter"] for r in again.values())

        # Through the server's API: the same bundle again adds nothing...
        with out.open("rb") as body:
            same = here.post("/api/v1/bundles", content=body.read(), params={"filename": "fox.homefire"})
        assert same.status_code == 201, same.text
        assert same.json()["messages_added"] == 0 and same.json()["adapters_known"] == ["v1"]
        # ...a changed byte is refused with nothing written...
        raw = bytearray(out.read_bytes())
        raw[raw.find(b"Porto") + 1] ^= 0x01
        refused = here.post("/api/v1/bundles", content=bytes(raw), params={"filename": "fox.homefire",
                                                                            "as_id": "fox2"})
        assert refused.status_code == 422 and refused.json()["error"]["message"].startswith("fox.homefire")
        assert "fox2" not in [c["id"] for c in here.get("/api/v1/companions").json()]
        # ...and an adapter made for other weights stays out, with the way to a new voice said.
        def other_base(info, data):
            if info.filename == "adapters/v1/manifest.json":
                manifest = json.loads(data)
                manifest["base_model"] = {"id": "SmolLM3-3B", "sha256": "0" * 64}
                return [(info.filename, json.dumps(manifest))]
            return [(info, data)]

        moved = repack(out, tmp_path / "moved.homefire", other_base)
        with zipfile.ZipFile(moved) as archive:
            manifest = json.loads(archive.read("manifest.json"))
            manifest["members"]["adapters/v1/manifest.json"] = hashlib.sha256(
                archive.read("adapters/v1/manifest.json")).hexdigest()
        relisted = repack(moved, tmp_path / "relisted.homefire", lambda info, data: [
            (info, json.dumps(manifest) if info.filename == "manifest.json" else data)])
        came = here.post("/api/v1/bundles", content=relisted.read_bytes(), params={"as_id": "fox3"})
        assert came.status_code == 201, came.text
        assert "trained on base model 'SmolLM3-3B'" in came.json()["adapters_refused"]
        assert "homefire finetune fox3" in came.json()["message"]
        assert came.json()["messages_added"] == 4
        assert here.get("/api/v1/companions/fox3/adapters").json() == {
            "current": None, "versions": [], "problem": None}
    # The scheduled backup (backup.dir): the first is taken soon after the start, as the
    # folder held none; it holds what the import brought.
    from serve.backup import backups

    deadline = time.monotonic() + 300
    while not backups(tmp_path / "nightly") and time.monotonic() < deadline:
        time.sleep(0.5)
    nightly = backups(tmp_path / "nightly")
    assert len(nightly) == 1, fresh.log_tail()
    copy = sqlite3.connect(nightly[0] / "homefire.db")
    assert copy.execute("SELECT COUNT(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                        "WHERE c.companion_id = 'fox'").fetchone()[0] >= 4
    assert (nightly[0] / "adapters" / "fox" / "CURRENT").read_text() == "v1"
    assert "backup: " in fresh.log_tail(400)

    # A shared companion's bundle holds only the history of the one who asks for it.
    with server.http() as owner:
        theirs = owner.post("/api/v1/conversations", json={"companion": "ember"}).json()["conversation"]["id"]
    mine = ana.post("/api/v1/conversations", json={"companion": "ember"}).json()["conversation"]["id"]
    shared = ana.get("/api/v1/companions/ember/bundle")
    assert shared.status_code == 200
    (tmp_path / "ember.homefire").write_bytes(shared.content)
    read = bundle.read_bundle(tmp_path / "ember.homefire")
    assert [c.id for c in read.conversations()] == [mine] != [theirs]
    assert read.manifest["counts"]["adapters"] == 0
    ana.close()


def resigned(out: Path, to: Path, change) -> Path:
    """repack, with the manifest listing each member's new checksum: only their content is wrong."""
    changed = repack(out, to.with_suffix(".unsigned"), change)
    with zipfile.ZipFile(changed) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        manifest["members"] = {n: hashlib.sha256(archive.read(n)).hexdigest() for n in archive.namelist()
                               if n != "manifest.json"}
    return repack(changed, to, lambda info, data: [
        (info, json.dumps(manifest) if info.filename == "manifest.json" else data)])


def test_ids_from_a_bundle_never_choose_whose_conversation_its_messages_join(source, setup, tmp_path):
    """Bob makes conversations of his own under every id an earlier Homefire derived for Ana's
    next import (and its "fork"); her import lands in new conversations of hers, his stay his."""
    _, out = source
    data, db = empty(tmp_path)
    bundle.import_bundle(db, data, bundle.read_bundle(out), "ana", "ana", setup)   # as ana.kit

    def derived(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    traps = []
    for conv in bundle.read_bundle(out).conversations():
        near = derived(f"{conv.id}\0ana\0ana.kit2")
        traps += [conv.model_copy(update={"id": near}),
                  conv.model_copy(update={"id": derived(f"{near}\0fork"), "messages": []})]
    history = "".join(t.model_dump_json() + "\n" for t in traps)

    def only_traps(info, data):
        if info.filename == "manifest.json":
            return [(info, json.dumps(json.loads(data) | {"adapter_in_use": None}))]
        changed = {"history.jsonl": history, "memories.jsonl": ""}
        return [] if info.filename.startswith("adapters/") else [(info, changed.get(info.filename, data))]

    bait = resigned(out, tmp_path / "bait.homefire", only_traps)
    bundle.import_bundle(db, data, bundle.read_bundle(bait), "bob", "bob", setup, as_id="trap")
    bobs = "SELECT c.id, COUNT(m.id) FROM conversations c LEFT JOIN messages m ON m.conversation_id = c.id " \
           "WHERE c.user_id = 'bob' GROUP BY c.id ORDER BY c.id"
    before = rows(db, bobs)
    assert len(before) == 4

    report = bundle.import_bundle(db, data, bundle.read_bundle(out), "ana", "ana", setup, as_id="kit2")
    assert report.conversations_added == 2 and report.messages_added == 4 and report.memories_added == 3
    assert rows(db, bobs) == before, "not one message joined a conversation of Bob's"
    assert rows(db, "SELECT COUNT(*) FROM conversations WHERE user_id = 'ana' AND companion_id = 'ana.kit2'"
                ) == [(2,)]
    assert rows(db, "SELECT COUNT(*) FROM memories m JOIN conversations c ON c.id = m.conversation_id "
                    "WHERE c.user_id != m.user_id") == [(0,)]
    again = bundle.import_bundle(db, data, bundle.read_bundle(out), "ana", "ana", setup, as_id="kit2")
    assert again.conversations_added == again.messages_added == again.memories_added == 0


def test_an_older_bundle_after_chatting_on_adds_nothing_and_deleted_memories_stay_deleted(
        source, setup, tmp_path):
    _, out = source
    data, db = empty(tmp_path)
    bundle.import_bundle(db, data, bundle.read_bundle(out), "local", None, setup)
    history, memory = History(db), MemoryStore(db, data / "index", embedder=None)
    first = rows(db, "SELECT id FROM conversations ORDER BY created_at")[0][0]
    history.append(first, "user", "The river is lovely at night.")
    history.append(first, "assistant", "I wish I could see it.")
    porto = rows(db, "SELECT id FROM memories WHERE text LIKE '%Porto!%'")[0][0]
    assert memory.delete(porto)
    counts = "SELECT (SELECT COUNT(*) FROM conversations), (SELECT COUNT(*) FROM messages), " \
             "(SELECT COUNT(*) FROM memories)"
    before = rows(db, counts)

    again = bundle.import_bundle(db, data, bundle.read_bundle(out), "local", None, setup)
    assert again.conversations_added == again.messages_added == again.memories_added == 0
    assert again.conversations_unchanged == 2
    assert rows(db, counts) == before, "the older bundle duplicated nothing, and brought nothing back"


@pytest.mark.parametrize(("member", "content", "said"), [
    ("memories.jsonl", None, "memories.jsonl line 1: kind"),
    ("adapters/v1/adapter_config.json", "[16]", "adapters/v1: adapter v1: adapter_config.json: must be a "
     "JSON object"),
    ("adapters/v1/manifest.json", '{"base_model": "SmolLM2"}', "adapters/v1/manifest.json: not an adapter "
     "manifest"),
])
def test_a_member_of_the_wrong_shape_is_a_bundle_error_that_names_it(source, setup, tmp_path, member, content,
                                                                    said):
    _, out = source

    def change(info, data):
        if info.filename != member:
            return [(info, data)]
        if content is None:   # the first memory of a kind Homefire has no such thing as
            lines = data.decode().splitlines()
            lines[0] = json.dumps(json.loads(lines[0]) | {"kind": "secret"})
            return [(info, "\n".join(lines) + "\n")]
        return [(info, content)]

    bad = resigned(out, tmp_path / "bad.homefire", change)
    data, db = empty(tmp_path)
    with pytest.raises(bundle.BundleError) as err:
        bundle.import_bundle(db, data, bundle.read_bundle(bad), "local", None, setup)
    assert said in str(err.value)
    nothing_written(data, db)
