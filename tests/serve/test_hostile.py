"""The hostile-member suite: every route of the API, found in the app's own OpenAPI schema, is
called by one member with another member's ids (companion, conversation, memory, job, adapter
version, user), and answers 404 (403 where only an admin may) with no byte of the other's data.
A route added tomorrow is in the schema, so it is called too; one with a JSON body this suite
cannot yet fill fails here until it can. Every route that takes a body is also sent one over its
limit, and answers 413 before reading it, with the server's memory bounded."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from tests.support import training
from tests.support.adapters import make_adapter

SECRET = "ALICE-ONLY"   # in every piece of Alice's data: nothing Bob is told may hold it
NAME = "Zephyrine"      # her companion's name
QUICK = training.QUICK | {"max_steps": 4}

# A body for each route that takes JSON: valid in shape, so that what is refused is the access.
BODIES = {
    ("post", "/v1/chat/completions"): {"model": "alicepet", "max_tokens": 2,
                                       "messages": [{"role": "user", "content": "hi"}]},
    ("post", "/api/v1/companions"): {"id": "bobpet", "name": "Bobpet"},
    ("put", "/api/v1/companions/{companion_id}"): {"id": "alicepet", "name": "Mine now"},
    ("post", "/api/v1/conversations"): {"companion": "alicepet"},
    ("patch", "/api/v1/conversations/{conversation_id}"): {"title": "mine now"},
    ("post", "/api/v1/conversations/{conversation_id}/messages"): {"content": "hi", "max_tokens": 2},
    ("post", "/api/v1/conversations/{conversation_id}/regenerate"): {"max_tokens": 2},
    ("put", "/api/v1/conversations/{conversation_id}/summary"): {"text": "mine now"},
    ("post", "/api/v1/companions/{companion_id}/memories"): {"text": "planted"},
    ("post", "/api/v1/companions/{companion_id}/lorebook/test"): {"text": "hi"},
    ("patch", "/api/v1/memories/{memory_id}"): {"text": "planted", "pinned": False},
    ("put", "/api/v1/companions/{companion_id}/adapter"): {"version": None},
    ("post", "/api/v1/companions/{companion_id}/finetunes"): QUICK,
    ("post", "/api/v1/companions/{companion_id}/drifts"): {"against": "base", "probes": 1},
    ("post", "/api/v1/companions/{companion_id}/migrations"): {"model": "/tmp"},
    ("post", "/api/v1/users"): {"name": "eve"},
    ("post", "/api/v1/groups"): {"id": "bobset", "name": "Mine", "companions": ["alicepet", "alicepal"]},
    ("put", "/api/v1/groups/{group_id}"): {"id": "aliceset", "name": "Mine now",
                                           "companions": ["alicepet", "alicepal"]},
}
# Uploads (raw bodies): something that is no such file, for the routes without another's id.
UPLOADS = {"/api/v1/companions/import": b"{}", "/api/v1/bundles": b"PK\x05\x06" + bytes(18)}


def routes(server) -> list[tuple[str, str, dict]]:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    return [(method, path, op) for path, ops in spec["paths"].items() for method, op in ops.items()]


@pytest.fixture(scope="module")
def alice(server, model_dir) -> dict:
    """Alice's companion, conversation, memory, adapter version with its report, and job."""
    http = server.http(server.add_user("hazel"))
    assert http.post("/api/v1/companions", json={"id": "alicepet", "name": NAME,
                                                 "description": f"{SECRET} who knows her"}).status_code == 201
    made = http.post("/api/v1/conversations", json={"companion": "alicepet"})
    conversation = made.json()["conversation"]["id"]
    sent = http.post(f"/api/v1/conversations/{conversation}/messages",
                     json={"content": f"{SECRET}: my locker code is 7431", "max_tokens": 4, "temperature": 0})
    assert sent.status_code == 200, sent.text
    assert http.post("/api/v1/companions", json={"id": "alicepal", "name": "Pal"}).status_code == 201
    group = http.post("/api/v1/groups", json={"id": "aliceset", "name": f"{SECRET} club",
                                              "companions": ["alicepet", "alicepal"]})
    assert group.status_code == 201, group.text
    memory = http.post("/api/v1/companions/alicepet/memories", json={"text": f"{SECRET}: allergic to kiwi"})
    assert memory.status_code == 201, memory.text
    folder = server.data_dir / "adapters" / "hazel.alicepet" / "v1"
    make_adapter(folder, model_dir, "hazel")
    (folder / "eval.json").write_text(json.dumps({"user": "hazel", "samples": [
        {"real": f"{SECRET} real", "base": "b", "tuned": f"{SECRET} tuned"}]}))
    job = http.post("/api/v1/companions/alicepet/finetunes", json=QUICK)
    assert job.status_code == 202, job.text
    assert http.post(f"/api/v1/finetunes/{job.json()['id']}/cancel").status_code == 200
    yield {"http": http, "companion_id": "alicepet", "conversation_id": conversation,
           "memory_id": memory.json()["id"], "job_id": job.json()["id"], "version": "v1", "name": "hazel",
           "group_id": "aliceset"}
    http.close()


