"""SIGKILL in the middle of replies and imports: nothing acknowledged is lost, nothing
half-done stays."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
from pathlib import Path

import httpx

from tests.support.exports import chatgpt_simple, chatgpt_zip


def big_export(path: Path, conversations: int) -> Path:
    one = json.dumps(chatgpt_simple("TEMPLATE", ("user", "Do you remember the lighthouse? " * 8),
                                    ("assistant", "Of course, the one by the harbour. " * 8)))
    with path.open("w") as out:
        out.write("[")
        out.write(",".join(one.replace("TEMPLATE", f"c{i:06d}") for i in range(conversations)))
        out.write("]")
    return path


def first_event(server, path: str, body: bytes | dict, seen: threading.Event, store: list) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    try:
        with server.http() as client, client.stream(
                "POST", path, headers={"Accept": "text/event-stream"}, **kwargs) as response:
            for line in response.iter_lines():
                store.append(line)
                if line.startswith("data: "):
                    seen.set()
    except httpx.HTTPError:
        pass   # the server was killed: expected
    seen.set()


def test_sigkill_mid_reply_and_mid_import_loses_nothing_acknowledged(make_server, tmp_path):
    server = make_server(engine="shared").start()
    http = server.http()
    created = http.post("/api/v1/conversations", json={"companion": "ember"})
    conversation = created.json()["conversation"]["id"]
    done = http.post(f"/api/v1/conversations/{conversation}/messages",
                     json={"content": "My boat is called Wren.", "max_tokens": 8})
    assert done.status_code == 200
    acknowledged = [done.json()["message"]["id"], done.json()["reply"]["id"]]

    export = big_export(tmp_path / "conversations.json", 60_000).read_bytes()
    streaming, importing = threading.Event(), threading.Event()
    stream_lines, import_lines = [], []
    threads = [
        threading.Thread(target=first_event, args=(
            server, f"/api/v1/conversations/{conversation}/messages",
            {"content": "Tell me a long story about the sea.", "max_tokens": 200, "stream": True},
            streaming, stream_lines)),
        threading.Thread(target=first_event, args=(
            server, "/api/v1/companions/ember/imports", export, importing, import_lines)),
    ]
    for thread in threads:
        thread.start()
    assert streaming.wait(120) and importing.wait(120)
    # Meanwhile: one import at a time per user, and another user's import is not held up.
    small = chatgpt_zip(tmp_path / "small.zip", [chatgpt_simple(
        "s1", ("user", "I collect stamps."), ("assistant", "Which ones?"))]).read_bytes()
    second = http.post("/api/v1/companions/ember/imports", content=small)
    assert second.status_code == 409 and "of yours" in second.json()["error"]["message"]
    guests = server.http(server.add_user("guest")).post("/api/v1/companions/ember/imports", content=small)
    assert guests.status_code == 200 and guests.json()["conversations_added"] == 1, guests.text
    server.stop(signal.SIGKILL)
    for thread in threads:
        thread.join(60)
    assert not any("event: done" in line for line in import_lines), "the import should be cut short"

    again = make_server(server.data_dir, engine="shared").start()
    db = sqlite3.connect(server.data_dir / "homefire.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = db.execute("SELECT id FROM messages WHERE conversation_id = ? ORDER BY id", (conversation,))
    ids = [row[0] for row in rows]
    assert set(acknowledged) <= set(ids), "every acknowledged message is still there"
    stored = [row[0] for row in db.execute(
        "SELECT content FROM messages WHERE conversation_id = ? AND id > ? ORDER BY id",
        (conversation, acknowledged[-1]))]
    assert stored[:1] == ["Tell me a long story about the sea."], "the message under reply was committed"
    imported = db.execute("SELECT COUNT(*) FROM conversations WHERE source = 'imported' "
                          "AND user_id = 'local'").fetchone()[0]
    assert imported in (0, 60_000), "an import is all or nothing"
    assert not list((server.data_dir / "run").glob("import-*")), "no staging file is left"
    assert not list((server.data_dir / "run" / "uploads").glob("*")), "no upload is left"
    memories = again.http().get("/api/v1/companions/ember/memories", params={"limit": 5})
    assert memories.status_code == 200
    # The server answers again, and the index agrees with SQLite (start-up checks and repairs it).
    reply = again.http().post(f"/api/v1/conversations/{conversation}/messages",
                              json={"content": "What is my boat called?", "max_tokens": 8})
    assert reply.status_code == 200, reply.text
