"""What a shared server must hold against its own users: adapter paths, companion namespaces,
deletion, uploads, resends and unexpected failures. Real server, real users, real files."""

from __future__ import annotations

import json
import sqlite3
import threading

import httpx
import pytest

from tests.support.adapters import make_adapter
from tests.support.cards import V2, bomb


@pytest.fixture(scope="module")
def users(server) -> dict[str, httpx.Client]:
    clients = {name: server.http(server.add_user(name)) for name in ("kim", "lee")}
    clients["admin"] = server.http()
    return clients


def test_an_adapter_version_never_leaves_its_companions_folder(server, users, model_dir):
    kim, lee = users["kim"], users["lee"]
    assert lee.post("/api/v1/companions", json={"id": "leepet", "name": "Lee's pet"}).status_code == 201
    assert kim.post("/api/v1/companions", json={"id": "kimpet", "name": "Kim's pet"}).status_code == 201
    # Lee's adapter, trained on Lee's private history, where this Homefire keeps it (older ones
    # kept a user's companion under its bare id: both places, so the test means the same on both).
    for key in ("lee.leepet", "leepet"):
        make_adapter(server.data_dir / "adapters" / key / "v1", model_dir, "lee")
    assert kim.put("/api/v1/companions/kimpet/adapter", json={"version": None}).status_code == 200
    restarts = server.http().get("/readyz").json()["restarts"]
    current = server.data_dir / "adapters" / "kim.kimpet" / "CURRENT"
    for version in ("../leepet/v1", "../lee.leepet/v1", "../../adapters/lee.leepet/v1", "/etc",
                    "v1/../../lee.leepet/v1", "v01", "v1 ", "V1", "", "v1\n"):
        refused = kim.put("/api/v1/companions/kimpet/adapter", json={"version": version})
        assert refused.status_code == 422, (version, refused.text)
        assert "is not an adapter version" in refused.json()["error"]["message"]
    listing = kim.get("/api/v1/companions/kimpet/adapters").json()
    assert listing["current"] is None and listing["versions"] == []
    assert current.read_text() == ""
    ready = server.http().get("/readyz").json()
    assert ready["engine"] == "ready" and ready["restarts"] == restarts, "nothing was loaded or restarted"
    # The command line refuses the same, before anything is read.
    used = server.cli("adapter", "use", "kimpet", "../lee.leepet/v1")
    assert used.returncode == 2 and "is not an adapter version" in used.stderr
    resumed = server.cli("finetune", "kimpet", "--resume", "../lee.leepet/v1")
    assert resumed.returncode == 2 and "is not an adapter version" in resumed.stderr


def test_each_user_has_their_own_companion_ids(server, users):
    kim, lee, admin = users["kim"], users["lee"], users["admin"]
    # Two users may each have a private "luna", and neither learns the other's exists.
    assert kim.post("/api/v1/companions", json={"id": "luna", "name": "Kim's Luna"}).status_code == 201
    assert lee.post("/api/v1/companions", json={"id": "luna", "name": "Lee's Luna"}).status_code == 201
    again = kim.post("/api/v1/companions", json={"id": "luna", "name": "Twice"})
    assert again.status_code == 409 and "taken" in again.json()["error"]["message"]
    # Shared ids are public: nobody takes them again.
    assert lee.post("/api/v1/companions", json={"id": "ember", "name": "Mine"}).status_code == 409
    for client, name in ((kim, "Kim's Luna"), (lee, "Lee's Luna")):
        assert client.get("/api/v1/companions/luna").json()["name"] == name
        assert [c["name"] for c in client.get("/api/v1/companions").json() if c["id"] == "luna"] == [name]
        assert [m["id"] for m in client.get("/v1/models").json()["data"]].count("luna") == 1
        chat = client.post("/v1/chat/completions", json={"model": "luna", "max_tokens": 4, "messages": [
            {"role": "user", "content": f"I am {name}'s user"}]})
        assert chat.status_code == 200, chat.text
        conversation = chat.headers["x-homefire-conversation"]
        got = client.get(f"/api/v1/conversations/{conversation}").json()
        assert got["conversation"]["companion_id"] == "luna"
        assert [c["id"] for c in client.get("/api/v1/conversations", params={"companion": "luna"}).json()] \
            == [conversation]
        memories = client.get("/api/v1/companions/luna/memories").json()
        assert len(memories) == 1 and name in memories[0]["text"] and memories[0]["companion_id"] == "luna"
    # A shared companion an admin adds later does not replace a user's own for that user.
    assert admin.post("/api/v1/companions", json={"id": "luna", "name": "Shared Luna"}).status_code == 201
    assert kim.get("/api/v1/companions/luna").json()["name"] == "Kim's Luna"
    assert admin.get("/api/v1/companions/luna").json()["name"] == "Shared Luna"
    renamed = kim.put("/api/v1/companions/luna", json={"id": "luna", "name": "Kim's Luna, renamed"})
    assert renamed.status_code == 200
    assert lee.get("/api/v1/companions/luna").json()["name"] == "Lee's Luna"
    assert admin.get("/api/v1/companions/luna").json()["name"] == "Shared Luna"
    assert admin.delete("/api/v1/companions/luna").status_code == 204


