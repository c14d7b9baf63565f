"""Long-term memory with the real embedder and a real Chroma index."""

from __future__ import annotations

import random
import re
import time

import pytest

from memory.embedder import Embedder
from memory.remember import exchange_text, remember_new, repair
from memory.store import MemoryStore
from store.companions import Companion, CompanionStore
from store.db import Database
from store.history import History, ReplyMeta

DAY = 86400
SMALL_TALK = ["the weather was grey", "I watched a film", "work was long", "I made pasta",
              "the bus was late", "I read a chapter", "my phone died", "I went for a run",
              "the neighbours were loud", "I tidied the kitchen", "I bought new socks",
              "I painted the fence", "the train was crowded", "I learned a chord on guitar"]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def chat(history: History, memory: MemoryStore, conversation: str, asked: str, reply: str, when: float):
    history.append(conversation, "user", asked)
    answer = history.append(conversation, "assistant", reply, ReplyMeta(finish_reason="stop"))
    memory.add_exchange("ember", conversation, answer.id, asked, exchange_text(asked, reply, "Ember"), when)


def told(history: History, memory: MemoryStore, said: dict) -> None:
    """Each line said at its time (a datetime) in a conversation of its own, answered "Tell me
    more!", and indexed."""
    for text, at in said.items():
        chat(history, memory, history.create_conversation("ember").id, text, "Tell me more!", at.timestamp())
    memory.index_pending()


def fresh(tmp_path, embedder) -> tuple[Database, History, MemoryStore]:
    """An empty data directory with the companion Ember."""
    db = Database(tmp_path / "homefire.db")
    CompanionStore(db).put(Companion(id="ember", name="Ember"), "api")
    return db, History(db), MemoryStore(db, tmp_path / "index", embedder)


@pytest.fixture
def store(tmp_path, embedder):
    db, history, memory = fresh(tmp_path, embedder)
    now = time.time()
    # A fact said once, long ago, in one conversation...
    old = history.create_conversation("ember").id
    chat(history, memory, old, "My sister Ada is getting married in Lisbon in June.",
         "How exciting! Lisbon in June will be beautiful.", now - 200 * DAY)
    # ...then 300 exchanges of small talk in another.
    later = history.create_conversation("ember").id
    rng = random.Random(7)
    for i in range(300):
        chat(history, memory, later, f"Today {rng.choice(SMALL_TALK)}.", f"Oh, tell me more ({i})!",
             now - (199 - i * 0.6) * DAY)
    assert memory.index_pending() == 301
    return history, memory, old


def recalled(memory: MemoryStore, query: str) -> list[str]:
    return [m.text for m in memory.recall("ember", query)]


def test_a_fact_from_300_exchanges_ago_is_recalled(store):
    _, memory, _ = store
    texts = recalled(memory, "Where is my sister's wedding going to be?")
    assert any("Lisbon" in t for t in texts[:2])


def test_an_unrelated_question_recalls_nothing_about_it(store):
    _, memory, _ = store
    assert not any("Lisbon" in t for t in recalled(memory, "Can you recommend a good sci-fi novel?"))


def test_near_copies_are_not_all_recalled(store):
    _, memory, _ = store
    texts = recalled(memory, "Today I made pasta.")
    assert len(texts) == len(set(t.split("\n")[0] for t in texts))  # no two of the same words


def test_what_was_said_once_is_not_crowded_out_by_what_was_said_again_and_again(store):
    # Each small-talk line is said about 21 times; its copies filled every place of the top 5.
    _, memory, _ = store
    query = "Tell me about my family"
    assert not any("Lisbon" in m.text for m in memory.search("ember", query, 5))
    distinct = memory.search("ember", query, 5, distinct=True)
    assert any("Lisbon" in m.text for m in distinct)
    assert len({m.text.split("\n")[0] for m in distinct}) == 5   # no two of the same words
    # Without `distinct` every copy is found: a person looking for what to delete wants them all.
    copies = memory.search("ember", "Today I painted the fence.", 100)
    assert sum(m.text.startswith("User: Today I painted the fence.") for m in copies) > 10


def test_what_is_already_in_the_prompt_is_skipped(store):
    _, memory, _ = store
    asked = "My sister Ada is getting married in Lisbon in June."
    assert not any("Lisbon" in m.text for m in memory.recall(
        "ember", "Where is my sister's wedding?", skip_asked={asked}))


