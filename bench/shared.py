"""What one member's bad adapter costs the others: replies while it is refused, against none.

Starts `homefire serve` on the embedded model with a few members, then twice:
  1. the baseline: every member but one asks for --replies replies, one at a time each;
  2. the same, while the last member keeps importing a bundle whose adapter vLLM could not
     load (40 bytes of junk as its weights, and a real rank-128 one over engine.max_lora_rank),
     the bundle from issue 23 that used to take the engine down for everyone.
Printed: the others' failed requests in each (goal: 0), their reply p95 during the imports
over the baseline's (the ratio), the imports refused, and the engine's restarts (goal: 0).

    .venv/bin/python bench/shared.py [--members 3] [--replies 12]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serving import homefire_server  # noqa: E402
from serve.default_model import ensure_default_model  # noqa: E402
from store import adapters  # noqa: E402


def bad_bundles(http: httpx.Client, model_dir: Path, scratch: Path) -> list[bytes]:
    """The member's own companion's bundle, with an adapter in use that vLLM could not load."""
    from tests.support.adapters import make_adapter, with_adapter

    assert http.post("/api/v1/companions", json={"id": "luna", "name": "Luna"}).status_code == 201
    exported = http.get("/api/v1/companions/luna/bundle").content
    big = scratch / "rank128"
    make_adapter(big, model_dir, "member", seed=1, rank=128)
    sha = adapters.model_sha256(model_dir)
    junk = {"r": 16, "target_modules": ["q_proj"], "peft_type": "LORA"}
    return [with_adapter(exported, junk, b"\x07" * 40, sha),
            with_adapter(exported, json.loads((big / "adapter_config.json").read_text()),
                         (big / "adapter_model.safetensors").read_bytes(), sha)]


def replies(client: httpx.Client, count: int, times: list[float], failures: list[str]) -> None:
    made = client.post("/api/v1/conversations", json={"companion": "ember"})
    conversation = made.json()["conversation"]["id"]
    for i in range(count):
        started = time.perf_counter()
        try:
            answer = client.post(f"/api/v1/conversations/{conversation}/messages",
                                 json={"content": f"Tell me about the number {i}.", "max_tokens": 16})
            if answer.status_code == 200:
                times.append(time.perf_counter() - started)
            else:
                failures.append(f"{answer.status_code}: {answer.text[:120]}")
        except httpx.HTTPError as err:
            failures.append(type(err).__name__)


def phase(others: list[httpx.Client], count: int, importer=None) -> tuple[list[float], list[str], int]:
    times: list[float] = []
    failures: list[str] = []
    threads = [threading.Thread(target=replies, args=(c, count, times, failures)) for c in others]
    for thread in threads:
        thread.start()
    refused = 0
    while importer and any(t.is_alive() for t in threads):
        refused += importer()
    for thread in threads:
        thread.join()
    return times, failures, refused


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3, help="members replying (besides the importer)")
    parser.add_argument("--replies", type=int, default=12, help="replies each member asks for, per phase")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        model_dir = ensure_default_model(data / "models")
        with homefire_server(data, "{}\n") as (url, key):
            owner = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
            members = []
            for i in range(args.members + 1):
                made = owner.post("/api/v1/users", json={"name": f"member{i}"}).json()
                members.append(httpx.Client(base_url=url, timeout=300,
                                            headers={"Authorization": f"Bearer {made['api_key']}"}))
            *others, mallory = members
            bundles = bad_bundles(mallory, model_dir, data)
            restarts = owner.get("/readyz").json()["restarts"]

            def bad_import() -> int:
                refused = 0
                for body in bundles:
                    answer = mallory.post("/api/v1/bundles", content=body, params={"as_id": "evil"})
                    refused += answer.status_code == 422
                return refused

            base_times, base_failed, _ = phase(others, args.replies)
            times, failed, refused = phase(others, args.replies, bad_import)
            restarted = owner.get("/readyz").json()["restarts"] - restarts
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {args.members} members x "
          f"{args.replies} replies")
    print(f"baseline:          {len(base_failed)} failed, reply p95 {p95(base_times):.2f} s")
    print(f"during the imports: {len(failed)} failed, reply p95 {p95(times):.2f} s, "
          f"{refused} bad bundles refused (422)")
    print(f"engine restarts: {restarted}")
    print(f"ratio (p95 during / baseline): {p95(times) / p95(base_times):.2f}")
    if failed:
        print("failures:", *sorted(set(failed))[:5], sep="\n  ")


if __name__ == "__main__":
    main()
