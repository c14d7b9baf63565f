"""The front ends people already use, replayed against a real server: Open WebUI 0.12.4's
exact requests, SillyTavern 1.12.6's chat body and a quiet prompt, and the `openai` SDK with
every optional field. Afterwards the companion's history, memories and training data hold
exactly what the person and the companion said."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import httpx
import openai
import pytest
from openai.resources.chat.completions import Completions

from finetune.dataset import load_history
from serve.protocol import ChatCompletionRequest
from store.db import Database

HERE = Path(__file__).parent
REPO = HERE.parents[1]
# Every request Open WebUI 0.12.4 sent to an upstream (see the README beside the capture in
# the project's shared/clients): model list, two API chats, then a browser chat with its tasks.
OPEN_WEBUI = [json.loads(line) for line in (HERE / "open-webui-0.12.4-requests.jsonl").open()]
GREETING = "Hey, you're here! How was your day?"


def history_of(server, user: str) -> list[list[tuple[str, str]]]:
    """The user's conversations with ember as (role, text) lists, oldest first, from SQLite."""
    db = Database(server.data_dir / "homefire.db")
    try:
        stored = load_history(db, "ember", user)
        return [[(m["role"], m["content"]) for m in messages] for _, messages in stored]
    finally:
        db.close()


def memories_of(client: httpx.Client) -> list[str]:
    return [m["text"] for m in client.get("/api/v1/companions/ember/memories",
                                          params={"limit": 100}).json()]


def replay(client: httpx.Client, request: dict) -> httpx.Response:
    """Send one captured request as the client sent it (its headers but ours for the key)."""
    headers = {k: v for k, v in request["headers"].items() if k.lower() != "accept-encoding"}
    answer = client.request(request["method"], request["path"], json=request["body"], headers=headers)
    assert answer.status_code == 200, (request["body"] and request["body"].get("messages"), answer.text)
    if request["body"] and request["body"].get("stream"):
        assert answer.text.rstrip().endswith("data: [DONE]"), answer.text[-300:]
        assert '"error"' not in answer.text
    return answer


def test_open_webui_browser_chat_and_its_tasks(server):
    key = server.add_user("owui")
    client = server.http(key)
    answers = [replay(client, request) for request in OPEN_WEBUI]

    chats, tasks = [], []
    for request, answer in zip(OPEN_WEBUI, answers, strict=True):
        if request["method"] == "GET":
            assert "ember" in [m["id"] for m in answer.json()["data"]]
            continue
        asked = request["body"]["messages"][-1]["content"]
        (tasks if asked.startswith("### Task:") else chats).append(answer)
    assert len(chats) == 3 and len(tasks) == 3, "two API chats and the browser chat; title, follow-ups, tags"
    browser_chat = OPEN_WEBUI[5]["body"]
    assert len(browser_chat["tools"]) == 36, "the capture is the one with Open WebUI's tools"
    for answer in chats:
        assert answer.headers.get("X-Homefire-Conversation") and "X-Homefire-Task" not in answer.headers
    for answer in tasks:
        assert answer.headers["X-Homefire-Task"] == "open-webui"
        assert answer.headers["X-Homefire-Stored"] == "false"
        assert answer.json()["choices"][0]["message"]["content"], "the task is answered"

    asked = "Reply with one short sentence: what is 2+2?"
    stored = history_of(server, "owui")
    assert len(stored) == 3
    assert all([role for role, _ in conv] == ["user", "assistant"] and conv[0][1] == asked for conv in stored)
    memories = memories_of(client)
    assert len(memories) == 3 and all(asked in m for m in memories)
    everything = json.dumps([stored, memories])
    assert "### Task" not in everything and "concise title" not in everything


def sillytavern_body(messages: list[dict], stream: bool) -> dict:
    """What SillyTavern 1.12.6 sends to a Custom (OpenAI-compatible) source with its default
    preset: the fields its server passes on (src/endpoints/backends/chat-completions.js)."""
    return {"messages": messages, "model": "ember", "temperature": 1, "max_tokens": 40, "stream": stream,
            "presence_penalty": 0, "frequency_penalty": 0, "top_p": 1, "top_k": 0, "stop": [],
            "logit_bias": {}, "n": 1, "include_reasoning": False}


