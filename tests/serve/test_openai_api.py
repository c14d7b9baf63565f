"""The OpenAI-compatible API, spoken to by the official `openai` client over real vLLM."""

from __future__ import annotations

import logging
import time

import openai
import pytest

from serve.protocol import ChatCompletionRequest

FIRST = "Hi Ember! I adopted a cat called Biscuit today."


def stored(server, conversation_id: str) -> list[dict]:
    return server.http().get(f"/api/v1/conversations/{conversation_id}").json()["messages"]


def test_models_lists_companions(server):
    ids = [m.id for m in server.openai().models.list()]
    assert "ember" in ids


def test_reply_is_stored_with_its_metadata(server):
    raw = server.openai().chat.completions.with_raw_response.create(
        model="ember", messages=[{"role": "user", "content": FIRST}], max_tokens=24, temperature=0,
    )
    reply = raw.parse()
    text = reply.choices[0].message.content
    assert text.strip()
    assert reply.model == "ember"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    messages = stored(server, raw.headers["x-homefire-conversation"])
    assert [(m["role"], m["content"]) for m in messages] == [("user", FIRST), ("assistant", text)]
    answer = messages[1]
    assert answer["tokens"] == reply.usage.completion_tokens
    assert answer["prompt_tokens"] == reply.usage.prompt_tokens
    assert answer["sampling"]["temperature"] == 0
    assert answer["truncated"] is False


def test_stream_arrives_token_by_token_in_openai_shape(server):
    stream = server.openai().chat.completions.create(
        model="ember", messages=[{"role": "user", "content": "Tell me about the stars."}],
        max_tokens=30, temperature=0, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 5  # many chunks, not one blob
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    usage = chunks[-1].usage  # include_usage: a last chunk with no choices carries the counts
    assert chunks[-1].choices == []
    assert usage.completion_tokens == 30 if finishes == ["length"] else usage.completion_tokens < 30
    # The same request non-streamed (greedy) gives the same text.
    whole = server.openai().chat.completions.create(
        model="ember", messages=[{"role": "user", "content": "Tell me about the stars."}],
        max_tokens=30, temperature=0,
    )
    assert "".join(pieces) == whole.choices[0].message.content


def test_resent_conversation_stores_only_what_is_new(server):
    client = server.openai()
    opening = "I have a new job at the bakery on Elm Street."
    first = client.chat.completions.with_raw_response.create(
        model="ember", messages=[{"role": "user", "content": opening}], max_tokens=12)
    conversation = first.headers["x-homefire-conversation"]
    answer = first.parse().choices[0].message.content
    follow_up = [
        {"role": "system", "content": "Keep it short."},  # client system prompts are not history
        {"role": "user", "content": opening},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "What should I bake first?"},
    ]
    second = client.chat.completions.with_raw_response.create(
        model="ember", messages=follow_up, max_tokens=12)
    assert second.headers["x-homefire-conversation"] == conversation
    roles = [m["role"] for m in stored(server, conversation)]
    assert roles == ["user", "assistant", "user", "assistant"]
    # Editing an earlier turn starts a new conversation instead of rewriting the stored one.
    edited = [{"role": "user", "content": opening + " (edited)"}]
    third = client.chat.completions.with_raw_response.create(model="ember", messages=edited, max_tokens=5)
    assert third.headers["x-homefire-conversation"] != conversation
    assert len(stored(server, conversation)) == 4


def test_max_tokens_is_clamped_to_the_companion_limit(server):
    card = {"id": "terse", "name": "Terse", "sampling": {"max_tokens": 5, "temperature": 0}}
    assert server.http().post("/api/v1/companions", json=card).status_code in (201, 409)
    reply = server.openai().chat.completions.create(
        model="terse", messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=500)
    assert reply.usage.completion_tokens == 5
    assert reply.choices[0].finish_reason == "length"


