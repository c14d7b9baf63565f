"""Limits: over-limit requests get a clear 4xx, never a 5xx or a hang, and store nothing."""

from __future__ import annotations

import threading
import time


def test_over_limit_requests_get_clear_4xx_and_leave_no_trace(make_server):
    server = make_server(engine="shared", config={"limits": {
        "max_body_kb": 4, "max_messages": 3, "max_content_chars": 200, "max_streams_per_user": 1,
        "requests_per_minute": 12}}).start()
    http = server.http()
    before = len(http.get("/api/v1/conversations", params={"limit": 500}).json())

    big = http.post("/v1/chat/completions", json={"model": "ember", "messages": [
        {"role": "user", "content": "x" * 5000}]})
    assert big.status_code == 413 and "limits.max_body_kb" in big.json()["error"]["message"]

    def chunks():   # no Content-Length: the limit holds while the body streams in
        yield b'{"model": "ember", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    streamed = http.post("/v1/chat/completions", content=chunks(),
                         headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413

    many = http.post("/v1/chat/completions", json={"model": "ember", "messages": [
        {"role": "user", "content": f"hi {i}"} for i in range(4)]})
    assert many.status_code == 400 and "limits.max_messages" in many.json()["error"]["message"]
    long = http.post("/v1/chat/completions", json={"model": "ember", "messages": [
        {"role": "user", "content": "z" * 300}]})
    assert long.status_code == 400
    assert "messages[0].content: 300 characters" in long.json()["error"]["message"]

    # One reply at a time for this user: of two sent together, one gets 429 with Retry-After.
    created = http.post("/api/v1/conversations", json={"companion": "ember"})
    conversation = created.json()["conversation"]["id"]
    together, answers = threading.Barrier(2), []

    def send(path: str, body: dict) -> None:
        with server.http() as client:
            together.wait()
            answers.append(client.post(path, json=body))

    workers = [threading.Thread(target=send, args=args) for args in (
        (f"/api/v1/conversations/{conversation}/messages", {"content": "Tell me a story.", "max_tokens": 64}),
        ("/v1/chat/completions", {"model": "ember", "messages": [{"role": "user", "content": "Hi?"}],
                                  "max_tokens": 64}))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(a.status_code for a in answers) == [200, 429], [a.text for a in answers]
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert "limits.max_streams_per_user" in refused.json()["error"]["message"]

    # The request rate: a burst beyond the per-minute budget gets 429 with the wait.
    statuses = [http.get("/api/v1/companions").status_code for _ in range(12)]
    assert 429 in statuses and set(statuses) <= {200, 429}
    limited = http.get("/api/v1/companions")
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert server.http().get("/healthz").status_code == 200, "health checks are never limited"

    # Nothing refused was stored: the conversation created above, and the one the answered
    # OpenAI request started, if it was that one.
    time.sleep(int(limited.headers["retry-after"]))
    after = http.get("/api/v1/conversations", params={"limit": 500}).json()
    openai_answered = any(a.status_code == 200 and a.json().get("object") == "chat.completion"
                          for a in answers)
    assert len(after) == before + 1 + int(openai_answered)
