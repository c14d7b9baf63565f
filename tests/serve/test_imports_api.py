"""Imports through the running server: upload, progress, recall of what was imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.exports import chatgpt_simple, chatgpt_zip, claude_export, write_json

REPO = Path(__file__).resolve().parents[2]


def sse(response) -> list[tuple[str, dict]]:
    events, name = [], "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


def test_an_uploaded_export_is_imported_with_progress_and_recalled_in_replies(server, tmp_path):
    http = server.http()
    created = http.post("/api/v1/companions", json={"id": "willow", "name": "Willow"})
    assert created.status_code == 201, created.text
    talk = [("user", f"Today {thing}.") for thing in ("I walked the dog", "I baked bread", "work was long")]
    convs = [chatgpt_simple(f"old-{i}", turn, ("assistant", "Tell me more!")) for i, turn in enumerate(talk)]
    convs.append(chatgpt_simple(
        "wedding", ("user", "My brother Tomás is getting married in Kyoto next spring."),
        ("assistant", "Kyoto in spring, with the cherry blossoms! How wonderful.")))
    export = chatgpt_zip(tmp_path / "chatgpt-export.zip", convs)

    with http.stream("POST", "/api/v1/companions/willow/imports", content=export.read_bytes(),
                     params={"filename": export.name}, headers={"Accept": "text/event-stream"}) as response:
        assert response.status_code == 200
        events = sse(response)
    stages = [data["stage"] for name, data in events if name == "progress"]
    assert "read" in stages and "index" in stages
    name, done = events[-1]
    assert name == "done", events
    result = done["result"]
    assert (result["formats"], result["conversations_added"], result["messages_added"],
            result["memories_added"]) == (["chatgpt"], 4, 8, 4)

    # The same export again: nothing new (a plain JSON reply without the event stream).
    again = http.post("/api/v1/companions/willow/imports", content=export.read_bytes())
    assert again.status_code == 200, again.text
    assert (again.json()["conversations_unchanged"], again.json()["messages_added"]) == (4, 0)

    listed = http.get("/api/v1/conversations", params={"companion": "willow"}).json()
    imported = [c for c in listed if c["source"] == "imported"]
    assert sorted(c["original_id"] for c in imported) == ["old-0", "old-1", "old-2", "wedding"]

    created = http.post("/api/v1/conversations", json={"companion": "willow"})
    conversation = created.json()["conversation"]["id"]
    reply = http.post(f"/api/v1/conversations/{conversation}/messages",
                      json={"content": "Where is my brother's wedding going to be?", "max_tokens": 8})
    assert reply.status_code == 200, reply.text
    used = [m["text"] for m in reply.json()["reply"]["memories_used"]]
    assert any("Kyoto" in text for text in used), used


def test_bad_uploads_get_clear_errors_and_change_nothing(server, tmp_path):
    http = server.http()
    before = http.get("/api/v1/conversations", params={"limit": 500}).json()
    broken = b'[{"id": "x", "mapping": {}}, {"id": oops}]'
    response = http.post("/api/v1/companions/ember/imports", content=broken, params={"filename": "mine.json"})
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("mine.json (uploaded): invalid JSON near byte ")
    with http.stream("POST", "/api/v1/companions/ember/imports", content=broken,
                     headers={"Accept": "text/event-stream"}) as streamed:
        name, data = sse(streamed)[-1]
    assert name == "error" and "invalid JSON" in data["error"]["message"]
    assert http.post("/api/v1/companions/ember/imports", content=b"").status_code == 422
    unknown = http.post("/api/v1/companions/nobody/imports", content=b"[]")
    assert unknown.status_code == 404 and "nobody" in unknown.json()["error"]["message"]
    forced = http.post("/api/v1/companions/ember/imports", params={"format": "pdf"}, content=b"[]")
    assert forced.status_code == 400 and forced.json()["error"]["param"] == "query.format"
    assert http.get("/api/v1/conversations", params={"limit": 500}).json() == before
    assert not list((server.data_dir / "run" / "uploads").iterdir()), "uploads are not kept"


def test_the_cli_imports_through_the_running_server(server, tmp_path):
    export = write_json(tmp_path / "conversations.json", claude_export())
    done = subprocess.run([sys.executable, "-m", "serve.cli", "import", str(export), "--companion", "ember",
                           "--data-dir", str(server.data_dir)], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env=server.env)
    assert done.returncode == 0, done.stderr
    assert "format: claude" in done.stdout and "messages imported: 3" in done.stdout
    # The server holds the data directory's lock: the CLI went through its API.
    assert "another `homefire serve`" not in done.stderr


def test_uploads_over_the_limit_are_refused(make_server, tmp_path):
    server = make_server(engine="shared", config={"imports": {"max_upload_mb": 1}}).start()
    export = chatgpt_zip(tmp_path / "big.zip", [chatgpt_simple(f"c{i}", ("user", f"{i} " + "x" * 3000))
                                                for i in range(400)])
    response = server.http().post("/api/v1/companions/ember/imports", content=export.read_bytes())
    assert response.status_code == 200, "a compressed 1.2 MB export fits in 1 MB of zip"
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"{i} " + "y" * 3000}]})
                             for i in range(400)))
    response = server.http().post("/api/v1/companions/ember/imports", content=big.read_bytes())
    assert response.status_code == 413 and "imports.max_upload_mb" in response.json()["error"]["message"]

    def chunks():   # no Content-Length: the limit holds while the body streams in
        data = big.read_bytes()
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]

    response = server.http().post("/api/v1/companions/ember/imports", content=chunks())
    assert response.status_code == 413
    assert not list((server.data_dir / "run" / "uploads").iterdir())
