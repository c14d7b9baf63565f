"""Long-term memory through the server: recall in replies, user control, start-up repair."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import chromadb
import httpx

from store.companions import CompanionStore
from store.db import Database
from store.history import History, ReplyMeta

REPO = Path(__file__).resolve().parents[2]
SMALL_TALK = ["the weather was grey", "I watched a film", "work was long", "I made pasta",
              "the bus was late", "I read a chapter", "my phone died", "I went for a run"]


def ask(http, conversation: str, content: str) -> dict:
    response = http.post(f"/api/v1/conversations/{conversation}/messages",
                         json={"content": content, "max_tokens": 8})
    assert response.status_code == 200, response.text
    return response.json()["reply"]


def test_a_fact_the_user_adds_is_used_and_their_deletion_is_final(server):
    http = server.http()
    # The owner (an admin) reads what embeds memories: the bundled model, nothing to redo.
    assert http.get("/readyz").json()["memory"] == {"embedder": "all-MiniLM-L6-v2 (bundled)",
                                                    "reembedding": None, "reranker": None}
    added = http.post("/api/v1/companions/ember/memories",
                      json={"text": "I am allergic to walnuts.", "pinned": True})
    assert added.status_code == 201 and added.json()["indexed"] is True
    fact = added.json()
    created = http.post("/api/v1/conversations", json={"companion": "ember"})
    conversation = created.json()["conversation"]["id"]
    reply = ask(http, conversation, "Should I try the walnut cake at the bakery?")
    assert reply["memories_used"][0]["id"] == fact["id"]
    stored = http.get(f"/api/v1/conversations/{conversation}").json()["messages"][-1]
    assert stored["memories_used"][0]["text"] == "I am allergic to walnuts."

    listed = http.get("/api/v1/companions/ember/memories", params={"kind": "fact"}).json()
    assert [m["id"] for m in listed] == [fact["id"]]
    found = http.get("/api/v1/companions/ember/memories/search", params={"q": "nut allergy"}).json()
    assert found[0]["id"] == fact["id"] and found[0]["score"] > 0.3
    correction = {"text": "I am allergic to walnuts and pecans."}
    edited = http.patch(f"/api/v1/memories/{fact['id']}", json=correction)
    assert edited.json()["text"].endswith("pecans.") and edited.json()["indexed"] is True

    assert http.delete(f"/api/v1/memories/{fact['id']}").status_code == 204
    assert http.get(f"/api/v1/memories/{fact['id']}").status_code == 404
    assert http.post("/api/v1/memories/rebuild").json()["memories"] >= 0
    search = {"q": "nut allergy", "k": 50}
    found = http.get("/api/v1/companions/ember/memories/search", params=search).json()
    assert fact["id"] not in [m["id"] for m in found]
    reply = ask(http, conversation, "Is walnut cake safe for me?")
    assert fact["id"] not in [m["id"] for m in reply["memories_used"] or []]


def test_recall_shows_exactly_what_a_reply_would_use_and_stores_nothing(server):
    key = server.add_user("recaller")
    http = server.http(key)
    for text in ("My sister Ada is getting married in Lisbon in June.", "I play the cello on Sundays.",
                 "My cat Biscuit hates the vacuum cleaner."):
        assert http.post("/api/v1/companions/ember/memories", json={"text": text}).status_code == 201
    asked = "Where is Ada's wedding going to be?"
    before = http.get("/api/v1/companions/ember/memories").json()
    shown = http.get("/api/v1/companions/ember/memories/recall", params={"q": asked}).json()
    assert shown and "Lisbon" in shown[0]["text"] and shown[0]["conversation_id"] is None
    why = shown[0]["why"]   # a fact the user added matched, with its similarity, at no time asked about
    assert why["matched"] == "the fact" and why["similarity"] == shown[0]["score"] > 0.26, shown[0]
    assert why["window"] is None and why["said_again"] is False
    assert http.get("/api/v1/companions/ember/memories").json() == before, "recall stores nothing"
    assert http.get("/api/v1/conversations").json() == []
    cli = subprocess.run([sys.executable, "-m", "serve.cli", "memory", "recall", "ember", asked,
                          "--data-dir", str(server.data_dir)], capture_output=True, text=True, cwd=REPO,
                         env=server.env | {"HOMEFIRE_API_KEY": key}, timeout=120)
    assert cli.returncode == 0 and "Lisbon" in cli.stdout.splitlines()[0], cli.stdout + cli.stderr
    assert f"why: the fact matched ({why['similarity']:.2f})" in cli.stdout.splitlines()[1], cli.stdout
    # A reply to the same message, as a conversation's first, uses the very same memories.
    raw = server.openai(key).chat.completions.with_raw_response.create(
        model="ember", messages=[{"role": "user", "content": asked}], max_tokens=8)
    stored = http.get(f"/api/v1/conversations/{raw.headers['X-Homefire-Conversation']}").json()
    assert [m["id"] for m in stored["messages"][-1]["memories_used"]] == [m["id"] for m in shown]
    assert stored["messages"][-1]["memories_used"][0]["why"] == why
    assert http.get("/api/v1/companions/nobody/memories/recall", params={"q": "x"}).status_code == 404


def test_bad_memory_requests_are_named(server):
    http = server.http()
    assert http.get("/api/v1/companions/nobody/memories").status_code == 404
    empty = http.post("/api/v1/companions/ember/memories", json={"text": ""})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "text"
    assert http.patch("/api/v1/memories/999999", json={"pinned": True}).status_code == 404


def build_history(data_dir: Path) -> None:
    """301 exchanges written as an older Homefire would leave them: no memories, no index."""
    db = Database(data_dir / "homefire.db")
    CompanionStore(db).sync_dir(REPO / "configs" / "companions")
    history = History(db)
    wedding = history.create_conversation("ember").id
    history.append(wedding, "user", "My sister Ada is getting married in Lisbon in June.")
    history.append(wedding, "assistant", "How exciting! Lisbon in June will be beautiful.",
                   ReplyMeta(finish_reason="stop"))
    chatter = history.create_conversation("ember").id
    rng = random.Random(3)
    for i in range(300):
        history.append(chatter, "user", f"Today {rng.choice(SMALL_TALK)}.")
        history.append(chatter, "assistant", f"Oh, tell me more ({i})!", ReplyMeta(finish_reason="stop"))
    db.close()


def test_memory_from_300_exchanges_ago_survives_a_damaged_index(make_server, tmp_path):
    data = tmp_path / "data"
    build_history(data)
    first = make_server(data, engine="shared").start()
    assert "remembered 301 exchanges" in first.log_tail(200)
    http = first.http()
    created = http.post("/api/v1/conversations", json={"companion": "ember"})
    used = ask(http, created.json()["conversation"]["id"], "Where is my sister's wedding going to be?")
    used = used["memories_used"]
    assert any("Lisbon" in m["text"] for m in used)
    # A fresh conversation: recall also reads the previous reply, which was about the wedding.
    fresh = http.post("/api/v1/conversations", json={"companion": "ember"}).json()["conversation"]["id"]
    unrelated = ask(http, fresh, "Can you recommend a good science fiction novel?")["memories_used"]
    assert not any("Lisbon" in m["text"] for m in unrelated or []), unrelated
    first.stop(signal.SIGTERM)

    (data / "index" / "chroma.sqlite3").write_bytes(b"this is not a database" * 100)
    second = make_server(data, engine="shared").start()
    log = second.log_tail(300)
    assert "cannot be read" in log and "rebuilding it" in log
    conversation = second.http().post("/api/v1/conversations", json={"companion": "ember"}).json()
    used = ask(second.http(), conversation["conversation"]["id"], "Where is my sister's wedding?")
    assert any("Lisbon" in m["text"] for m in used["memories_used"])


def test_the_vector_index_can_live_on_a_chroma_server(make_server, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    chroma_bin = Path(sys.executable).with_name("chroma")
    log = (tmp_path / "chroma.log").open("wb")
    chroma = subprocess.Popen([str(chroma_bin), "run", "--path", str(tmp_path / "chroma"), "--host",
                               "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/v2/heartbeat", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        server = make_server(engine="shared", config={"memory": {"chroma_url": f"http://127.0.0.1:{port}"}}).start()
        http = server.http()
        fact = http.post("/api/v1/companions/ember/memories", json={"text": "My cat is called Miso."}).json()
        found = http.get("/api/v1/companions/ember/memories/search", params={"q": "cat's name"}).json()
        assert found[0]["id"] == fact["id"]
        assert not (server.data_dir / "index").exists()  # nothing was indexed locally
        remote = chromadb.HttpClient(host="127.0.0.1", port=port)
        assert remote.get_collection("u-local--c-ember").count() == 1
    finally:
        chroma.terminate()
        chroma.wait(30)


def test_every_message_of_a_live_conversation_is_in_a_memory(server):
    key = server.add_user("talker")
    said = ["I adopted a dog named Rex yesterday.", "Also, how are you?"]
    reply = server.openai(key).chat.completions.create(
        model="ember", max_tokens=8, messages=[{"role": "user", "content": text} for text in said])
    memories = server.http(key).get("/api/v1/companions/ember/memories").json()
    assert [m["text"] for m in memories] == [
        f"User: {said[0]}\nUser: {said[1]}\nEmber: {reply.choices[0].message.content}"]
