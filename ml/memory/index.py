"""A vector index over unit-length embeddings: usearch's HNSW graph, keyed by memory entry id.

usearch rather than faiss or sqlite-vec: it adds and removes single entries in place (an approved
reply is searchable at once, a wrong approval goes away), it is one small wheel, and it runs the
same whatever database holds the entries (sqlite-vec works inside SQLite only; Debian's
PostgreSQL has no pgvector). The vectors themselves live in the database; every process builds its
index from there.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from usearch.index import Index

from ml.memory.embedder import DIM


class VectorIndex:
    """Thread-safe add / remove / top-k by cosine similarity (the vectors are unit length)."""

    def __init__(self, ndim: int = DIM) -> None:
        self._index = Index(ndim=ndim, metric="ip", dtype="f32")
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._index)

    def add(self, keys: Sequence[int], vectors: np.ndarray) -> None:
        if len(keys) == 0:
            return
        with self._lock:
            self._index.add(np.asarray(keys, dtype=np.uint64), np.ascontiguousarray(vectors, dtype=np.float32))

    def remove(self, key: int) -> None:
        with self._lock:
            if self._index.contains(key):
                self._index.remove(key)

    def search(self, vector: np.ndarray, k: int, exact: bool = False) -> list[tuple[int, float]]:
        """(key, cosine similarity) of the ``k`` nearest, best first. ``exact``: brute force (evaluation)."""
        with self._lock:
            if len(self._index) == 0:
                return []
            found = self._index.search(np.ascontiguousarray(vector, dtype=np.float32), min(k, len(self._index)),
                                       exact=exact)
        return [(int(key), 1.0 - float(dist)) for key, dist in zip(found.keys, found.distances, strict=True)]