def test_sillytavern_chat_and_a_quiet_prompt(server):
    key = server.add_user("tavern")
    client = server.http(key)
    chat = [{"role": "system", "content": "Write Ember's next reply in a fictional chat between Ember and "
                                          "tavern."},
            {"role": "system", "content": "[Start a new Chat]"},
            {"role": "assistant", "content": GREETING},
            {"role": "user", "content": "I adopted a dog named Rex today!"}]
    with client.stream("POST", "/v1/chat/completions", json=sillytavern_body(chat, True)) as answer:
        assert answer.status_code == 200, answer.read()
        text = "".join(answer.iter_text())
    assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text
    reply = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                    for line in text.splitlines() if line.startswith("data: {"))

    # The summary extension's quiet prompt: the chat so far, then its instruction as a system message.
    summarize = ("Ignore previous instructions. Summarize the most important facts and events in the story "
                 "so far. If a summary already exists in your memory, use that as a base and expand with "
                 "new facts. Limit the summary to 200 words or less. Your response should include nothing "
                 "but the summary.")
    quiet = chat + [{"role": "assistant", "content": reply}, {"role": "system", "content": summarize}]
    answer = client.post("/v1/chat/completions", json=sillytavern_body(quiet, False))
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Homefire-Task"] == "sillytavern"
    assert answer.json()["choices"][0]["message"]["content"]

    assert history_of(server, "tavern") == [[("assistant", GREETING),
                                             ("user", "I adopted a dog named Rex today!"),
                                             ("assistant", reply)]]
    memories = memories_of(client)
    assert len(memories) == 1 and "Rex" in memories[0] and "Summarize" not in memories[0]


def every_optional_field() -> dict:
    """A value for every optional parameter of the SDK's chat.completions.create."""
    return {
        "audio": {"voice": "alloy", "format": "wav"}, "frequency_penalty": 0.1,
        "function_call": "auto", "functions": [{"name": "noop", "parameters": {"type": "object"}}],
        "logit_bias": {"50256": -100}, "logprobs": True, "max_completion_tokens": 24, "max_tokens": 24,
        "metadata": {"from": "test"}, "modalities": ["text"], "moderation": {"mode": "off"}, "n": 1,
        "parallel_tool_calls": False, "prediction": {"type": "content", "content": "Hello"},
        "presence_penalty": 0.1, "prompt_cache_key": "sdk-test", "prompt_cache_options": {"mode": "auto"},
        "prompt_cache_retention": "in_memory", "reasoning_effort": "low",
        "response_format": {"type": "json_object"}, "safety_identifier": "someone", "seed": 7,
        "service_tier": "auto", "stop": ["\n\n\n"], "store": True, "stream": True,
        "stream_options": {"include_usage": True}, "temperature": 0.7, "tool_choice": "auto",
        "tools": [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}],
        "top_logprobs": 2, "top_p": 0.9, "user": "someone", "verbosity": "low",
        "web_search_options": {"search_context_size": "low"},
        # vLLM's sampling extensions that Homefire uses, and a client's extra of its own.
        "extra_body": {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "my_client_flag": True},
    }


def test_the_openai_sdk_with_every_optional_field(server):
    fields = every_optional_field()
    sdk = {name for name in inspect.signature(Completions.create).parameters
           if name not in ("self", "messages", "model", "extra_headers", "extra_query", "timeout")}
    assert sdk == set(fields), f"the SDK changed: fill in {sdk ^ set(fields)}"
    assert sdk - {"extra_body"} <= set(ChatCompletionRequest.model_fields), "each one is named in protocol.py"

    key = server.add_user("sdk")
    client = server.openai(key)
    picture = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    messages = [{"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "My sister Ana plays the cello."},
                                             picture]}]
    chunks = list(client.chat.completions.create(model="ember", messages=messages, **fields))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens > 0
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks), "companions never call tools"

    # store: false is OpenAI's own way to keep a request out: nothing stored, remembered or trained on.
    raw = client.chat.completions.with_raw_response.create(
        model="ember", messages=[{"role": "user", "content": "Keep this one off the record."}],
        store=False, max_tokens=8)
    assert raw.headers["X-Homefire-Stored"] == "false" and raw.parse().choices[0].message.content
    assert history_of(server, "sdk") == [[("user", "My sister Ana plays the cello."), ("assistant", text)]]
    memories = memories_of(server.http(key))
    assert len(memories) == 1 and "Ana" in memories[0] and "off the record" not in memories[0]


