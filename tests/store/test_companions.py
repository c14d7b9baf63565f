"""Companion namespaces: shared ids, each user's own, config files, and the schema 5 move."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from store.adapters import adopt_old_folders
from store.companions import Companion, CompanionStore
from store.db import MIGRATIONS, Database
from store.history import History, chain_hash, chain_root


def test_a_config_file_never_touches_a_users_own_companion(tmp_path):
    db = Database(tmp_path / "homefire.db")
    store = CompanionStore(db)
    store.put(Companion(id="luna", name="Ann's Luna"), "api", owner="ann")
    files = tmp_path / "companions"
    files.mkdir()
    (files / "luna.yaml").write_text("name: Shared Luna\n")
    store.sync_dir(files)
    assert store.get("luna", "ann").name == "Ann's Luna" and store.get("luna", "ann").key == "ann.luna"
    assert store.get("luna", "ben").name == "Shared Luna" and store.get("luna", "ben").key == "luna"
    assert store.origin("ann.luna") == ("api", None, "ann")
    assert [c.name for c in store.list("ann")] == ["Ann's Luna"]
    assert sorted(store.ids()) == ["ann.luna", "luna"]


def test_schema_5_moves_users_own_companions_into_their_namespace(tmp_path):
    path = tmp_path / "homefire.db"
    old = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:4], start=1):
        old.executescript(f"BEGIN;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")
    card = Companion(id="luna", name="Luna").model_dump_json()
    old.execute("INSERT INTO companions VALUES ('luna', ?, 'api', NULL, 0, 0, 'ann')", (card,))
    old.execute("INSERT INTO conversations (id, companion_id, source, created_at, updated_at, user_id) "
                "VALUES ('c1', 'luna', 'live', 0, 0, 'ann')")
    chain = chain_hash(chain_root("luna"), "user", "I have a dog.")   # as the old code chained it
    old.execute("INSERT INTO messages (conversation_id, role, content, created_at, chain) "
                "VALUES ('c1', 'user', 'I have a dog.', 0, ?)", (chain,))
    old.execute("INSERT INTO memories (companion_id, conversation_id, kind, text, source, created_at, "
                "updated_at, user_id) VALUES ('luna', 'c1', 'fact', 'a dog', 'user', 0, 0, 'ann')")
    old.close()
    (tmp_path / "adapters" / "luna" / "v1").mkdir(parents=True)

    db = Database(path)
    assert db.query("SELECT id FROM companions")[0][0] == "ann.luna"
    assert db.query("SELECT companion_id FROM conversations")[0][0] == "ann.luna"
    assert db.query("SELECT companion_id FROM memories")[0][0] == "ann.luna"
    assert db.query("PRAGMA foreign_key_check") == []
    luna = CompanionStore(db).get("luna", "ann")
    assert luna.key == "ann.luna"
    # The stored chain still matches a client resending the conversation: nothing is added.
    conversation, added = History(db, "ann").record_resent(luna.key, [("user", "I have a dog.")])
    assert conversation == "c1" and added == []
    assert History(db, "ann").get_conversation("c1").companion_id == "luna"
    assert adopt_old_folders(tmp_path, CompanionStore(db).ids()) == ["ann.luna"]
    assert (Path(tmp_path) / "adapters" / "ann.luna" / "v1").is_dir()


def test_an_unchanged_config_file_is_not_written_again(tmp_path):
    db = Database(tmp_path / "homefire.db")
    store = CompanionStore(db)
    files = tmp_path / "companions"
    files.mkdir()
    (files / "kit.yaml").write_text("name: Kit\n")
    store.sync_dir(files)
    first = db.query("SELECT updated_at FROM companions WHERE id = 'kit'")[0][0]
    store.sync_dir(files)
    assert db.query("SELECT updated_at FROM companions WHERE id = 'kit'")[0][0] == first
