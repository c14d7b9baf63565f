"""What members share (the engine, the GPU's time, the write lock): one member must never take
it from the others, nor read what is another's through it. Real server, real members."""

from __future__ import annotations

import io
import json
import time
import zipfile

import httpx
import pytest

from store import adapters
from store.companions import Companion, CompanionStore
from store.db import Database
from tests.support.adapters import make_adapter, with_adapter


@pytest.fixture(scope="module")
def members(server) -> dict[str, httpx.Client]:
    clients = {name: server.http(server.add_user(name)) for name in ("mae", "ned")}
    clients["owner"] = server.http()
    return clients


def says_nothing_private(answer: httpx.Response, server) -> None:
    """No engine log line, no path of the server's, in what a member is told."""
    assert str(server.data_dir) not in answer.text and "engine.log" not in answer.text, answer.text
    assert "Traceback" not in answer.text and "/tmp/" not in answer.text, answer.text


def test_an_adapter_the_engine_could_not_load_is_refused_and_everyone_is_served(server, members, model_dir,
                                                                                tmp_path):
    ned, mae, owner = members["ned"], members["mae"], members["owner"]
    assert ned.post("/api/v1/companions", json={"id": "luna", "name": "Luna"}).status_code == 201
    exported = ned.get("/api/v1/companions/luna/bundle")
    assert exported.status_code == 200
    sha = adapters.model_sha256(model_dir)
    big = tmp_path / "v1"
    make_adapter(big, model_dir, "ned", seed=1, rank=128)   # real weights, above engine.max_lora_rank 64
    shapes = [({"r": 16, "target_modules": ["q_proj"], "peft_type": "LORA"}, b"\x07" * 40,
               "not a readable safetensors file"),
              (json.loads((big / "adapter_config.json").read_text()),
               (big / "adapter_model.safetensors").read_bytes(), "above the engine's limit")]
    starts = (server.data_dir / "run" / "engine.log").read_text().count("starting:")
    restarts = owner.get("/readyz").json()["restarts"]
    for config, weights, said in shapes:
        evil = with_adapter(exported.content, config, weights, sha)
        answer = ned.post("/api/v1/bundles", content=evil,
                          params={"as_id": "evil", "filename": "evil.homefire"})
        assert answer.status_code == 422, answer.text
        message = answer.json()["error"]["message"]
        assert message.startswith("evil.homefire!adapters/v1: adapter v1") and said in message, message
        says_nothing_private(answer, server)
        assert "evil" not in [c["id"] for c in ned.get("/api/v1/companions").json()], "nothing was written"
        # Another member is served throughout, and the engine never went down for it.
        assert server.reply("ember", 4)["content"] is not None
        with server.openai(mae.headers["Authorization"][7:]) as client:
            client.chat.completions.create(model="ember", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4)
        ready = mae.get("/readyz")
        assert ready.status_code == 200 and ready.json()["engine"] == "ready"
    assert owner.get("/readyz").json()["restarts"] == restarts
    assert (server.data_dir / "run" / "engine.log").read_text().count("starting:") == starts, \
        "the engine was never restarted for it"


def test_a_voice_reports_samples_are_only_for_the_member_whose_words_they_are(server, members, model_dir):
    """A shared companion's report: the figures for every member, the samples (real held-out
    replies and continuations of their prompts) for the one whose history it was made on."""
    mae, owner = members["mae"], members["owner"]
    folder = server.data_dir / "adapters" / "ember" / "v7"
    make_adapter(folder, model_dir, "local")
    secret = "my diary says I miss Lisbon"
    report = {"companion": "ember", "adapter": "v7", "user": "local", "held_out_examples": 1,
              "loss": {"base": 2.0, "tuned": 1.5, "in_use": None}, "perplexity": {"base": 7.4, "tuned": 4.5},
              "samples": [{"real": secret, "base": "hello", "tuned": f"{secret}, too"}]}
    (folder / "eval.json").write_text(json.dumps(report))
    try:
        theirs = owner.get("/api/v1/companions/ember/adapters/v7/report")
        assert theirs.status_code == 200 and theirs.json()["samples"][0]["real"] == secret
        seen = mae.get("/api/v1/companions/ember/adapters/v7/report")
        assert seen.status_code == 200
        assert seen.json()["perplexity"] == report["perplexity"], "the figures are everyone's"
        assert seen.json()["samples"] == [] and seen.json()["samples_withheld"] is True
        assert "Lisbon" not in seen.text
        # A report that predates the "user" field is the trainer's (the version's manifest).
        (folder / "eval.json").write_text(json.dumps({k: v for k, v in report.items() if k != "user"}))
        assert "Lisbon" not in mae.get("/api/v1/companions/ember/adapters/v7/report").text
        assert "Lisbon" in owner.get("/api/v1/companions/ember/adapters/v7/report").text
        # A report Mae ran on the owner's version holds Mae's words: hers to read, and it stays
        # out of the owner's bundle (the version itself goes).
        (folder / "eval.json").write_text(json.dumps(report | {"user": "mae"}))
        assert "Lisbon" in mae.get("/api/v1/companions/ember/adapters/v7/report").text
        assert "Lisbon" not in owner.get("/api/v1/companions/ember/adapters/v7/report").text
        exported = owner.get("/api/v1/companions/ember/bundle")
        assert exported.status_code == 200
        with zipfile.ZipFile(io.BytesIO(exported.content)) as archive:
            names = archive.namelist()
        assert "adapters/v7/adapter_model.safetensors" in names and "adapters/v7/eval.json" not in names
    finally:
        import shutil

        shutil.rmtree(folder)


