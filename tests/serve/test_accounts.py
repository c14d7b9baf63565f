"""Accounts and isolation: keys, the id matrix, shared companions, recall that stays private."""

from __future__ import annotations

import json
import socket

import httpx

from store.db import Database
from tests.support.exports import chatgpt_simple, chatgpt_zip


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_route_but_healthz_needs_a_valid_key(make_server):
    # An engine URL where nothing listens: the API answers while the engine stays unready.
    server = make_server(config={"engine": {"url": f"http://127.0.0.1:{closed_port()}"}},
                         env={"HOMEFIRE_API_KEY": "s3cret-key"}).start(ready=False)
    revoked = server.add_user("gone")
    assert server.cli("user", "revoke", "gone").returncode == 0
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        paths = server.http().get("/openapi.json").json()["paths"] | {"/metrics": {"get": {}}}
        for path, operations in paths.items():
            if path == "/healthz":
                continue
            for method in operations:
                url = path.replace("{conversation_id}", "x").replace("{companion_id}", "ember") \
                    .replace("{memory_id}", "1")
                for key in (None, "wrong", revoked):
                    headers = {"Authorization": f"Bearer {key}"} if key else {}
                    response = anonymous.request(method, url, headers=headers, json={})
                    assert response.status_code == 401, (method, path, key, response.text)
                    assert response.json()["error"]["type"] == "authentication_error"
    with server.http() as keyed:
        assert keyed.get("/api/v1/companions").status_code == 200
        assert [m["id"] for m in keyed.get("/v1/models").json()["data"]] == ["ember", "homefire-utility"]
        unready = keyed.get("/readyz")
        assert unready.status_code == 503 and unready.json()["engine"] == "starting"
        busy = keyed.post("/v1/chat/completions",
                          json={"model": "ember", "messages": [{"role": "user", "content": "hi"}]})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "5"