def test_facts_rank_first_and_deleted_memories_never_return(store):
    _, memory, _ = store
    fact = memory.add_fact("ember", "I am allergic to walnuts.", pinned=True)
    memory.index_pending()
    assert recalled(memory, "Can I eat walnut cake?")[0] == "I am allergic to walnuts."
    assert memory.delete(fact.id)
    assert memory.get(fact.id) is None
    assert "I am allergic to walnuts." not in recalled(memory, "Can I eat walnut cake?")
    memory.rebuild()
    assert "I am allergic to walnuts." not in recalled(memory, "Can I eat walnut cake?")


def test_rebuild_gives_the_same_recall_and_repair_restores_missing_memories(store):
    history, memory, old = store
    questions = ["Where is my sister's wedding?", "What did I cook?", "Did I exercise?"]
    before = [recalled(memory, q) for q in questions]
    assert memory.index_is_consistent()
    assert memory.rebuild() == 301
    assert [recalled(memory, q) for q in questions] == before
    # An exchange committed without its memory (a crash in between) is repaired...
    with memory.db.transaction() as conn:
        conn.execute("DELETE FROM memories WHERE conversation_id = ?", (old,))
    assert repair(memory) == 1 and memory.index_pending() == 1
    assert any("Lisbon" in t for t in recalled(memory, "Where is my sister's wedding?"))
    # ...but one the user deleted stays deleted.
    wedding = next(m for m in memory.list("ember", limit=500) if "Lisbon" in m.text)
    memory.delete(wedding.id)
    assert repair(memory) == 0


def test_forgetting_a_conversation_removes_history_memories_and_vectors(store):
    history, memory, old = store
    assert memory.forget_conversation(old)
    assert history.get_conversation(old) is None
    assert not any("Lisbon" in t for t in recalled(memory, "Where is my sister's wedding?"))
    assert memory.index_is_consistent()


def test_long_exchanges_are_cut_to_the_embedder_window(embedder):
    text = " ".join(f"word{i}" for i in range(1500))
    pieces = embedder.chunks(text)
    assert len(pieces) > 2
    assert all(len(embedder.model.tokenizer(p, add_special_tokens=False)["input_ids"]) <= embedder.window
               for p in pieces)
    assert pieces[0].startswith("word0 ") and pieces[-1].endswith("word1499")


def test_recall_off_recalls_nothing(store):
    _, memory, _ = store
    memory.settings.top_k = 0
    assert memory.recall("ember", "Where is my sister's wedding going to be?") == []
    assert any("Lisbon" in m.text for m in memory.search("ember", "sister's wedding", 3))


def test_a_replys_memory_is_indexed_while_an_import_indexes_its_thousands(tmp_path, embedder):
    import threading

    db, history, memory = fresh(tmp_path, embedder)
    imported = history.create_conversation("ember", source="imported").id
    with db.transaction() as conn:   # an import's backlog: many seconds of embedding on this machine
        conn.executemany("INSERT INTO memories (user_id, companion_id, conversation_id, kind, text, "
                         "source, created_at, updated_at) "
                         "VALUES ('local', 'ember', ?, 'exchange', ?, 'imported', ?, ?)",
                         [(imported, f"User: imported question {i}\nEmber: answer {i}", i, i)
                          for i in range(3000)])
    progress: list[int] = []
    importing = threading.Thread(target=memory.index_pending,
                                 # Small batches: the import takes many turns on the lock,
                                 # however fast this machine embeds.
                                 kwargs={"progress": lambda done, total: progress.append(done), "batch": 32})
    importing.start()
    try:
        while not progress or progress[-1] == 0:   # the import's indexing is under way
            importing.join(0.05)
        fact = memory.add_fact("ember", "My bike is teal.")
        # What the replies' indexer does: everything but imported memories, taking turns on the lock.
        assert memory.index_pending(imported=False) == 1
        assert importing.is_alive(), "the reply's memory waited for the whole import"
        assert memory.get(fact.id).indexed
        assert memory.search("ember", "what colour is my bike?", 1)[0].id == fact.id
    finally:
        importing.join()
    assert progress[-1] == 3000 and memory.index_pending() == 0


def test_a_smaller_search_is_the_top_of_a_larger_one(store):
    # 300 exchanges of 14 small-talk lines: many memories tie to within bfloat16's rounding.
    _, memory, _ = store
    for query in ("What did I do today?", "Tell me about the train", "pasta", "socks and fences",
                  "Was the weather nice?", "music practice"):
        five, twenty = memory.search("ember", query, 5), memory.search("ember", query, 20)
        assert [m.id for m in five] == [m.id for m in twenty[:5]], query
        distinct = [memory.search("ember", query, k, distinct=True) for k in (5, 20)]
        assert [m.id for m in distinct[0]] == [m.id for m in distinct[1][:5]], query
        scores = [m.score for m in twenty]
        assert scores == sorted(scores, reverse=True)
        assert [m.id for m in memory.search("ember", query, 5)] == [m.id for m in five], "and the same again"


