"""A second opinion on recall's best candidates: a cross-encoder (or a vLLM /rerank or /score
endpoint) that reads the question and each memory together, where memory.reranker names one.

It has a budget (memory.rerank_budget_ms): past it, or on any failure, recall keeps its first
ranking and the reply goes on; it never waits longer than the budget.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import urlsplit

import httpx

log = logging.getLogger("homefire.memory")


class Reranker:
    """`setting`: an http(s) URL (a path ending /score is vLLM's score API; any other is a
    /rerank endpoint, vLLM's or Jina/Cohere-style, at that path or, for a bare server or /v1,
    at /rerank) or a sentence-transformers CrossEncoder directory. Its key, if it needs one,
    comes from HOMEFIRE_RERANKER_API_KEY. `outcomes` counts what each call came to: used,
    failed, over budget, busy (a local model still on an earlier call)."""

    def __init__(self, setting: str, budget_ms: int):
        self.setting = setting
        self.budget = budget_ms / 1000
        self.outcomes: Counter[str] = Counter()
        self._remote = setting.startswith(("http://", "https://"))
        self._model = None
        self._served: str | None = None
        self._busy = threading.Lock()
        # Whatever a call costs, the caller waits no longer than the budget.
        self._pool = ThreadPoolExecutor(4 if self._remote else 1, thread_name_prefix="rerank")
        if self._remote:
            key = os.environ.get("HOMEFIRE_RERANKER_API_KEY")
            self._http = httpx.Client(headers={"Authorization": f"Bearer {key}"} if key else {})
            path = urlsplit(setting).path.rstrip("/")
            root = setting.rstrip("/")
            if path in ("", "/v1"):
                root, path = root.removesuffix("/v1"), "/rerank"
            else:
                root = root[: len(root) - len(path)]
            self._root, self._path = root, path

    def scores(self, query: str, texts: list[str]) -> list[float] | None:
        """One score per text (higher: more relevant), or None: keep the first ranking."""
        if not texts:
            return []
        if not self._remote and not self._busy.acquire(blocking=False):
            self.outcomes["busy"] += 1
            return None
        future = self._pool.submit(self._ask if self._remote else self._local, query, texts)
        try:
            scores = future.result(timeout=self.budget)
            self.outcomes["used"] += 1
            return scores
        except (httpx.TimeoutException, FutureTimeout):
            self.outcomes["over budget"] += 1
            log.warning("memory: the reranker %s took longer than its budget; kept the first ranking",
                        self.setting)
        except Exception as err:   # a reranker is a refinement: never the reason a reply fails
            self.outcomes["failed"] += 1
            log.warning("memory: the reranker %s failed (%s); kept the first ranking", self.setting,
                        err or type(err).__name__)
        return None

    def _local(self, query: str, texts: list[str]) -> list[float]:
        try:
            if self._model is None:
                from sentence_transformers import CrossEncoder

                self._model = CrossEncoder(self.setting, device="cpu")
            scores = [float(s) for s in self._model.predict([(query, t) for t in texts])]
            return scores
        finally:
            self._busy.release()

    def _ask(self, query: str, texts: list[str]) -> list[float]:
        timeout = httpx.Timeout(self.budget)
        if self._served is None:
            models = self._http.get(f"{self._root}/v1/models", timeout=timeout)
            models.raise_for_status()
            self._served = (models.json().get("data") or [{}])[0].get("id", "")
        if self._path.endswith("/score"):
            body = {"model": self._served, "text_1": query, "text_2": texts}
        else:
            body = {"model": self._served, "query": query, "documents": texts}
        response = self._http.post(f"{self._root}{self._path}", json=body, timeout=timeout)
        response.raise_for_status()
        data = response.json()
        found = {r["index"]: r["score"] for r in data["data"]} if "data" in data else \
            {r["index"]: r["relevance_score"] for r in data["results"]}
        return [float(found[i]) for i in range(len(texts))]