@pytest.fixture(scope="module")
def bob(server) -> httpx.Client:
    with server.http(server.add_user("mallory")) as http:
        yield http


def untouched(alice: dict) -> None:
    """Everything of Alice's is as she left it."""
    http = alice["http"]
    messages = http.get(f"/api/v1/conversations/{alice['conversation_id']}").json()["messages"]
    assert len(messages) == 2 and SECRET in messages[0]["content"]
    assert http.get(f"/api/v1/memories/{alice['memory_id']}").json()["text"] == f"{SECRET}: allergic to kiwi"
    assert http.get("/api/v1/companions/alicepet").json()["name"] == NAME
    assert http.get("/api/v1/companions/alicepet/adapters").json()["versions"][0]["version"] == "v1"
    assert http.get(f"/api/v1/finetunes/{alice['job_id']}").json()["state"] == "cancelled"
    assert http.get("/api/v1/groups/aliceset").json()["companions"] == ["alicepet", "alicepal"]


def query_for(op: dict) -> dict:
    """A value for each required query parameter, of its type."""
    values = {"integer": 1, "number": 1, "boolean": "false"}
    return {p["name"]: values.get(p.get("schema", {}).get("type"), "x")
            for p in op.get("parameters", []) if p["in"] == "query" and p.get("required")}


def test_every_route_refuses_one_member_anothers_ids_and_tells_nothing_of_theirs(server, alice, bob):
    called = []
    for method, path, op in routes(server):
        params = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
        content = op.get("requestBody", {}).get("content", {})
        kwargs: dict = {"params": query_for(op)}
        if "application/json" in content:
            assert (method, path) in BODIES, f"{method.upper()} {path} is new: give it a body in BODIES"
            kwargs["json"] = BODIES[(method, path)]
        elif "application/octet-stream" in content:
            kwargs["content"] = UPLOADS.get(path, b"{}")
        url = path.format(**{name: alice[name] for name in params})
        answer = bob.request(method.upper(), url, **kwargs)
        where = f"{method.upper()} {url}: {answer.status_code} {answer.text[:300]}"
        assert SECRET not in answer.text and NAME not in answer.text, where
        assert answer.status_code < 500, where
        if params:   # the route names something of Alice's
            admins_only = path.startswith("/api/v1/users/")
            assert answer.status_code == (403 if admins_only else 404), where
        called.append((method, path))
    assert len(called) >= 45 and ("get", "/api/v1/finetunes/{job_id}") in called
    untouched(alice)


def status_of_declared(server, method: str, path: str, length: int) -> int:
    """Send headers declaring `length` bytes and only the first 64 KiB of them: a server that
    refuses by the declared length answers at once; one that reads on never answers."""
    where = urlsplit(server.url)
    with socket.create_connection((where.hostname, where.port), timeout=60) as conn:
        conn.sendall((f"{method.upper()} {path} HTTP/1.1\r\nHost: {where.netloc}\r\n"
                      f"Authorization: Bearer {server.key}\r\nContent-Type: application/octet-stream\r\n"
                      f"Content-Length: {length}\r\n\r\n").encode() + bytes(64 << 10))
        head = conn.recv(64)
    return int(head.split(b" ")[1])


def test_every_body_over_its_limit_is_a_413_before_it_is_read(server, alice, bob):
    """Declared over any limit: 413 at once. Sent chunked past the JSON limit: 413 once it passes it."""
    process = psutil.Process(server.proc.pid)
    rss = process.memory_info().rss
    with_body = [(m, p, op) for m, p, op in routes(server) if op.get("requestBody")]
    assert len(with_body) >= 15
    for method, path, op in with_body:
        url = path.format(companion_id="ember", conversation_id="0" * 32, memory_id=1, job_id="ft-0",
                          version="v1", name="mallory", group_id="x")
        assert status_of_declared(server, method, url, 1 << 40) == 413, f"{method.upper()} {url}"
        if "application/json" in op["requestBody"]["content"]:
            def chunks():
                for _ in range(3):
                    yield b" " * (1 << 20)   # 3 MiB of JSON whitespace, over limits.max_body_kb

            answer = bob.request(method.upper(), url, content=chunks(),
                                 headers={"Content-Type": "application/json"})
            assert answer.status_code == 413, f"{method.upper()} {url}: {answer.text[:200]}"
    assert process.memory_info().rss - rss < 256 << 20, "the server's memory stayed bounded"
