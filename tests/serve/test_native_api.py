"""The native API: companions, conversations kept by the server, health and metrics."""

from __future__ import annotations

import io
import json

from PIL import Image

from tests.support.cards import SERAPHINA_WORLD, png_with_chara, sillytavern_card, v3_card_with_decorators
from tests.support.exports import card_png


def test_companion_crud(server):
    http = server.http()
    card = {"id": "juniper", "name": "Juniper", "personality": "dry wit",
            "sampling": {"temperature": 0.5, "max_tokens": 64}}
    assert http.post("/api/v1/companions", json=card).status_code == 201
    assert http.post("/api/v1/companions", json=card).status_code == 409
    assert http.get("/api/v1/companions/juniper").json()["personality"] == "dry wit"
    card["personality"] = "warm wit"
    assert http.put("/api/v1/companions/juniper", json=card).json()["personality"] == "warm wit"
    mismatch = http.put("/api/v1/companions/juniper", json=card | {"id": "other"})
    assert mismatch.status_code == 400 and "differs" in mismatch.json()["error"]["message"]
    bad = http.post("/api/v1/companions", json={"id": "Bad Id!", "name": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "id"
    assert http.delete("/api/v1/companions/juniper").status_code == 204
    missing = http.get("/api/v1/companions/juniper")
    assert missing.status_code == 404 and "ember" in missing.json()["error"]["message"]


def test_companions_from_config_files_are_read_only(server):
    response = server.http().delete("/api/v1/companions/ember")
    assert response.status_code == 409
    assert "ember.yaml" in response.json()["error"]["message"]


def test_import_png_card_then_talk_to_it(server):
    card = {"spec": "chara_card_v2", "spec_version": "2.0",
            "data": {"name": "Captain Nova", "description": "{{char}} pilots a starship.",
                     "first_mes": "Welcome aboard, {{user}}!", "personality": "bold"}}
    http = server.http()
    response = http.post("/api/v1/companions/import", content=card_png(card),
                         params={"filename": "nova.png"})
    assert response.status_code == 201, response.text
    assert response.json()["id"] == "captain-nova"
    assert "captain-nova" in [m.id for m in server.openai().models.list()]
    again = http.post("/api/v1/companions/import", content=card_png(card), params={"filename": "nova.png"})
    assert again.status_code == 409
    broken = http.post("/api/v1/companions/import", content=b"\x89PNG\r\n\x1a\nnot really",
                       params={"filename": "broken.png"})
    assert broken.status_code == 400 and "broken.png" in broken.json()["error"]["message"]
    conversation = http.post("/api/v1/conversations", json={"companion": "captain-nova"}).json()
    assert conversation["messages"][0]["content"] == "Welcome aboard, User!"

    # The card's picture is kept, drawn again by Pillow: pixels only, none of the card's text.
    picture = http.get("/api/v1/companions/captain-nova/picture")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(picture.content)).size == (4, 4)
    assert b"chara" not in picture.content and b"starship" not in picture.content
    assert http.get("/api/v1/companions/ember/picture").status_code == 404
    assert http.delete("/api/v1/companions/captain-nova").status_code == 204
    assert not (server.data_dir / "pictures" / "captain-nova.png").exists()


def test_conversation_kept_by_the_server(server):
    http = server.http()
    created = http.post("/api/v1/conversations", json={"companion": "ember", "title": "evening"})
    assert created.status_code == 201
    conversation = created.json()["conversation"]
    greeting = created.json()["messages"]
    assert greeting[0]["role"] == "assistant" and "day" in greeting[0]["content"]
    url = f"/api/v1/conversations/{conversation['id']}/messages"
    exchange = http.post(url, json={"content": "I went swimming.", "max_tokens": 16}).json()
    assert exchange["message"]["content"] == "I went swimming."
    assert exchange["reply"]["role"] == "assistant" and exchange["reply"]["content"]

    events = []
    with http.stream("POST", url, json={"content": "It was cold!", "stream": True, "max_tokens": 16}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    deltas = "".join(data["content"] for name, data in events if name == "delta")
    assert events[-1][0] == "done"
    assert events[-1][1]["reply"]["content"] == deltas

    full = http.get(f"/api/v1/conversations/{conversation['id']}").json()
    assert [m["content"] for m in full["messages"]][1:] == [
        "I went swimming.", exchange["reply"]["content"], "It was cold!", deltas]
    listed = http.get("/api/v1/conversations", params={"companion": "ember", "limit": 500}).json()
    assert conversation["id"] in [c["id"] for c in listed]
    assert http.delete(f"/api/v1/conversations/{conversation['id']}").status_code == 204
    assert http.get(f"/api/v1/conversations/{conversation['id']}").status_code == 404
    assert http.post(url, json={"content": "hello?"}).status_code == 404


def test_health_readiness_metrics_and_schema(server):
    http = server.http()
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz").json()
    assert ready["ready"] is True and ready["engine"] == "ready"
    metrics = http.get("/metrics").text
    assert "homefire_engine_ready 1.0" in metrics
    assert "homefire_replies_total" in metrics
    schema = http.get("/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
    assert "/api/v1/conversations/{conversation_id}/messages" in schema["paths"]


def test_regenerate_replaces_the_last_reply_and_its_memory(server):
    http = server.http()
    created = http.post("/api/v1/conversations", json={"companion": "ember"}).json()
    conversation = created["conversation"]["id"]
    refused = http.post(f"/api/v1/conversations/{conversation}/regenerate", json={})
    assert refused.status_code == 409 and "last message" in refused.json()["error"]["message"]
    first = http.post(f"/api/v1/conversations/{conversation}/messages",
                      json={"content": "I planted tomatoes today.", "max_tokens": 8}).json()
    again = http.post(f"/api/v1/conversations/{conversation}/regenerate",
                      json={"max_tokens": 12, "temperature": 1.0})
    assert again.status_code == 200, again.text
    assert again.json()["message"]["id"] == first["message"]["id"]
    reply = again.json()["reply"]
    assert reply["id"] != first["reply"]["id"] and reply["content"]
    said = http.get(f"/api/v1/conversations/{conversation}").json()["messages"]
    assert [m["id"] for m in said][1:] == [first["message"]["id"], reply["id"]]
    memories = [m for m in http.get("/api/v1/companions/ember/memories", params={"limit": 500}).json()
                if m["conversation_id"] == conversation]
    assert len(memories) == 1, memories
    assert memories[0]["text"].endswith(reply["content"]) and "tomatoes" in memories[0]["text"]

    renamed = http.patch(f"/api/v1/conversations/{conversation}", json={"title": "  Tomatoes "})
    assert renamed.status_code == 200 and renamed.json()["title"] == "Tomatoes"
    too_long = http.patch(f"/api/v1/conversations/{conversation}", json={"title": "x" * 201})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "title"
    other = server.add_user("rosa")
    assert server.http(other).patch(f"/api/v1/conversations/{conversation}",
                                    json={"title": "mine"}).status_code == 404
    assert server.http(other).post(f"/api/v1/conversations/{conversation}/regenerate",
                                   json={}).status_code == 404


def test_a_sillytavern_cards_world_reaches_the_prompt_and_each_reply_names_what_it_used(server):
    http = server.http()
    card = sillytavern_card("Seraphina", "Eldoria", SERAPHINA_WORLD)
    imported = http.post("/api/v1/companions/import", content=png_with_chara(card),
                         params={"filename": "Seraphina.png"})
    assert imported.status_code == 201, imported.text
    exported = http.get("/api/v1/companions/seraphina/card", params={"format": "json"}).json()
    assert exported["data"]["character_book"] == card["data"]["character_book"]

    # Which entries a message sets off, asked before talking (and for an edit not yet saved).
    probe = http.post("/api/v1/companions/seraphina/lorebook/test", json={"text": "Is this Eldoria?"}).json()
    assert [(f["entry"], f["where"]) for f in probe["fired"]] == [("2", "persona"),
                                                                  ("0", "before the message")]
    assert probe["fired"][0]["text"] == "Seraphina never lies to User." and probe["unsupported"] == []
    book = http.get("/api/v1/companions/seraphina").json()["character_book"]
    book["entries"][0]["enabled"] = False
    unsaved = http.post("/api/v1/companions/seraphina/lorebook/test", json={"text": "Eldoria?", "book": book})
    assert [f["entry"] for f in unsaved.json()["fired"]] == ["2"]

    conversation = http.post("/api/v1/conversations", json={"companion": "seraphina"}).json()["conversation"]
    url = f"/api/v1/conversations/{conversation['id']}/messages"
    first = http.post(url, json={"content": "Tell me about the forest.", "max_tokens": 4}).json()["reply"]
    assert [(u["entry"], u["why"]) for u in first["lore_used"]] == [("2", "constant"), ("0", "key 'forest'")]
    second = http.post(url, json={"content": "And your amulet?", "max_tokens": 4}).json()["reply"]
    # The two newest messages are scanned: the amulet's entry now, the forest's only if the reply named it.
    assert {"2", "1"} <= {u["entry"] for u in second["lore_used"]} <= {"2", "1", "0"}
    kept = http.get(f"/api/v1/conversations/{conversation['id']}").json()["messages"]
    assert kept[-1]["lore_used"] == second["lore_used"] and kept[-3]["lore_used"] == first["lore_used"]

    # A V3 card's decorators that Homefire does not act on are kept and listed by the CLI.
    maris = http.post("/api/v1/companions/import", content=json.dumps(v3_card_with_decorators()).encode(),
                      params={"filename": "maris.json"})
    assert maris.status_code == 201, maris.text
    shown = server.cli("companion", "show", "maris")
    assert json.loads(shown.stdout)["character_book"] == v3_card_with_decorators()["data"]["character_book"]
    assert "lorebook 'Harbour': 3 entries, 3 enabled" in shown.stderr
    assert "storms: @@risu_weather rain" in shown.stderr and "lighthouse: @@is_greeting 1" in shown.stderr
    for companion in ("seraphina", "maris"):
        assert http.delete(f"/api/v1/companions/{companion}").status_code == 204