def test_deleting_a_companion_takes_only_what_is_the_deleters(server, users, model_dir):
    kim, lee, admin = users["kim"], users["lee"], users["admin"]
    # Shared companions another user only has a fact with, or an adapter trained on their history.
    for name in ("fireside", "lantern"):
        assert admin.post("/api/v1/companions", json={"id": name, "name": name.title()}).status_code == 201
    fact = kim.post("/api/v1/companions/fireside/memories", json={"text": "Kim's PIN is 2288."})
    assert fact.status_code == 201
    make_adapter(server.data_dir / "adapters" / "lantern" / "v1", model_dir, "lee")
    for name, held in (("fireside", "1 memories"), ("lantern", "1 adapter versions")):
        refused = admin.delete(f"/api/v1/companions/{name}")
        assert refused.status_code == 409 and held in refused.json()["error"]["message"], refused.text
    assert kim.get("/api/v1/companions/fireside/memories").json()[0]["text"] == "Kim's PIN is 2288."
    assert (server.data_dir / "adapters" / "lantern" / "v1" / "manifest.json").exists()

    # Kim's own companion goes with everything that was only hers: rows, vectors, adapters.
    assert kim.post("/api/v1/companions", json={"id": "robin", "name": "Robin"}).status_code == 201
    assert lee.post("/api/v1/companions", json={"id": "robin", "name": "Lee's Robin"}).status_code == 201
    for client, words in ((kim, "My bike is teal."), (lee, "My kayak is orange.")):
        said = client.post("/v1/chat/completions", json={
            "model": "robin", "max_tokens": 4, "messages": [{"role": "user", "content": words}]})
        assert said.status_code == 200
    assert kim.post("/api/v1/companions/robin/memories", json={"text": "My bike is teal."}).status_code == 201
    make_adapter(server.data_dir / "adapters" / "kim.robin" / "v1", model_dir, "kim")
    assert kim.delete("/api/v1/companions/robin").status_code == 204
    assert not (server.data_dir / "adapters" / "kim.robin").exists()
    with sqlite3.connect(server.data_dir / "homefire.db") as db:
        for table in ("memories", "conversations"):
            left = db.execute(f"SELECT COUNT(*) FROM {table} WHERE companion_id = 'kim.robin'").fetchone()
            assert left[0] == 0, table
    # A new "robin" of Kim's starts with nothing of the old one's, vectors included.
    assert kim.post("/api/v1/companions", json={"id": "robin", "name": "Robin II"}).status_code == 201
    assert kim.get("/api/v1/companions/robin/memories/search", params={"q": "bike colour"}).json() == []
    assert kim.get("/api/v1/companions/robin/adapters").json()["versions"] == []
    # Lee's robin is untouched.
    assert len(lee.get("/api/v1/conversations", params={"companion": "robin"}).json()) == 1
    assert "kayak" in lee.get("/api/v1/companions/robin/memories/search", params={"q": "kayak"}).text