def test_unknown_companion_is_404_listing_the_known_ones(server):
    with pytest.raises(openai.NotFoundError) as err:
        server.openai().chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}])
    assert "nobody" in err.value.message and "ember" in err.value.message
    assert err.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": "ember"}, "messages", "Field required"),
        ({"model": "ember", "messages": []}, "messages", "at least 1"),
        ({"model": "ember", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "robot"),
        ({"model": "ember", "messages": [{"role": "user"}]}, "messages[0].content", "Field required"),
        ({"model": "ember", "messages": [{"role": "user", "content": "hi"}], "temperature": 9},
         "temperature", "less than or equal to 2"),
        ({"model": "ember", "messages": [{"role": "user", "content": "hi"}], "top_k": -2},
         "top_k", "greater than or equal to -1"),
        ({"model": "ember", "messages": [{"role": "user", "content": "hi"}], "store": "maybe"},
         "store", "valid boolean"),
        ({"model": "ember", "messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, None,
         "no system, user or assistant message"),
        ({"model": "ember", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n", "1"),
        ({"model": "ember", "messages": [{"role": "assistant", "content": "hi"}]}, None, "role 'user'"),
    ],
)
def test_malformed_bodies_get_a_400_naming_the_field(server, body, param, words):
    before = len(server.http().get("/api/v1/conversations", params={"limit": 500}).json())
    response = server.http().post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param or param is None
    assert words in error["message"]
    if param:
        assert error["message"].startswith(param)
    assert len(server.http().get("/api/v1/conversations", params={"limit": 500}).json()) == before


def test_fields_nobody_defines_are_ignored_with_a_debug_line_each(caplog):
    caplog.set_level(logging.DEBUG, logger="serve.protocol")
    body = ChatCompletionRequest.model_validate({
        "model": "ember", "temprature": 1, "my_client_flag": {"a": 1},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}],
        "stream_options": {"include_usage": True, "chunk_size": 3}})
    assert body.messages[0].text == "hi" and body.stream_options.include_usage
    logged = [r.getMessage() for r in caplog.records]
    for name in ("temprature", "my_client_flag", "cache_control", "chunk_size"):
        assert sum(f"field {name!r}" in line for line in logged) == 1, (name, logged)
    # What OpenAI defines but companions do not use is accepted without a word.
    caplog.clear()
    ChatCompletionRequest.model_validate({"model": "ember", "messages": [{"role": "user", "content": "hi"}],
                                          "tools": [{"type": "function"}], "response_format": {"type": "x"}})
    assert caplog.records == []


def test_invalid_json_is_a_400(server):
    response = server.http().post("/v1/chat/completions", content=b'{"model": "ember",',
                                  headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def test_disconnect_mid_stream_truncates_and_stops_the_engine(server):
    # A companion with room for a long reply, so the engine is still busy when we leave.
    card = {"id": "storyteller", "name": "Storyteller", "sampling": {"max_tokens": 2000}}
    server.http().post("/api/v1/companions", json=card)
    body = {"model": "storyteller", "stream": True, "max_tokens": 2000, "temperature": 0,
            "messages": [{"role": "user", "content": "Count from 1 to 500, one number per line."}]}
    tokens = "vllm:generation_tokens_total"
    before = server.engine_metric(tokens)
    with server.http() as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            conversation = response.headers["x-homefire-conversation"]
            received = 0
            for line in response.iter_lines():
                received += line.startswith("data: ")
                if received == 8:
                    break
    time.sleep(1)
    settled = server.engine_metric(tokens)
    time.sleep(2)  # unaborted, the engine would add ~60 tokens meanwhile (~30 tokens/s here)
    assert server.engine_metric(tokens) == settled, "vLLM kept generating for a client that left"
    assert settled - before < 40
    assert server.engine_metric("vllm:num_requests_running") == 0
    deadline = time.monotonic() + 10
    while len(messages := stored(server, conversation)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    reply = messages[-1]
    assert reply["role"] == "assistant" and reply["truncated"] is True
    assert reply["finish_reason"] == "disconnected"
    assert reply["content"].startswith("The numbers are")  # what was generated is kept


def test_a_message_with_no_text_is_answered_not_a_500(server):
    # Schemathesis found it: every message empty left nothing to recall for (a 500).
    response = server.http().post("/v1/chat/completions", json={
        "model": "ember", "max_tokens": 4, "store": False, "messages": [{"role": "user", "content": ""}]})
    assert response.status_code in (200, 400), response.text
