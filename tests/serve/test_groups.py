"""Group chats through the real server: several companions in one conversation, each reply in
its speaker's voice (its adapter), the reply orders, a member asked to answer, a reply made
again, the OpenAI route with a group's model, and memories that stay with who was there."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.support.adapters import make_adapter
from tests.support.exports import sillytavern_group_chat
from tests.support.server import wait_until

FOX = {"id": "fox", "name": "Fox", "description": "{{char}} is a fox who keeps notes."}
OWL = {"id": "owl", "name": "Owl", "description": "{{char}} is an owl who reads at night."}
CAT = {"id": "cat", "name": "Cat", "description": "{{char}} is a cat who naps in the sun."}
DOG = {"id": "dog", "name": "Dog", "description": "{{char}} is a dog who guards the garden."}
SHORT = {"max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def den(server) -> httpx.Client:
    """A member with four companions; fox, owl and cat are the saved group "den"."""
    http = server.http(server.add_user("gwen"))
    for card in (FOX, OWL, CAT, DOG):
        assert http.post("/api/v1/companions", json=card).status_code == 201
    made = http.post("/api/v1/groups", json={"id": "den", "name": "The den", "reply_order": "round_robin",
                                             "companions": ["fox", "owl", "cat"]})
    assert made.status_code == 201, made.text
    yield http
    http.close()


def group_chat(http: httpx.Client, order: str, companions=("fox", "owl", "cat")) -> str:
    made = http.post("/api/v1/conversations", json={"companions": list(companions), "reply_order": order})
    assert made.status_code == 201, made.text
    conversation = made.json()["conversation"]
    assert conversation["companions"] == list(companions) and conversation["reply_order"] == order
    return conversation["id"]


def say(http: httpx.Client, conversation: str, content: str | None = None, **more) -> dict:
    body = SHORT | more | ({"content": content} if content else {})
    sent = http.post(f"/api/v1/conversations/{conversation}/messages", json=body)
    assert sent.status_code == 200, sent.text
    return sent.json()


def test_each_reply_order_picks_its_speaker_and_a_named_member_answers_next(den):
    robin = group_chat(den, "round_robin")
    assert [say(den, robin, f"Tell me something, turn {i}.")["reply"]["speaker"] for i in range(4)] == [
        "fox", "owl", "cat", "fox"]

    natural = group_chat(den, "natural")
    # Named by name (any case), the first named answers; nobody named: who has not spoken longest.
    assert say(den, natural, "cat, what did you dream about?")["reply"]["speaker"] == "cat"
    assert say(den, natural, "And Owl and fox, what about you?")["reply"]["speaker"] == "owl"
    assert say(den, natural, "Lovely weather today.")["reply"]["speaker"] == "fox"
    assert say(den, natural, "What shall we cook?")["reply"]["speaker"] == "cat"

    manual = group_chat(den, "manual")
    refused = den.post(f"/api/v1/conversations/{manual}/messages", json={"content": "Hello?"} | SHORT)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "speaker_required"
    assert "fox" in refused.json()["error"]["message"]
    assert [m["role"] for m in den.get(f"/api/v1/conversations/{manual}").json()["messages"]] == [], \
        "a refused message is not stored"
    assert say(den, manual, "Hello?", speaker="Owl")["reply"]["speaker"] == "owl"

    # Asked to answer next, without a new message: the exchange has no user message.
    went_on = say(den, manual, speaker="cat")
    assert went_on["message"] is None and went_on["reply"]["speaker"] == "cat"
    # The last reply made again, by another member; it takes the old one's place.
    again = den.post(f"/api/v1/conversations/{manual}/regenerate", json=SHORT | {"speaker": "fox"})
    assert again.status_code == 200, again.text
    messages = den.get(f"/api/v1/conversations/{manual}").json()["messages"]
    assert [(m["role"], m["speaker"]) for m in messages] == [("user", None), ("assistant", "owl"),
                                                             ("assistant", "fox")]
    assert messages[-1]["id"] == again.json()["reply"]["id"]

    # Clear refusals: someone not in the group, a speaker for one companion's conversation.
    stranger = den.post(f"/api/v1/conversations/{manual}/messages", json={"content": "Hi", "speaker": "dog"})
    assert stranger.status_code == 400 and stranger.json()["error"]["code"] == "not_a_member"
    assert "fox (Fox), owl (Owl), cat (Cat)" in stranger.json()["error"]["message"]
    alone = den.post("/api/v1/conversations", json={"companion": "dog"}).json()["conversation"]["id"]
    one = den.post(f"/api/v1/conversations/{alone}/messages", json={"content": "Hi", "speaker": "dog"})
    assert one.status_code == 400 and "one companion" in one.json()["error"]["message"]
    both = den.post("/api/v1/conversations", json={"companion": "dog", "companions": ["fox", "owl"]})
    assert both.status_code == 400
    assert "one of companion, companions, group" in both.json()["error"]["message"]
    twice = den.post("/api/v1/conversations", json={"companions": ["fox", "fox"]})
    assert twice.status_code == 400 and "once" in twice.json()["error"]["message"]


def test_a_group_of_three_with_two_adapters_answers_in_each_voice(server, den, model_dir):
    for companion, version, seed in (("fox", "v1", 3), ("owl", "v2", 4)):
        folder = server.data_dir / "adapters" / f"gwen.{companion}" / version
        make_adapter(folder, model_dir, "gwen", seed=seed)
        used = den.put(f"/api/v1/companions/{companion}/adapter", json={"version": version})
        assert used.status_code == 200, used.text
    conversation = den.post("/api/v1/conversations", json={"group": "den"}).json()["conversation"]
    assert conversation["group"] == "den" and conversation["title"] == "The den"
    replies = [say(den, conversation["id"], f"Good evening, round {i}.")["reply"] for i in range(3)]
    assert [(r["speaker"], r["adapter"]) for r in replies] == [("fox", "v1"), ("owl", "v2"), ("cat", None)]

    # Two adapters in one batch: fox and owl answer at the same time, each in its own voice.
    chats = [group_chat(den, "manual") for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda pair: say(den, pair[0], "Who is there?", speaker=pair[1], max_tokens=12),
                             zip(chats, ("fox", "owl"), strict=True)))
    assert [(b["reply"]["speaker"], b["reply"]["adapter"]) for b in both] == [("fox", "v1"), ("owl", "v2")]
    for companion in ("fox", "owl"):
        assert den.put(f"/api/v1/companions/{companion}/adapter", json={"version": None}).status_code == 200


def test_memories_stay_with_the_companions_who_were_there(den):
    private = den.post("/api/v1/conversations", json={"companion": "dog"}).json()["conversation"]["id"]
    say(den, private, "My locker code is 4417.")
    wait_until(lambda: all(m["indexed"] for m in den.get("/api/v1/companions/dog/memories").json()),
               "the dog's memory is indexed")

    chat = group_chat(den, "round_robin", ("fox", "owl"))
    say(den, chat, "My sister Juniper visits on Sunday.")
    asked = say(den, chat, "What is my locker code?")["reply"]
    assert all("4417" not in m["text"] for m in asked["memories_used"] or ()), \
        "another companion's private memory reached a member's prompt"

    def memories(companion: str) -> str:
        return " ".join(m["text"] for m in den.get(f"/api/v1/companions/{companion}/memories").json())

    for member in ("fox", "owl"):   # both heard it, whoever answered
        assert "Juniper" in memories(member) and "4417" not in memories(member)
    assert "Juniper" not in memories("cat") + memories("dog")
    assert "Fox: " in memories("owl"), "a group's memory names each speaker"
    # Said again by the other member: both memories of it name who says it now.
    again = den.post(f"/api/v1/conversations/{chat}/regenerate", json=SHORT | {"speaker": "fox"})
    assert again.status_code == 200, again.text
    for member in ("fox", "owl"):
        assert f"User: What is my locker code?\nFox: {again.json()['reply']['content']}" in memories(member)
    listed = {c["id"] for c in den.get("/api/v1/conversations", params={"companion": "owl"}).json()}
    assert chat in listed and private not in listed
    assert chat not in {c["id"] for c in den.get("/api/v1/conversations", params={"companion": "dog"}).json()}


def test_the_openai_route_answers_as_a_groups_members_in_turn(server, den):
    client = server.openai(den.headers["Authorization"][7:])
    assert "group:den" in [m.id for m in client.models.list().data]
    said = [{"role": "user", "content": "Hello, everyone!"}]
    raw = client.chat.completions.with_raw_response.create(model="group:den", messages=said, **SHORT)
    first = raw.parse()
    assert raw.headers["X-Homefire-Speaker"] == "fox" and first.model == "group:den"
    # The client resends the conversation: the stored speakers are found, so the order goes on.
    said += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "Anyone else?"}]
    second = client.chat.completions.with_raw_response.create(model="group:den", messages=said, **SHORT)
    assert second.headers["X-Homefire-Speaker"] == "owl"
    conversation = second.headers["X-Homefire-Conversation"]
    assert conversation == raw.headers["X-Homefire-Conversation"], "one conversation, resent"
    asked = client.chat.completions.with_raw_response.create(model="group:den", messages=said, **SHORT,
                                                             extra_body={"speaker": "cat"})
    assert asked.headers["X-Homefire-Speaker"] == "cat"
    streamed = client.chat.completions.with_raw_response.create(model="group:den", messages=said, **SHORT,
                                                                stream=True, extra_body={"speaker": "owl"})
    assert streamed.headers["X-Homefire-Speaker"] == "owl"
    shown = "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices)
    kept = den.get(f"/api/v1/conversations/{streamed.headers['X-Homefire-Conversation']}").json()["messages"]
    assert shown == kept[-1]["content"] and kept[-1]["speaker"] == "owl", "the stream shows what is stored"
    stored = den.get(f"/api/v1/conversations/{conversation}").json()
    assert stored["conversation"]["group"] == "den"
    assert [m["speaker"] for m in stored["messages"] if m["role"] == "assistant"][:2] == ["fox", "owl"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="group:nowhere", messages=said, **SHORT)
    with pytest.raises(openai.BadRequestError, match="not in this group"):
        client.chat.completions.create(model="group:den", messages=said, **SHORT,
                                       extra_body={"speaker": "dog"})


def test_a_sillytavern_group_chat_comes_in_as_a_group_conversation(den, tmp_path):
    def bring(companion: str, characters: tuple[str, ...]) -> httpx.Response:
        chat = sillytavern_group_chat(tmp_path / f"{'-'.join(characters)}.jsonl", characters)
        return den.post(f"/api/v1/companions/{companion}/imports", params={"filename": chat.name},
                        content=chat.read_bytes())

    before = {c["id"] for c in den.get("/api/v1/conversations", params={"limit": 500}).json()}
    missing = bring("fox", ("Fox", "Badger", "Owl"))
    assert missing.status_code == 422 and "no companion of yours is called Badger" in missing.text
    elsewhere = bring("cat", ("Fox", "Owl"))
    assert elsewhere.status_code == 422 and "(cat) is not one of them" in elsewhere.text
    assert {c["id"] for c in den.get("/api/v1/conversations", params={"limit": 500}).json()} == before, \
        "nothing of a refused import is stored"

    imported = bring("fox", ("Fox", "Owl"))
    assert imported.status_code == 200, imported.text
    listed = den.get("/api/v1/conversations", params={"limit": 500}).json()
    added = [c for c in listed if c["id"] not in before]
    assert len(added) == 1 and added[0]["companions"] == ["fox", "owl"] and added[0]["source"] == "imported"
    messages = den.get(f"/api/v1/conversations/{added[0]['id']}").json()["messages"]
    assert [m["speaker"] for m in messages] == [None, "fox", "owl", None, "owl"]
    for member in ("fox", "owl"):
        texts = [m["text"] for m in den.get(f"/api/v1/companions/{member}/memories").json()]
        assert any("Juniper" in t and "Fox: We lit the lamps" in t for t in texts), texts
        assert any("Owl: I counted forty-two fireflies." in t for t in texts), texts
    assert not any("Juniper planted" in m["text"] for m in den.get("/api/v1/companions/cat/memories").json())
    assert bring("fox", ("Fox", "Owl")).json()["conversations_unchanged"] == 1, "imported once"
    # It goes on live, in its natural order: the one named answers.
    assert say(den, added[0]["id"], "Fox, and the pears?")["reply"]["speaker"] == "fox"


def test_a_bundle_carries_its_group_chats_and_names_the_companions_missing_here(server, den):
    chat = group_chat(den, "round_robin", ("fox", "owl", "cat"))
    say(den, chat, "Pack your bags, we are moving.")
    say(den, chat, "Owl, are you coming?", speaker="owl")
    bundle = den.get("/api/v1/companions/fox/bundle")
    assert bundle.status_code == 200, bundle.text

    with server.http(server.add_user("hal")) as hal:
        def bring() -> httpx.Response:
            return hal.post("/api/v1/bundles", params={"filename": "fox.homefire"}, content=bundle.content)

        refused = bring()
        assert refused.status_code in (400, 409, 422), refused.text
        assert "owl, cat" in refused.json()["error"]["message"]
        assert hal.get("/api/v1/companions/fox").status_code == 404, "nothing of a refused bundle stays"
        for card in (OWL, CAT):
            assert hal.post("/api/v1/companions", json=card).status_code == 201
        brought = bring()
        assert brought.status_code in (200, 201), brought.text
        moved = [c for c in hal.get("/api/v1/conversations", params={"limit": 500}).json() if c["companions"]]
        assert {tuple(c["companions"]) for c in moved} >= {("fox", "owl", "cat")}
        here = {c["id"]: hal.get(f"/api/v1/conversations/{c['id']}").json()["messages"] for c in moved}
        target, said = next((i, m) for i, m in here.items()
                            if len(m) > 1 and m[-2]["content"] == "Owl, are you coming?")
        assert [m["speaker"] for m in said if m["role"] == "assistant"] == ["fox", "owl"]
        # It goes on here, in its order: after owl, cat.
        assert say(hal, target, "And you?")["reply"]["speaker"] == "cat"
        assert bring().json()["conversations_added"] == 0, "the same bundle again adds nothing"