def test_card_uploads_are_bounded_streams_read_without_decoding_pixels(server, users):
    kim = users["kim"]

    def chunked(total: int):
        for _ in range(total // 65536):
            yield b"{" * 65536

    # No Content-Length (chunked): still cut off at the limit, with a 413.
    too_big = kim.post("/api/v1/companions/import", content=chunked(21 << 20),
                       params={"filename": "big.json"})
    assert too_big.status_code == 413 and "big.json: a card may be at most 20 MiB" in too_big.text
    # A PNG of 1.6 G pixels: the card is read from its text chunk, the picture never decoded.
    card = V2 | {"data": V2["data"] | {"name": "Bomb Proof"}}
    made = kim.post("/api/v1/companions/import", content=bomb(card), params={"filename": "bomb.png"})
    assert made.status_code == 201 and made.json()["name"] == "Bomb Proof"
    damaged = kim.post("/api/v1/companions/import", content=bomb(card)[:-20], params={"filename": "cut.png"})
    assert damaged.status_code == 400 and "cut.png: damaged PNG" in damaged.json()["error"]["message"]
    assert "Traceback" not in server.log_tail(200)


def test_two_identical_resends_at_once_store_one_user_turn(server, users):
    lee = users["lee"]
    for attempt in range(3):
        words = f"Double click number {attempt}: I adopted a cat."
        gate = threading.Barrier(4)

        statuses: list[int] = []

        def send(words=words, gate=gate, statuses=statuses) -> None:
            gate.wait()
            sent = lee.post("/v1/chat/completions", json={
                "model": "ember", "max_tokens": 4, "messages": [{"role": "user", "content": words}]})
            statuses.append(sent.status_code)

        threads = [threading.Thread(target=send) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200] * 4
        found = [c for c in lee.get("/api/v1/conversations", params={"limit": 500}).json()
                 if words in json.dumps(lee.get(f"/api/v1/conversations/{c['id']}").json())]
        assert len(found) == 1, "both resends started a conversation"
        messages = lee.get(f"/api/v1/conversations/{found[0]['id']}").json()["messages"]
        assert [m["content"] for m in messages if m["role"] == "user"] == [words]


def test_unexpected_failures_answer_in_the_apis_shape_with_a_request_id(server, users):
    import openai

    kim = users["kim"]
    # The outside world breaks: the database refuses every reply (a disk that says no).
    with sqlite3.connect(server.data_dir / "homefire.db") as db:
        db.execute("CREATE TRIGGER no_replies BEFORE INSERT ON messages WHEN NEW.role = 'assistant' "
                   "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    try:
        failed = kim.post("/v1/chat/completions", json={
            "model": "ember", "max_tokens": 4, "messages": [{"role": "user", "content": "Are you there?"}]})
        assert failed.status_code == 500 and failed.headers["content-type"] == "application/json"
        error = failed.json()["error"]
        request_id = failed.headers["x-request-id"]
        assert error["type"] == "server_error" and error["code"] == "internal_error"
        assert request_id in error["message"]
        log = server.log_tail(400)
        assert f"request {request_id}" in log and "disk says no" in log and "Traceback" in log

        stream = server.openai(kim.headers["authorization"].split()[1]).chat.completions.create(
            model="ember", stream=True, max_tokens=4, messages=[{"role": "user", "content": "Still there?"}])
        with pytest.raises(openai.APIError) as err:
            for _ in stream:
                pass
        assert "the reply failed on the server (request id req_" in str(err.value.message)
        streamed_id = str(err.value.message).split("request id ")[1].split(";")[0]
        assert f"request {streamed_id}: the stream failed" in server.log_tail(400)
    finally:
        with sqlite3.connect(server.data_dir / "homefire.db") as db:
            db.execute("DROP TRIGGER no_replies")
    recovered = kim.post("/v1/chat/completions", json={
        "model": "ember", "max_tokens": 4, "messages": [{"role": "user", "content": "And now?"}]})
    assert recovered.status_code == 200
