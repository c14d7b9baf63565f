"""What the clients people use cost: Open WebUI's browser chat and tasks, and one /metrics scrape.

Starts `homefire serve` on the embedded model and, in one run, takes three pairs (each
alternated request by request, so drift hits both sides alike):
  1. Open WebUI 0.12.4's browser chat body (36 tool definitions, ignored) against the same
     body without them: time to first token, p50. Accepting what a client sends costs nothing.
  2. Its title task answered as a background task (the utility model: no persona, no memory,
     not stored) against the same messages sent to the companion with `store: false` (what
     answering it as the companion would take): latency p50 and prompt tokens.
  3. GET /metrics (Homefire's series and the engine's) against the engine's own /metrics on
     its private socket: latency p50.

    .venv/bin/python bench/clients.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serving import homefire_server  # noqa: E402
from serve.default_model import MODEL_NAME  # noqa: E402

CAPTURE = REPO / "tests" / "clients" / "open-webui-0.12.4-requests.jsonl"


def ttft(client: httpx.Client, body: dict) -> float:
    started, first = time.perf_counter(), None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if first is None and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter() - started
    assert first is not None, "no content came"
    return first


def whole(client: httpx.Client, body: dict) -> tuple[float, int]:
    started = time.perf_counter()
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return time.perf_counter() - started, r.json()["usage"]["prompt_tokens"]


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="requests of each kind")
    args = parser.parse_args()
    requests = [json.loads(line) for line in CAPTURE.open()]
    chat = dict(requests[5]["body"], max_tokens=16)
    bare = {k: v for k, v in chat.items() if k != "tools"}
    title = dict(requests[4]["body"], max_tokens=16)
    # The same task, worded so that no pattern knows it: the companion answers, with its persona
    # and memory recall (store: false, so nothing is kept either way).
    asked = title["messages"][0]["content"]
    as_companion = dict(title, store=False, messages=[{"role": "user", "content": f"Now:\n{asked}"}])
    data_dir = Path(tempfile.mkdtemp(prefix="homefire-clients-"))
    config = f"companions_dir: {REPO / 'configs' / 'companions'}\nlimits:\n  requests_per_minute: 0\n"
    figures: dict[str, list] = {k: [] for k in ("tools", "bare", "task", "companion", "task_tokens",
                                                "companion_tokens", "metrics", "engine_metrics")}
    with homefire_server(data_dir, config) as (url, key):
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        engine = httpx.Client(transport=httpx.HTTPTransport(uds=str(data_dir / "run" / "engine.sock")),
                              base_url="http://engine", timeout=60)
        ttft(client, bare)   # warm-up
        for _ in range(args.rounds):
            figures["tools"].append(ttft(client, chat))
            figures["bare"].append(ttft(client, bare))
            seconds, tokens = whole(client, title)
            figures["task"].append(seconds)
            figures["task_tokens"].append(tokens)
            seconds, tokens = whole(client, as_companion)
            figures["companion"].append(seconds)
            figures["companion_tokens"].append(tokens)
            figures["metrics"].append(timed(lambda: client.get("/metrics").raise_for_status()))
            figures["engine_metrics"].append(timed(lambda: engine.get("/metrics").raise_for_status()))
    m = {k: median_ms(v) for k, v in figures.items() if not k.endswith("tokens")}
    tokens = {k: statistics.median(v) for k, v in figures.items() if k.endswith("tokens")}
    result = {
        "tools_ttft_ratio": m["tools"] / m["bare"],
        "task_latency_ratio": m["task"] / m["companion"],
        "metrics_latency_ratio": m["metrics"] / m["engine_metrics"],
        "medians_ms": m, "prompt_tokens": tokens, "rounds": args.rounds,
    }
    print(f"\nmachine: {platform.machine()}, {platform.processor() or 'cpu'}; model {MODEL_NAME}; "
          f"{args.rounds} rounds, 16-token replies")
    print(f"Open WebUI chat, TTFT p50: with its 36 tools {m['tools']:.0f} ms, without {m['bare']:.0f} ms; "
          f"ratio {result['tools_ttft_ratio']:.2f}")
    print(f"title task, p50: as a background task {m['task']:.0f} ms ({tokens['task_tokens']:.0f} prompt "
          f"tokens), as the companion {m['companion']:.0f} ms ({tokens['companion_tokens']:.0f}); "
          f"ratio {result['task_latency_ratio']:.2f}")
    print(f"/metrics p50: Homefire's with the engine's {m['metrics']:.1f} ms, the engine's alone "
          f"{m['engine_metrics']:.1f} ms; ratio {result['metrics_latency_ratio']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
