"""One collection's vectors held in memory, for exact cosine search in recall.

Chroma's HNSW search missed an isolated memory among 300 clustered small-talk exchanges in
2 of 3 runs (insertion order is random); an exact scan over a mirror does not.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np

# torch is imported in the methods that use it: a process that opens no memory (most CLI
# commands) is spared its 2 s.


class Mirror:
    """One companion's vectors in memory, for exact cosine search (all are unit vectors).

    float16 halves the bytes each query scans (recall is memory-bound: 100k x 384 floats)
    and runs in torch's own threads, so it does not fight the embedder's OpenMP threads
    for the cores as numpy's BLAS threads did (p95 at 100k: 119 ms with numpy). On this
    machine's CPU float16 scans three times faster than bfloat16 (5 against 17 ms at 100k,
    one thread) and rounds less. The rows it picks are scored again exactly, from a float32
    copy, so near-ties never come back in an order that depends on how many are asked for.
    """

    def __init__(self):
        import torch

        self.size = 0
        self._ids = np.zeros(0, dtype=np.int64)
        self._matrix = torch.zeros((0, 0), dtype=torch.float16)
        self._exact = np.zeros((0, 0), dtype=np.float32)
        self._times = torch.zeros(0, dtype=torch.float64)   # when each vector's memory was said
        self._words = np.zeros(0, dtype=bool)   # the vector is of the user's own words, not the text
        self._lock = threading.Lock()

    def add(self, memory_ids: list[int], vectors, times: list[float], words: list[bool] | None = None,
            ) -> None:
        import torch

        if len(memory_ids) == 0:
            return
        exact = np.asarray(vectors, dtype=np.float32)
        block = torch.from_numpy(exact).to(torch.float16)
        with self._lock:
            need = self.size + len(block)
            if need > len(self._ids):  # grow by doubling: appending one reply copies nothing
                capacity = max(need, 2 * len(self._ids), 1024)
                matrix = torch.zeros((capacity, block.shape[1]), dtype=torch.float16)
                if self.size:
                    matrix[: self.size] = self._matrix[: self.size]
                ids = np.zeros(capacity, dtype=np.int64)
                ids[: self.size] = self._ids[: self.size]
                copy = np.zeros((capacity, block.shape[1]), dtype=np.float32)
                if self.size:
                    copy[: self.size] = self._exact[: self.size]
                said = torch.zeros(capacity, dtype=torch.float64)
                said[: self.size] = self._times[: self.size]
                own = np.zeros(capacity, dtype=bool)
                own[: self.size] = self._words[: self.size]
                self._matrix, self._ids, self._exact, self._times, self._words = matrix, ids, copy, said, own
            self._matrix[self.size:need] = block
            self._exact[self.size:need] = exact
            self._ids[self.size:need] = memory_ids
            self._times[self.size:need] = torch.tensor(times, dtype=torch.float64)
            self._words[self.size:need] = words if words is not None else False
            self.size = need

    def drop(self, memory_ids: list[int]) -> None:
        import torch

        with self._lock:
            keep = ~np.isin(self._ids[: self.size], memory_ids)
            kept = int(keep.sum())
            self._matrix[:kept] = self._matrix[: self.size][torch.from_numpy(keep)]
            self._exact[:kept] = self._exact[: self.size][keep]
            self._ids[:kept] = self._ids[: self.size][keep]
            self._times[:kept] = self._times[: self.size][torch.from_numpy(keep)]
            self._words[:kept] = self._words[: self.size][keep]
            self.size = kept

    def top(self, vector: np.ndarray, n: int, span: tuple[float, float] | None = None,
            bonus: float = 0.0) -> list[Hit]:
        """The n rows nearest `vector` by the fast scan, scored exactly, best first; equal
        scores in memory id order. Rows said within `span` (start, end timestamps) score
        `bonus` more, in the scan itself: a question about "last week" costs no more than any
        other."""
        import torch

        with self._lock:
            matrix = self._matrix[: self.size]
            scores = torch.mv(matrix, torch.from_numpy(vector).to(torch.float16)).float()
            if span:
                times = self._times[: self.size]
                scores += bonus * ((times >= span[0]) & (times < span[1])).float()
            rows = torch.topk(scores, min(n, self.size)).indices.numpy()
            picked = self._exact[rows]
            ids = self._ids[rows]
            said = self._times[rows].numpy()
            words = self._words[rows]
        exact = picked @ vector.astype(np.float32)
        inside = (said >= span[0]) & (said < span[1]) if span else np.zeros(len(rows), dtype=bool)
        scored = exact + bonus * inside
        order = np.lexsort((ids, -scored))
        return [Hit(int(ids[i]), float(scored[i]), picked[i], float(exact[i]), bool(words[i]),
                    bool(inside[i])) for i in order]


class Hit(NamedTuple):
    """A row the scan found: its memory, its score (with the bonus of a time asked about), its
    vector, and why it scored so: its similarity alone, whether the vector is of the user's own
    words (else of the memory's text), and whether it was said in the time asked about."""

    memory_id: int
    score: float
    vector: np.ndarray
    similarity: float
    words: bool
    in_span: bool
