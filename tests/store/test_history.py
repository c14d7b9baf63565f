"""SQLite history: migrations, appends, matching resent conversations."""

from __future__ import annotations

import sqlite3

import pytest

from store.companions import Companion, CompanionStore
from store.db import MIGRATIONS, Database, SchemaError
from store.history import History, ReplyMeta, UnknownConversation


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "homefire.db")
    CompanionStore(database).put(Companion(id="ember", name="Ember"), "api")
    CompanionStore(database).put(Companion(id="nova", name="Nova"), "api")
    return database


def test_schema_is_versioned_and_wal(db, tmp_path):
    assert db.query("PRAGMA user_version")[0][0] == len(MIGRATIONS)
    assert db.query("PRAGMA journal_mode")[0][0] == "wal"
    db.close()
    Database(tmp_path / "homefire.db").close()  # reopening migrates nothing twice


def test_a_newer_schema_is_refused(tmp_path):
    conn = sqlite3.connect(tmp_path / "new.db")
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(SchemaError, match="upgrade Homefire"):
        Database(tmp_path / "new.db")


def test_resent_conversations_add_only_new_turns(db):
    history = History(db)
    conv, added = history.record_resent("ember", [("user", "hi")])
    assert len(added) == 1
    history.append(conv, "assistant", "hello!", ReplyMeta(tokens=2, finish_reason="stop"))
    same, added = history.record_resent("ember", [("user", "hi"), ("assistant", "hello!"), ("user", "how?")])
    assert same == conv and [m.content for m in added] == ["how?"]
    # The same words to another companion are another conversation.
    other, _ = history.record_resent("nova", [("user", "hi")])
    assert other != conv
    # A regenerated reply (resending a prefix that is not the tail) forks, never rewrites.
    fork, added = history.record_resent("ember", [("user", "hi"), ("assistant", "hey there")])
    assert fork != conv and len(added) == 2
    assert [m.content for m in history.messages(conv)] == ["hi", "hello!", "how?"]


def test_metadata_round_trips_and_deletes_cascade(db):
    history = History(db)
    conv = history.create_conversation("ember", "test")
    meta = ReplyMeta(tokens=3, prompt_tokens=40, model="m", sampling={"temperature": 0.5},
                     finish_reason="length", truncated=True)
    message = history.append(conv.id, "assistant", "partial", meta)
    assert (message.sampling, message.truncated, message.prompt_tokens) == ({"temperature": 0.5}, True, 40)
    with pytest.raises(UnknownConversation):
        history.append("missing", "user", "x")
    CompanionStore(db).delete("ember")
    assert history.get_conversation(conv.id) is None
    assert db.query("SELECT COUNT(*) FROM messages")[0][0] == 0


def test_identical_resends_at_once_store_the_turn_once(db):
    import sys
    import threading

    # Threads switch as often as the interpreter allows, so any gap between matching the
    # stored tail and appending to it is hit (the old code's gap was hit in 100 rounds).
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for attempt in range(100):
            turns = [("user", f"Are you there? ({attempt})")]
            gate = threading.Barrier(4)

            def resend(turns=turns, gate=gate) -> None:
                gate.wait()
                History(db).record_resent("ember", turns)

            threads = [threading.Thread(target=resend) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            stored = db.query("SELECT COUNT(*) FROM messages WHERE content = ?", (turns[0][1],))[0][0]
            assert stored == 1, f"attempt {attempt}: the same resent turn was stored {stored} times"
    finally:
        sys.setswitchinterval(interval)


def test_what_a_member_said_with_a_companion_is_theirs_alone_and_whole(db):
    from store.users import Users

    Users(db).add("bob")
    ana, bob = History(db), History(db, "bob")
    first = ana.create_conversation("ember").id
    ana.append(first, "user", "Summarize this conversation in a title.")
    ana.append(first, "assistant", "oh, the rain.")
    cut = ana.create_conversation("ember").id
    ana.append(cut, "user", "and then?")
    ana.append(cut, "assistant", "it was", ReplyMeta(truncated=True))   # cut off: no reply to learn
    ana.append(ana.create_conversation("nova").id, "user", "hi nova")
    theirs = bob.create_conversation("ember").id
    bob.append(theirs, "user", "bob's secret")
    bob.append(theirs, "assistant", "kept")

    assert ana.spoken("ember") == [(first, [{"role": "user", "content": "Summarize this conversation in a "
                                                                        "title."},
                                            {"role": "assistant", "content": "oh, the rain."}])]
    until = db.query("SELECT MIN(id) FROM messages WHERE conversation_id = ?", (first,))[0][0]
    assert ana.spoken("ember", until) == [], "up to the first message: no reply yet"
    assert [c for c, _ in bob.spoken("ember")] == [theirs]
    firsts = ana.first_messages("ember")
    assert [(c.id, said) for c, said in firsts] == [(first, "Summarize this conversation in a title."),
                                                     (cut, "and then?")]
    assert [c.id for c, _ in bob.first_messages("ember")] == [theirs]