def test_messages_no_reply_followed_are_remembered_when_the_conversation_is_settled(tmp_path, embedder):
    db, history, memory = fresh(tmp_path, embedder)
    greeting_only = history.create_conversation("ember").id
    history.append(greeting_only, "assistant", "Hey, you're here!")
    conversation = history.create_conversation("ember").id
    for role, text in [("assistant", "Hey, you're here!"), ("user", "I got the job!"),
                       ("user", "At the observatory."), ("assistant", "Congratulations!"),
                       ("user", "My first day is in May."), ("user", "I'm nervous.")]:
        history.append(conversation, role, text)
    # A live reply remembers what it ends; the messages after it wait for the next reply...
    assert remember_new(memory, conversation, "Ember") == 1
    assert remember_new(memory, conversation, "Ember") == 0
    # ...or for the start-up, when no reply is on its way: then they are a memory of their own.
    assert repair(memory) == 1 and repair(memory) == 0
    # The card's greeting, the same in every conversation, is in none of them.
    texts = [m.text for m in reversed(memory.list("ember"))]
    assert texts == ["User: I got the job!\nUser: At the observatory.\nEmber: Congratulations!",
                     "User: My first day is in May.\nUser: I'm nervous."]
    # Deleted, a memory's messages are not taken into another one.
    memory.delete(memory.list("ember")[0].id)
    history.append(conversation, "assistant", "You'll be great.")
    assert remember_new(memory, conversation, "Ember") == 0 and repair(memory) == 0


def test_a_question_about_time_finds_what_was_said_then(tmp_path, embedder):
    from datetime import datetime

    db, history, memory = fresh(tmp_path, embedder)
    said = {"I passed my driving test, finally!": datetime(2025, 3, 12, 19),
            "I ran my first half marathon this morning.": datetime(2025, 5, 18, 9),
            "The bus was late again.": datetime(2025, 5, 20, 8),
            "I made soup for dinner.": datetime(2025, 6, 2, 19)}
    told(history, memory, said)
    now = datetime(2025, 6, 4, 12).timestamp()
    # The same words asked about another time find what was said then.
    in_may = memory.recall("ember", "What did I achieve in May?", now=now)
    assert "half marathon" in in_may[0].text
    assert "half marathon" in memory.search("ember", "What did I achieve last month?", 1, now=now)[0].text
    assert "driving test" in memory.search("ember", "What did I achieve in March?", 1, now=now)[0].text


def test_a_question_about_the_days_before_an_event_finds_what_was_said_then(tmp_path, embedder):
    from datetime import datetime

    db, history, memory = fresh(tmp_path, embedder)
    said = {"I fixed the squeaky door with some oil.": datetime(2025, 4, 20, 19),
            "I gave my first talk in front of three hundred people.": datetime(2025, 5, 2, 19),
            "My boss praised my report.": datetime(2025, 5, 3, 19),
            "Just got back from Ghent, four days of walking and eating.": datetime(2025, 5, 9, 19),
            "I bought new running shoes.": datetime(2025, 5, 14, 19),
            "I watched a film about a big talk show host.": datetime(2025, 5, 30, 19),
            "What a week, I was up to my ears in work.": datetime(2025, 4, 21, 19),
            "The week before a trip I always pack too much.": datetime(2025, 5, 31, 19)}
    told(history, memory, said)
    now = datetime(2025, 6, 4, 12).timestamp()
    question = "What was I up to the week before I went to Ghent?"
    # The trip dates the question: the trip and what was said in the ten days before it come
    # first; without the event's date, the busy week and the packing outrank them.
    texts = {t: exchange_text(t, "Tell me more!", "Ember") for t in said}
    window = {texts[t] for t in list(said)[1:4]}
    hits = memory.search("ember", question, 6, now=now)
    found = [m.text for m in hits]
    assert set(found[:3]) == window, found
    # Each says why: said in the days before the event, which the memory that tells of it dated.
    for hit in hits[:3]:
        if "Ghent" in hit.text:   # the event itself: not in the days before it
            assert hit.why.window is None and hit.score == hit.why.similarity
            continue
        assert hit.why.window.startswith("said in the 10 days before 'User: Just got back from Gh"), hit.why
        assert "(2025-05-09)" in hit.why.window and hit.score > hit.why.similarity + 0.4
    memory.settings.relative_bonus = 0.0
    assert set([m.text for m in memory.search("ember", question, 6, now=now)][:3]) != window