def test_the_utility_model_has_no_persona_no_memory_and_is_never_stored(server):
    key = server.add_user("tasker")
    client = server.openai(key)
    assert "homefire-utility" in [m.id for m in client.models.list().data]
    asked = [{"role": "user", "content": "Name a colour."}]
    utility = client.chat.completions.create(model="homefire-utility", messages=asked, max_tokens=8)
    companion = client.chat.completions.create(model="ember", messages=asked, max_tokens=8, store=False)
    assert utility.model == "homefire-utility" and utility.choices[0].message.content
    # Ember's persona is a few hundred tokens of system prompt; the utility model has none.
    assert utility.usage.prompt_tokens + 50 < companion.usage.prompt_tokens
    assert history_of(server, "tasker") == [] and memories_of(server.http(key)) == []
    taken = server.http(key).post("/api/v1/companions", json={"id": "homefire-utility", "name": "Mine"})
    assert taken.status_code == 409 and "utility model" in taken.json()["error"]["message"]
    # A request to an unknown companion is a 404 even when it looks like a task.
    with pytest.raises(openai.NotFoundError, match="no companion named 'nobody'"):
        client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "### Task: x"}])


def test_metrics_carry_the_engines_series_and_the_dashboard_uses_only_real_ones(server):
    server.openai().chat.completions.create(model="homefire-utility", max_tokens=4,
                                            messages=[{"role": "user", "content": "Hi"}])
    text = server.http().get("/metrics").text
    names = {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and line[0] != "#"}
    for wanted in ("homefire_replies_total", "homefire_unstored_requests_total",
                   "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                   "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                   "vllm:generation_tokens_total", "vllm:prompt_tokens_total"):
        assert wanted in names, wanted
    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(families) == len(set(families)), "each family once (the engine's process_* are left out)"
    dashboard = json.loads((REPO / "configs" / "grafana-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel.get("targets", ())
            for name in re.findall(r"(?:vllm:|homefire_)[a-z_:]+", target["expr"])}
    assert len(used) >= 8 and used <= names, f"the dashboard names series /metrics lacks: {used - names}"


def test_conversations_that_began_with_a_task_are_found_and_forgotten(server):
    # History from before Homefire kept tasks out, brought back by an import.
    admin = server.http()
    assert admin.post("/api/v1/companions", json={"id": "tidy", "name": "Tidy"}).status_code == 201
    title_task = OPEN_WEBUI[4]["body"]["messages"][0]["content"]
    export = "\n".join(json.dumps(c) for c in [
        {"id": "real", "messages": [{"role": "user", "content": "My cat is called Miso."},
                                    {"role": "assistant", "content": "Miso! What a lovely name."}]},
        {"id": "title", "messages": [{"role": "user", "content": title_task},
                                     {"role": "assistant", "content": '{"title": "Cat names"}'}]}])
    imported = admin.post("/api/v1/companions/tidy/imports", content=export.encode(),
                          params={"filename": "old.jsonl"})
    assert imported.status_code == 200, imported.text
    assert len(admin.get("/api/v1/companions/tidy/memories").json()) == 2

    found = server.cli("memory", "find-tasks", "tidy")
    assert found.returncode == 0, found.stderr
    assert "open-webui   ### Task:" in found.stdout and "add --forget" in found.stdout
    listed = admin.get("/api/v1/companions/tidy/task-conversations").json()
    assert [(t["client"], t["title"] is None) for t in listed] == [("open-webui", True)]
    forgot = server.cli("memory", "find-tasks", "tidy", "--forget")
    assert "forgot 1 conversation(s)" in forgot.stdout, forgot.stdout + forgot.stderr
    left = admin.get("/api/v1/conversations", params={"companion": "tidy"}).json()
    assert [c["original_id"] for c in left] == ["real"]
    memories = admin.get("/api/v1/companions/tidy/memories").json()
    assert [("Miso" in m["text"]) for m in memories] == [True]
    assert "0 conversation(s)" in server.cli("memory", "find-tasks", "tidy").stdout


def test_the_log_says_how_to_connect_and_not_every_engine_request(server):
    server.openai().chat.completions.create(model="ember", max_tokens=4, store=False,
                                            messages=[{"role": "user", "content": "Hello?"}])
    log = (server.data_dir / "serve.log").read_text()
    assert f"Homefire is ready at {server.url}\n" in log
    for line in (f"homefire user key --data-dir {server.data_dir}", "homefire chat ember --data-dir",
                 f"base URL {server.url}/v1", "homefire-utility"):
        assert line in log, line
    for noise in ("HTTP Request:", "Loading weights", "torch_dtype", "Loading SentenceTransformer"):
        assert noise not in log, noise
