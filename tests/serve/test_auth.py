"""With HOMEFIRE_API_KEY set, every route but /healthz needs the key."""

from __future__ import annotations

import socket

import httpx


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_routes_need_the_key(make_server):
    # An engine URL where nothing listens: the API answers while the engine stays unready.
    server = make_server(config={"engine": {"url": f"http://127.0.0.1:{closed_port()}"}},
                         env={"HOMEFIRE_API_KEY": "s3cret-key"}).start(ready=False)
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        for method, path in [("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/v1/models"),
                             ("POST", "/v1/chat/completions"), ("GET", "/api/v1/companions"),
                             ("GET", "/api/v1/conversations"), ("POST", "/api/v1/conversations")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                response = anonymous.request(method, path, headers=headers, json={})
                assert response.status_code == 401, (method, path, response.text)
                assert response.json()["error"]["type"] == "authentication_error"
    with server.http() as keyed:
        assert keyed.get("/api/v1/companions").status_code == 200
        assert [m["id"] for m in keyed.get("/v1/models").json()["data"]] == ["ember"]
        unready = keyed.get("/readyz")
        assert unready.status_code == 503 and unready.json()["engine"] == "starting"
        busy = keyed.post("/v1/chat/completions",
                          json={"model": "ember", "messages": [{"role": "user", "content": "hi"}]})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
        assert "the engine is starting" in busy.json()["error"]["message"]
