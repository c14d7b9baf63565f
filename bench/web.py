"""What the web app costs a reply: time to first token and to the whole reply as a person sees
it in the browser (Chromium driving the real page), against the same native API streamed
straight from Python, alternating, on one server; and what loading the page costs.

Starts `homefire serve` on the embedded model. Each round sends the same message in a new
conversation both ways (greedy, short replies). The browser's times run from the Send key
to the first token on screen and to the finished reply; the direct ones from the request to
the first `delta` event and to `done`.

    .venv/bin/python bench/web.py [--rounds 12] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serving import homefire_server  # noqa: E402

CHROMIUM = os.environ.get("HOMEFIRE_CHROMIUM", "/usr/bin/chromium")
MESSAGE = "Tell me about your favourite kind of evening."
# In the page: the Send key's time, the first token's and the finished reply's (performance.now).
WATCH = """() => {
    window.marks = {};
    const list = document.querySelector('.messages');
    new MutationObserver(() => {
        const streaming = list.querySelector('.message.streaming .text');
        if (streaming && streaming.textContent && !window.marks.first) window.marks.first = performance.now();
        if (window.marks.first && !list.querySelector('.message.streaming') && !window.marks.done)
            window.marks.done = performance.now();
    }).observe(list, {subtree: true, childList: true, characterData: true});
    document.querySelector('#message').addEventListener(
        'keydown', () => { window.marks.sent = performance.now(); }, {capture: true, once: true});
}"""


def new_conversation(http: httpx.Client) -> str:
    return http.post("/api/v1/conversations", json={"companion": "bench"}).json()["conversation"]["id"]


def direct(http: httpx.Client) -> tuple[float, float]:
    conversation = new_conversation(http)
    start, first = time.perf_counter(), None
    body = {"content": MESSAGE, "stream": True}
    with http.stream("POST", f"/api/v1/conversations/{conversation}/messages", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("event: delta") and first is None:
                first = time.perf_counter() - start
            elif line.startswith("event: done"):
                return first, time.perf_counter() - start
    raise RuntimeError("the stream ended without done")


def in_browser(page, url: str, http: httpx.Client) -> tuple[float, float]:
    conversation = new_conversation(http)
    page.goto(f"{url}/#/chat/bench/{conversation}")
    page.wait_for_selector(f".conversations li[aria-current=true] a[href$='{conversation}']")
    page.evaluate(WATCH)
    page.fill("#message", MESSAGE)
    page.press("#message", "Enter")
    page.locator(".message.assistant:not(.streaming)").last.wait_for()
    while True:
        marks = page.evaluate("window.marks")
        if marks.get("done"):
            return (marks["first"] - marks["sent"]) / 1000, (marks["done"] - marks["sent"]) / 1000
        page.wait_for_timeout(20)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="homefire-bench-web-") as tmp, \
            homefire_server(Path(tmp), "memory: {top_k: 0}\n") as (url, key), sync_playwright() as playwright:
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        http.post("/api/v1/companions", json={"id": "bench", "name": "Bench", "personality": "calm",
                                              "sampling": {"temperature": 0, "max_tokens": args.max_tokens}})
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        # Loading the page: requests, bytes, and the time to a signed-in list of companions.
        sizes: list[int] = []
        page.on("response", lambda r: sizes.append(int(r.headers.get("content-length") or 0))
                if "/web/" in r.url or r.url.rstrip("/") == url else None)
        started = time.perf_counter()
        page.goto(url + "/")
        page.fill("#key", key)
        page.press("#key", "Enter")
        page.wait_for_selector(".card.companion")
        signed_in = time.perf_counter() - started
        loaded = list(sizes)   # the first load only (later rounds change the #fragment)
        direct(http)   # warm both paths once
        in_browser(page, url, http)
        rows = {"direct": ([], []), "browser": ([], [])}
        for i in range(args.rounds):
            for name in (("direct", "browser") if i % 2 == 0 else ("browser", "direct")):
                first, whole = direct(http) if name == "direct" else in_browser(page, url, http)
                rows[name][0].append(first)
                rows[name][1].append(whole)
        browser.close()
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; {args.rounds} rounds, "
          f"max_tokens {args.max_tokens}, greedy")
    print(f"page load: {len(loaded)} files from this server, {sum(loaded) / 1024:.1f} KiB; "
          f"sign-in to companions listed {signed_in * 1000:.0f} ms")
    print("| path | first token p50 | p95 | whole reply p50 | p95 |")
    print("| --- | --- | --- | --- | --- |")
    for name, (first, whole) in rows.items():
        print(f"| {name} | {statistics.median(first) * 1000:.0f} ms | {pct(first, 0.95) * 1000:.0f} ms | "
              f"{statistics.median(whole) * 1000:.0f} ms | {pct(whole, 0.95) * 1000:.0f} ms |")
    ratio_first = statistics.median(rows["browser"][0]) / statistics.median(rows["direct"][0])
    ratio_whole = statistics.median(rows["browser"][1]) / statistics.median(rows["direct"][1])
    print(f"ratio browser/direct: first token {ratio_first:.2f}, whole reply {ratio_whole:.2f}")
    print(json.dumps({"first_ratio": ratio_first, "whole_ratio": ratio_whole}))


if __name__ == "__main__":
    main()