def test_user_commands_keep_only_hashes_and_keys_work_at_once(make_server):
    server = make_server(config={"engine": {"url": f"http://127.0.0.1:{closed_port()}"}}).start(ready=False)
    key = server.add_user("amy")
    assert key.startswith("hf-") and len(key) > 40
    again = server.cli("user", "add", "amy")
    assert again.returncode == 2 and "a user named 'amy' exists" in again.stderr
    bad = server.cli("user", "add", "Amy Smith")
    assert bad.returncode == 2 and "user name 'Amy Smith'" in bad.stderr
    listed = server.cli("user", "list").stdout
    assert "local" in listed and "admin" in listed and "amy" in listed
    assert key not in (server.data_dir / "homefire.db").read_bytes().decode(errors="replace")
    stored = Database(server.data_dir / "homefire.db").query("SELECT key_hash FROM users WHERE name = 'amy'")
    assert len(stored[0]["key_hash"]) == 64
    assert server.http(key).get("/v1/models").status_code == 200

    new_key = json.loads(server.cli("user", "rotate", "amy", "--json").stdout)["api_key"]
    assert server.http(key).get("/v1/models").status_code == 401
    assert server.http(new_key).get("/v1/models").status_code == 200
    assert server.cli("user", "revoke", "amy").returncode == 0
    assert server.http(new_key).get("/v1/models").status_code == 401
    assert "revoked" in server.cli("user", "list").stdout
    refused = server.cli("user", "revoke", "local")
    assert refused.returncode == 2 and "rotate" in refused.stderr
    # What companions call a user: set at creation or later, checked, listed.
    assert server.cli("user", "add", "bea", "--display-name", "  Bea  Lund ").returncode == 0
    assert server.cli("user", "display-name", "local", "Sam").returncode == 0
    listed = server.cli("user", "list").stdout
    assert "called 'Bea Lund'" in listed and "called 'Sam'" in listed and "called 'User'" in listed
    for bad in ("Ann: says hi", "{{char}}", "two\nlines", ""):
        refused = server.cli("user", "display-name", "bea", bad)
        assert refused.returncode == 2 and "display name" in refused.stderr, (bad, refused.stderr)
    assert "no user named 'nobody'" in server.cli("user", "display-name", "nobody", "X").stderr
    # The local key file is what `homefire user key` prints and what the CLI sends.
    assert server.cli("user", "key").stdout.strip() == server.key
    assert (server.data_dir / "api_key").stat().st_mode & 0o077 == 0

    # The same over the API, for admins (the web app's Accounts page).
    admin = server.http()
    made = admin.post("/api/v1/users", json={"name": "cy", "display_name": "Cy"})
    assert made.status_code == 201, made.text
    cy = made.json()["api_key"]
    assert cy.startswith("hf-") and cy.encode() not in (server.data_dir / "homefire.db").read_bytes()
    me = server.http(cy).get("/api/v1/me").json()
    assert (me["name"], me["admin"], me["display_name"]) == ("cy", False, "Cy")
    assert server.http(cy).get("/api/v1/users").status_code == 403
    assert server.http(cy).post("/api/v1/users", json={"name": "eve"}).status_code == 403
    assert admin.post("/api/v1/users", json={"name": "cy"}).status_code == 409
    bad = admin.post("/api/v1/users", json={"name": "Cy Young"})
    assert bad.status_code == 422 and "user name 'Cy Young'" in bad.json()["error"]["message"]
    assert {u["name"] for u in admin.get("/api/v1/users").json()} >= {"local", "amy", "bea", "cy"}
    rotated = admin.post("/api/v1/users/cy/rotate").json()["api_key"]
    assert server.http(cy).get("/api/v1/me").status_code == 401
    assert server.http(rotated).get("/api/v1/me").status_code == 200
    revoked = admin.post("/api/v1/users/cy/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    assert server.http(rotated).get("/api/v1/me").status_code == 401
    yourself = admin.post("/api/v1/users/local/rotate")
    assert yourself.status_code == 409 and "your own key" in yourself.json()["error"]["message"]
    assert admin.post("/api/v1/users/nobody/revoke").status_code == 404


def not_found(response: httpx.Response) -> tuple:
    body = response.json()["error"]
    return response.status_code, body["type"], body["code"]


def test_another_users_ids_get_the_same_404_and_their_data_never_shows(server, tmp_path):
    alice, bob = server.add_user("alice"), server.add_user("bob")
    a, b, owner = server.http(alice), server.http(bob), server.http()

    # Alice's data: a private companion, a conversation with a reply, a fact, an import.
    assert a.post("/api/v1/companions", json={"id": "alices-muse", "name": "Muse"}).status_code == 201
    conversation = a.post("/api/v1/conversations", json={"companion": "ember"}).json()["conversation"]["id"]
    said = a.post(f"/api/v1/conversations/{conversation}/messages",
                  json={"content": "My locker code at the gym is 4471.", "max_tokens": 8})
    assert said.status_code == 200, said.text
    fact = a.post("/api/v1/companions/ember/memories",
                  json={"text": "Alice's passport number is X9981.", "pinned": True}).json()
    export = chatgpt_zip(tmp_path / "alice.zip", [chatgpt_simple(
        "alice-1", ("user", "My sister Ines lives in Porto."), ("assistant", "Porto is lovely!"))])
    imported = a.post("/api/v1/companions/ember/imports", content=export.read_bytes())
    assert imported.status_code == 200 and imported.json()["conversations_added"] == 1

    # Every route that takes an id: Alice's real id gives Bob what a made-up id gives him.
    checks = [
        ("GET", "/api/v1/conversations/{}", conversation, "0" * 32, None),
        ("DELETE", "/api/v1/conversations/{}", conversation, "0" * 32, None),
        ("POST", "/api/v1/conversations/{}/messages", conversation, "0" * 32, {"content": "hi"}),
        ("GET", "/api/v1/memories/{}", fact["id"], 999999, None),
        ("PATCH", "/api/v1/memories/{}", fact["id"], 999999, {"pinned": False}),
        ("DELETE", "/api/v1/memories/{}", fact["id"], 999999, None),
        ("GET", "/api/v1/companions/{}", "alices-muse", "no-such-one", None),
        ("PUT", "/api/v1/companions/{}", "alices-muse", "no-such-one", None),
        ("DELETE", "/api/v1/companions/{}", "alices-muse", "no-such-one", None),
        ("GET", "/api/v1/companions/{}/memories", "alices-muse", "no-such-one", None),
        ("GET", "/api/v1/companions/{}/memories/search?q=code", "alices-muse", "no-such-one", None),
        ("POST", "/api/v1/companions/{}/memories", "alices-muse", "no-such-one", {"text": "x"}),
        ("POST", "/api/v1/companions/{}/imports", "alices-muse", "no-such-one", None),
        ("GET", "/api/v1/companions/{}/adapters", "alices-muse", "no-such-one", None),
        ("PUT", "/api/v1/companions/{}/adapter", "alices-muse", "no-such-one", {"version": None}),
    ]
    for method, template, real, made_up, body in checks:
        for client in (b, owner):   # an admin may not read Alice's data either
            def call(ident, client=client, method=method, template=template, body=body):
                path = template.format(ident)
                if method == "PUT" and "/companions/" in path and path.count("/") == 4:
                    body = {"id": str(ident), "name": "Taken"}
                if path.endswith("/imports"):
                    return client.request(method, path, content=export.read_bytes())
                return client.request(method, path, json=body)
            theirs, nobodys = call(real), call(made_up)
            assert theirs.status_code == 404, (method, template, theirs.text)
            assert not_found(theirs) == not_found(nobodys), (method, template)
            assert theirs.json()["error"]["message"].replace(str(real), "ID") == \
                nobodys.json()["error"]["message"].replace(str(made_up), "ID"), (method, template)
    chat = b.post("/v1/chat/completions", json={"model": "alices-muse", "max_tokens": 4,
                                                 "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 404 and "alices-muse" not in chat.json()["error"]["message"].split(";")[1]

    # Nothing of Alice's in Bob's listings, searches or recalled memories.
    secrets = ("4471", "X9981", "Porto")
    bob_sees = [b.get("/api/v1/conversations", params={"limit": 500}).text,
                b.get("/api/v1/companions").text, b.get("/v1/models").text,
                b.get("/api/v1/companions/ember/memories", params={"limit": 500}).text]
    for q in ("gym locker code", "passport number", "where does my sister live"):
        bob_sees.append(b.get("/api/v1/companions/ember/memories/search", params={"q": q, "k": 100}).text)
    bobs = b.post("/api/v1/conversations", json={"companion": "ember"}).json()["conversation"]["id"]
    for q in ("What is my gym locker code?", "What is my passport number?", "Where does my sister live?"):
        reply = b.post(f"/api/v1/conversations/{bobs}/messages", json={"content": q, "max_tokens": 4})
        assert reply.status_code == 200
        bob_sees.append(str(reply.json()["reply"]["memories_used"]))
        via_openai = server.openai(bob).chat.completions.create(
            model="ember", messages=[{"role": "user", "content": q}], max_tokens=4)
        bob_sees.append(via_openai.model_dump_json())
    assert not [s for s in secrets for seen in bob_sees if s in seen]
    assert "alices-muse" not in b.get("/v1/models").text

    # Alice still has all of it, and recalls her own memory.
    assert a.get(f"/api/v1/conversations/{conversation}").status_code == 200
    assert a.get(f"/api/v1/memories/{fact['id']}").json()["text"] == fact["text"]
    found = a.get("/api/v1/companions/ember/memories/search", params={"q": "passport number"}).json()
    assert found[0]["id"] == fact["id"]


def test_shared_companions_are_managed_by_admins_and_each_users_history_is_their_own(server):
    carol, dave = server.add_user("carol"), server.add_user("dave")
    assert server.cli("user", "display-name", "carol", "Carol Ann").returncode == 0
    admin = server.http(server.add_user("ops", admin=True))
    c, d = server.http(carol), server.http(dave)
    hearth = {"id": "hearth", "name": "Hearth", "first_mes": "Hello {{user}}!"}
    assert admin.post("/api/v1/companions", json=hearth).status_code == 201
    assert "hearth" in c.get("/v1/models").text and "hearth" in d.get("/v1/models").text
    refused = c.put("/api/v1/companions/hearth", json={"id": "hearth", "name": "Mine now"})
    assert refused.status_code == 403 and "only an admin" in refused.json()["error"]["message"]
    assert c.put("/api/v1/companions/hearth/adapter", json={"version": None}).status_code == 403

    for client, words in ((c, "Carol likes rowing."), (d, "Dave keeps bees.")):
        conversation = client.post("/api/v1/conversations", json={"companion": "hearth"}).json()
        sent = client.post(f"/api/v1/conversations/{conversation['conversation']['id']}/messages",
                           json={"content": words, "max_tokens": 4})
        assert sent.status_code == 200
    carols = c.get("/api/v1/conversations", params={"companion": "hearth"}).json()
    daves = d.get("/api/v1/conversations", params={"companion": "hearth"}).json()
    assert len(carols) == len(daves) == 1 and carols[0]["id"] != daves[0]["id"]
    mine = c.get(f"/api/v1/conversations/{carols[0]['id']}").json()["messages"]
    assert [m["content"] for m in mine if m["role"] == "user"] == ["Carol likes rowing."]
    # Each is called by their own name: in the greeting, and in what their memories say.
    assert mine[0]["content"] == "Hello Carol Ann!"
    assert d.get(f"/api/v1/conversations/{daves[0]['id']}").json()["messages"][0]["content"] == "Hello User!"
    memory = c.get("/api/v1/companions/hearth/memories").json()[0]["text"]
    assert memory.startswith("Carol Ann: Carol likes rowing.\nHearth: "), memory

    deleting = admin.delete("/api/v1/companions/hearth")
    assert deleting.status_code == 409 and "other users' 2 conversations, 2 memories" in \
        deleting.json()["error"]["message"]
    # A user's own companion is theirs to change and nobody else's to see.
    assert c.post("/api/v1/companions", json={"id": "carols-own", "name": "Own"}).status_code == 201
    renamed = c.put("/api/v1/companions/carols-own", json={"id": "carols-own", "name": "Renamed"})
    assert renamed.status_code == 200
    assert d.get("/api/v1/companions/carols-own").status_code == 404
    assert admin.get("/api/v1/companions/carols-own").status_code == 404