def test_what_was_said_again_and_again_scores_less_than_what_was_said_once_and_says_why(tmp_path, embedder):
    db, history, memory = fresh(tmp_path, embedder)
    now = time.time()
    for days in (30, 20, 10):
        chat(history, memory, history.create_conversation("ember").id, "The bus was late again this morning.",
             "Oh no!", now - days * DAY)
    chat(history, memory, history.create_conversation("ember").id,
         "The bus driver let me ride for free because I helped him with a pram.", "How kind!", now - 5 * DAY)
    memory.index_pending()
    asked = "What happened on the bus?"
    hits = {"free" if "free" in m.text else "late": m for m in memory.search("ember", asked, 2, now=now,
                                                                               distinct=True)}
    late, free = hits["late"], hits["free"]
    assert late.why.said_again and not free.why.said_again
    assert late.score == late.why.similarity and free.score == free.why.similarity   # no time was asked about
    # A reply's prompt takes what was said once first, and the echo only if it is still over the
    # threshold after echo_penalty.
    settings = memory.settings
    recalled = [m.id for m in memory.recall("ember", asked, now=now)]
    assert recalled[0] == free.id
    assert (late.id in recalled) == (late.score - settings.echo_penalty >= settings.threshold), recalled
    settings.echo_penalty, settings.threshold = 0.0, min(late.score, free.score) - 0.01
    assert set(m.id for m in memory.recall("ember", asked, now=now)) == {late.id, free.id}
    # The very words said match the user's own words in the memory better than the exchange.
    said = memory.search("ember", "The bus was late again this morning.", 1, now=now)[0]
    assert said.why.matched == "your words" and said.why.similarity > 0.99


def test_an_index_from_before_the_users_words_vector_is_embedded_again_on_upgrade(tmp_path, embedder):
    from store.db import MIGRATIONS

    db, history, memory = fresh(tmp_path, embedder)
    conversation = history.create_conversation("ember").id
    history.append(conversation, "user", "My sister Ada is getting married in Lisbon.")
    history.append(conversation, "assistant", "How lovely!")
    assert remember_new(memory, conversation, "Ember") == 1 and memory.index_pending() == 1
    # As the previous version left it: one vector, the text's.
    memory.collection("ember").delete(ids=["1:1"])
    with db.transaction() as conn:
        conn.execute("UPDATE memories SET chunks = 1")
    reembed = next(i for i, script in enumerate(MIGRATIONS) if "SET chunks = 0" in script)
    db.conn.execute(f"PRAGMA user_version={reembed}")
    later = "\n".join(MIGRATIONS[reembed + 1:])   # what later migrations made is made again
    made = [t for t in re.findall(r"CREATE TABLE (\w+)", later) if f"ALTER TABLE {t} RENAME" not in later]
    for table in made:
        db.conn.execute(f"DROP TABLE {table}")
    for table, column in re.findall(r"ALTER TABLE (\w+) ADD COLUMN (\w+)", later):
        if table not in made:
            db.conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    db.close()
    db = Database(tmp_path / "homefire.db")
    upgraded = MemoryStore(db, tmp_path / "index", embedder)
    assert upgraded.index_pending() == 1
    assert upgraded.collection("ember").count() == 2 and upgraded.index_is_consistent()


def test_a_members_fact_and_rebuild_index_their_own_memories_only(tmp_path, embedder):
    """Another member's pending import (thousands of memories to embed) is theirs to index: a
    fact, an edit or a rebuild of this member's embeds this member's memories, never waits for
    all of those."""
    db, history, memory = fresh(tmp_path, embedder)
    theirs = History(db, "ivy").create_conversation("ember", source="imported").id
    with db.transaction() as conn:
        conn.executemany("INSERT INTO memories (user_id, companion_id, conversation_id, kind, text, "
                         "source, created_at, updated_at) "
                         "VALUES ('ivy', 'ember', ?, 'exchange', ?, 'imported', ?, ?)",
                         [(theirs, f"User: question {i}\nEmber: answer {i}", i, i) for i in range(500)])
    pending = "SELECT COUNT(*) FROM memories WHERE user_id = 'ivy' AND chunks = 0"
    fact = memory.add_fact("ember", "My bike is teal.")
    assert memory.index_pending(mine=True) == 1 and memory.get(fact.id).indexed
    assert db.query(pending)[0][0] == 500, "Ivy's import was left to Ivy's import"
    assert memory.rebuild() == 1 and db.query(pending)[0][0] == 500
    assert memory.search("ember", "what colour is my bike?", 1)[0].id == fact.id
