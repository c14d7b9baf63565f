"""Imports into history and memory: all or nothing, and nothing twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memory.embedder import Embedder
from memory.import_child import run_apart
from memory.importer import Importer
from memory.imports import ImportFailed, open_export
from memory.store import MemoryStore
from store.companions import Companion, CompanionStore
from store.db import Database
from store.history import History
from store.users import Users
from tests.support.exports import T0, ChatGPTTree, chatgpt_hard, chatgpt_simple, chatgpt_zip, write_json

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(tmp_path) -> Database:
    db = Database(tmp_path / "homefire.db")
    CompanionStore(db).put(Companion(id="ember", name="Ember"), "api")
    return db


def run(db: Database, path: Path, tmp_path: Path, dry_run: bool = False):
    with open_export(str(path)) as export:
        return Importer(db, tmp_path / "run").run(export, "ember", "Ember", dry_run=dry_run)


def counts(db: Database) -> tuple[int, int, int]:
    tables = ("conversations", "messages", "memories")
    return tuple(db.query(f"SELECT COUNT(*) FROM {t}")[0][0] for t in tables)


def test_an_import_becomes_history_and_memories_with_original_ids_and_times(db, tmp_path):
    convs, expected = chatgpt_hard()
    result = run(db, chatgpt_zip(tmp_path / "export.zip", convs), tmp_path)
    assert (result.conversations_added, result.conversations_empty, result.messages_added) == (2, 1, 8)
    assert result.memories_added == 4   # one per user message answered by the companion
    assert result.suggested_persona == ["Be warm and brief. Call me Sam.", "Answer like a friend."]
    history = History(db)
    stored = {c.original_id: c for c in history.list_conversations("ember")}
    hard = stored["c-hard"]
    assert (hard.source, hard.origin, hard.title) == ("imported", "chatgpt", "Cats and code")
    assert hard.created_at == T0
    messages = history.messages(hard.id)
    assert [(m.role, m.content) for m in messages] == expected[0]["messages"]
    assert all(T0 < m.created_at < T0 + 100 for m in messages), "original times are kept"
    memories = db.query("SELECT text, source, created_at FROM memories ORDER BY id")
    assert memories[0]["text"] == "User: Hi! Are you there?\nEmber: I'm here, Sam."
    assert {m["source"] for m in memories} == {"imported"}
    assert not list((tmp_path / "run").glob("import-*")), "the staging file is removed"


def test_reimports_add_only_what_is_new(db, tmp_path):
    first = [chatgpt_simple("a", ("user", "Hello"), ("assistant", "Hi!")),
             chatgpt_simple("b", ("user", "Tea or coffee?"), ("assistant", "Tea."))]
    export = write_json(tmp_path / "conversations.json", first)
    assert run(db, export, tmp_path).conversations_added == 2
    before = counts(db)
    again = run(db, export, tmp_path)
    assert (again.conversations_added, again.conversations_unchanged, again.messages_added) == (0, 2, 0)
    assert counts(db) == before

    # A newer export: "a" went on, "c" is new, "b" is as it was.
    newer = [chatgpt_simple("a", ("user", "Hello"), ("assistant", "Hi!"), ("user", "How are you?"),
                            ("assistant", "Well, thanks.")),
             first[1], chatgpt_simple("c", ("user", "Good night"), ("assistant", "Sleep well."))]
    result = run(db, write_json(tmp_path / "newer.json", newer), tmp_path)
    assert (result.conversations_added, result.conversations_extended, result.conversations_unchanged,
            result.messages_added, result.memories_added) == (1, 1, 1, 4, 2)
    history = History(db)
    by_original = {c.original_id: c for c in history.list_conversations("ember")}
    assert [m.content for m in history.messages(by_original["a"].id)] == [
        "Hello", "Hi!", "How are you?", "Well, thanks."]
    assert counts(db) == (before[0] + 1, before[1] + 4, before[2] + 2)

    # The older export again adds nothing: all of it is already there.
    assert run(db, export, tmp_path).messages_added == 0

    # An edited turn: the stored conversation is kept and the new version added beside it.
    edited = [chatgpt_simple("b", ("user", "Tea or coffee?"), ("assistant", "Coffee, today."))]
    fork = run(db, write_json(tmp_path / "edited.json", edited), tmp_path)
    assert (fork.conversations_added, fork.messages_added) == (1, 2)
    assert run(db, write_json(tmp_path / "edited.json", edited), tmp_path).messages_added == 0


def test_a_failed_import_changes_nothing(db, tmp_path):
    run(db, write_json(tmp_path / "one.json", [chatgpt_simple("a", ("user", "Hi"), ("assistant", "Hey"))]),
        tmp_path)
    before = counts(db)
    convs = [chatgpt_simple(f"n{i}", ("user", f"new {i}"), ("assistant", f"reply {i}")) for i in range(50)]
    convs.insert(30, {"id": "broken", "title": "x", "mapping": ["not", "an", "object"]})
    with pytest.raises(ImportFailed, match=r"conversation 31 has no 'mapping' object"):
        run(db, write_json(tmp_path / "conversations.json", convs), tmp_path)
    assert counts(db) == before
    assert not list((tmp_path / "run").glob("import-*"))

    text = json.dumps([chatgpt_simple(f"t{i}", ("user", "x" * 100)) for i in range(100)])
    truncated = tmp_path / "truncated.json"
    truncated.write_text(text[: len(text) - 500])
    with pytest.raises(ImportFailed, match="ends early"):
        run(db, truncated, tmp_path)
    assert counts(db) == before

    dry = run(db, write_json(tmp_path / "new.json", convs[:30]), tmp_path, dry_run=True)
    assert dry.conversations_added == 30 and counts(db) == before


def test_a_child_process_stages_an_import_as_this_process_would(db, tmp_path):
    convs = [chatgpt_simple(f"n{i}", ("user", f"new {i}"), ("assistant", f"reply {i}")) for i in range(450)]
    export = write_json(tmp_path / "conversations.json", convs)
    reports: list[tuple[int, int]] = []
    result = run_apart(Importer(db, tmp_path / "run"), export, None, "my export", "ember", "Ember",
                       lambda done, total: reports.append((done, total)))
    assert (result.formats, result.conversations_added, result.memories_added) == (["chatgpt"], 450, 450)
    assert counts(db) == (450, 900, 450)
    assert len(reports) >= 3 and reports[-1][0] == reports[-1][1] > 0, "progress comes through"
    again = run_apart(Importer(db, tmp_path / "run"), export, None, "my export", "ember", "Ember")
    assert (again.conversations_unchanged, again.messages_added) == (450, 0), "it reads what is stored"

    convs.insert(30, {"id": "broken", "title": "x", "mapping": ["not", "an", "object"]})
    broken = write_json(tmp_path / "broken.json", convs)
    with pytest.raises(ImportFailed, match=r"^my export: conversation 31 has no 'mapping' object"):
        run_apart(Importer(db, tmp_path / "run"), broken, None, "my export", "ember", "Ember")
    assert counts(db) == (450, 900, 450)
    assert not list((tmp_path / "run").glob("import-*"))


def test_a_cycle_in_the_message_tree_is_reported(db, tmp_path):
    tree = ChatGPTTree("loop", "Loop")
    first = tree.add("root", "user", ["one"])
    second = tree.add(first, "assistant", ["two"])
    tree.mapping[first]["parent"] = second
    with pytest.raises(ImportFailed, match=r"conversation 1 \(loop\): its message tree has a cycle"):
        run(db, write_json(tmp_path / "conversations.json", [tree.export()]), tmp_path)


def test_the_cli_imports_without_a_server_and_the_memories_are_searchable(tmp_path):
    convs = [chatgpt_simple("w", ("user", "My grandmother's name was Rosalind and she grew dahlias."),
                            ("assistant", "What a lovely name. Dahlias are beautiful.")),
             chatgpt_simple("x", ("user", "I fixed my bike today."), ("assistant", "Nice work!"))]
    export = chatgpt_zip(tmp_path / "export.zip", convs)
    data = tmp_path / "data"
    cli = [sys.executable, "-m", "serve.cli"]
    done = subprocess.run([*cli, "import", str(export), "--companion", "ember", "--data-dir", str(data),
                           "--json"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["conversations_added"], result["messages_added"], result["memories_added"]) == (2, 4, 2)
    found = subprocess.run([*cli, "memory", "search", "ember", "what flowers did my grandmother grow?",
                            "-k", "1", "--json", "--data-dir", str(data)],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert found.returncode == 0, found.stderr
    assert "Rosalind" in json.loads(found.stdout)[0]["text"]
    again = subprocess.run([*cli, "import", str(export), "--companion", "ember", "--data-dir", str(data)],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0 and "(2 already imported)" in again.stdout, again.stdout + again.stderr
    unknown = subprocess.run([*cli, "import", str(export), "--companion", "nobody", "--data-dir", str(data)],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
    assert unknown.returncode == 2 and "no companion named 'nobody'" in unknown.stderr
    # The operator imports for a member with --user: the same application, acting for them.
    assert subprocess.run([*cli, "user", "add", "bea", "--data-dir", str(data)], capture_output=True,
                          cwd=REPO, timeout=60).returncode == 0
    theirs = subprocess.run([*cli, "import", str(export), "--companion", "ember", "--user", "bea", "--json",
                             "--data-dir", str(data)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert theirs.returncode == 0 and json.loads(theirs.stdout)["conversations_added"] == 2, theirs.stderr
    db = Database(data / "homefire.db")
    assert len(History(db, "bea").list_conversations("ember")) == 2
    assert len(History(db, "local").list_conversations("ember")) == 2, "the owner's stay the owner's"
    nobody = subprocess.run([*cli, "import", str(export), "--companion", "ember", "--user", "cy",
                             "--data-dir", str(data)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert nobody.returncode == 2 and "no user named 'cy'" in nobody.stderr
    store = MemoryStore(db, data / "index", Embedder())
    assert store.index_is_consistent()


def test_every_message_of_an_import_is_in_a_memory_and_searchable(db, tmp_path):
    said = [("assistant", "Hi! I just got back from camping in the Alps."),
            ("user", "I adopted a dog named Rex yesterday."), ("user", "Also, how are you?"),
            ("assistant", "I'm well, thank you! Tell me about Rex."),
            ("user", "By the way, I am moving to Berlin next month.")]
    export = tmp_path / "chat.jsonl"
    export.write_text(json.dumps({"id": "rex", "messages": [{"role": r, "content": c} for r, c in said]}))
    assert run(db, export, tmp_path).memories_added == 2
    texts = [r["text"] for r in db.query("SELECT text FROM memories ORDER BY id")]
    assert texts == ["Ember: Hi! I just got back from camping in the Alps.\n"
                     "User: I adopted a dog named Rex yesterday.\nUser: Also, how are you?\n"
                     "Ember: I'm well, thank you! Tell me about Rex.",
                     "User: By the way, I am moving to Berlin next month."]
    store = MemoryStore(db, tmp_path / "index", Embedder())
    assert store.index_pending() == 2
    # The companion's opening is in a memory too: an import's first message is no card greeting.
    for question, words in (("Which city am I moving to?", "Berlin"), ("What is my dog called?", "Rex"),
                            ("Where did you go camping?", "camping")):
        assert words in store.search("ember", question, 1)[0].text, question


def test_an_imports_memories_call_the_user_by_their_display_name(db, tmp_path):
    users = Users(db)
    users.ensure_local("a-key")
    users.set_display_name("local", "Sam")
    said = chatgpt_simple("a", ("user", "I keep bees."), ("assistant", "Lovely!"))
    export = write_json(tmp_path / "one.json", [said])
    assert run(db, export, tmp_path).memories_added == 1
    assert [r["text"] for r in db.query("SELECT text FROM memories")] == ["Sam: I keep bees.\nEmber: Lovely!"]