def conversation_of(http: httpx.Client, conversation: str) -> list[tuple[int, str, str]]:
    messages = http.get(f"/api/v1/conversations/{conversation}").json()["messages"]
    return [(m["id"], m["role"], m["content"]) for m in messages]


def replies_cut(http: httpx.Client) -> float:
    """Replies whose client left before the end, from Homefire's own metrics."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in http.get("/metrics").text.splitlines()
               if line.startswith("homefire_replies_total{") and 'outcome="disconnected"' in line)


def memories(http: httpx.Client) -> dict[int, dict]:
    return {m["id"]: m for m in http.get("/api/v1/companions/ember/memories").json()}


def test_a_regenerate_that_does_not_finish_changes_nothing_and_one_that_does_keeps_the_members_choices(
        members):
    mae = members["mae"]
    conversation = mae.post("/api/v1/conversations", json={"companion": "ember"}).json()["conversation"]["id"]
    sent = mae.post(f"/api/v1/conversations/{conversation}/messages",
                    json={"content": "My cat is called Pim.", "max_tokens": 12, "temperature": 0})
    assert sent.status_code == 200, sent.text
    before = conversation_of(mae, conversation)

    # Stopped after its first words: the conversation is exactly as it was, and can be made again.
    left = replies_cut(mae)
    with mae.stream("POST", f"/api/v1/conversations/{conversation}/regenerate",
                    json={"stream": True, "max_tokens": 200, "temperature": 1.0}) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: delta"):
                break
    while replies_cut(mae) == left:   # the server has seen the client leave and ended the reply
        time.sleep(0.05)
    assert conversation_of(mae, conversation) == before
    # The old reply's memory: pinned, and its words edited by Mae.
    reply = before[-1]
    remembered = next(m for m in memories(mae).values() if m["text"].endswith(reply[2]))
    edited = remembered["text"].replace("My cat is called Pim.", "My cat is called Pim, a tabby.")
    changed = mae.patch(f"/api/v1/memories/{remembered['id']}", json={"text": edited, "pinned": True})
    assert changed.status_code == 200, changed.text
    made = mae.post(f"/api/v1/conversations/{conversation}/regenerate", json={"max_tokens": 12})
    assert made.status_code == 200, made.text
    after = conversation_of(mae, conversation)
    new_id = made.json()["reply"]["id"]
    assert [m[:2] for m in after] == [m[:2] for m in before][:-1] + [(new_id, "assistant")]
    kept = memories(mae)[remembered["id"]]
    assert kept["pinned"], "the pin carried over"
    assert kept["text"].startswith(edited[:-len(reply[2])]), "the member's edit carried over"
    assert kept["text"].endswith(made.json()["reply"]["content"]), "it holds the new reply's words"

    # A memory the member deleted stays deleted when the reply is made again.
    assert mae.delete(f"/api/v1/memories/{remembered['id']}").status_code == 204
    count = len(memories(mae))
    again = mae.post(f"/api/v1/conversations/{conversation}/regenerate", json={"max_tokens": 12})
    assert again.status_code == 200, again.text
    assert len(memories(mae)) == count
    assert not any(m["text"].endswith(again.json()["reply"]["content"]) for m in memories(mae).values())


def test_only_the_owner_changes_the_owners_key(server, members):
    second = server.http(server.add_user("nora", admin=True))
    for what in ("rotate", "revoke"):
        answer = second.post(f"/api/v1/users/local/{what}")
        assert answer.status_code == 403, answer.text
        assert f"homefire user {what} local" in answer.json()["error"]["message"]
    assert members["owner"].get("/api/v1/me").status_code == 200, "the owner's key still works"
    server.add_user("olga")
    assert second.post("/api/v1/users/olga/rotate").status_code == 200, "other members' keys are an admin's"


def test_the_engine_starts_without_an_adapter_it_cannot_load_and_the_owner_is_told(make_server, model_dir,
                                                                                  tmp_path):
    """CURRENT names an adapter that would keep vLLM from starting: the server starts, the
    companion speaks through the base model, its listing says why; another speaks through its own."""
    data = tmp_path / "data"
    db = Database(data / "homefire.db")
    store = CompanionStore(db)
    for name in ("kit", "twin"):
        store.put(Companion(id=name, name=name.title()), "api")
    db.close()
    bad, good = data / "adapters" / "kit" / "v1", data / "adapters" / "twin" / "v1"
    make_adapter(bad, model_dir, "local")
    (bad / "adapter_model.safetensors").write_bytes(b"\x07" * 40)
    make_adapter(good, model_dir, "local", seed=5)
    adapters.set_current(data, "kit", "v1")
    adapters.set_current(data, "twin", "v1")
    server = make_server(data).start()
    http = server.http()
    listing = http.get("/api/v1/companions/kit/adapters").json()
    assert listing["current"] is None
    assert "not a readable safetensors file" in listing["problem"] and str(data) not in listing["problem"]
    assert server.reply("kit", 6)["adapter"] is None
    assert server.reply("twin", 6)["adapter"] == "v1", "a good adapter is loaded at start, at run time"
    assert "--lora-modules" not in (data / "run" / "engine.log").read_text(), \
        "adapters reach vLLM through its runtime API, never its command line"
