"""Loaded models kept in memory: a thread-safe LRU bounded by count and by bytes."""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from ml.inference.invariance import packed_bytes
from ml.inference.types import Loader
from models_store.loading import LoadedModel

logger = logging.getLogger(__name__)


def model_bytes(loaded: LoadedModel) -> int:
    """Bytes of a model's parameters, buffers and packed weight copies (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(loaded.model.parameters()) + list(loaded.model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total + packed_bytes(loaded.model)


@dataclass(frozen=True)
class _Entry:
    loaded: LoadedModel
    size: int


class _Lru(LRUCache[str, _Entry]):
    """cachetools' LRU, counting evictions (its documented extension point is ``popitem``)."""

    def __init__(self, maxsize: float, getsizeof: Any) -> None:
        super().__init__(maxsize=maxsize, getsizeof=getsizeof)
        self.evicted: list[str] = []

    def popitem(self) -> tuple[str, _Entry]:
        key, entry = super().popitem()
        self.evicted.append(key)
        return key, entry


class ModelCache:
    """A thread-safe LRU of loaded models, bounded by count and by parameter bytes.

    ``get`` loads a model once (concurrent callers for the same key wait for the one load) and
    never reloads a cached one. After a load, least recently used models are evicted until both
    bounds hold; the model just loaded always stays, even when it alone exceeds ``max_bytes``
    (it is sized at most ``max_bytes``, so it pushes every other model out instead of being refused).
    The LRU bookkeeping is cachetools'; the per-key loading locks are ours (cachetools has none).
    """

    def __init__(self, max_models: int = 2, max_bytes: int | None = None) -> None:
        if max_models < 1:
            raise ValueError("max_models must be >= 1")
        self.max_models, self.max_bytes = max_models, max_bytes
        limit = float(max_bytes) if max_bytes is not None else math.inf
        self._lru = _Lru(maxsize=limit, getsizeof=lambda e: min(e.size, limit))
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self.hits = self.misses = self.loads = self.evictions = 0

    def _hit(self, key: str) -> LoadedModel | None:
        entry = self._lru.get(key)  # marks it most recently used
        if entry is not None:
            self.hits += 1
        return entry.loaded if entry is not None else None

    def get(self, key: str, loader: Loader) -> LoadedModel:
        """The model cached under ``key``, loaded with ``loader()`` on a miss."""
        with self._lock:
            found = self._hit(key)
            if found is not None:
                return found
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one load per key; other keys load in parallel
            with self._lock:
                found = self._hit(key)  # loaded by the thread we waited for
                if found is not None:
                    return found
                self.misses += 1
            loaded = loader()
            entry = _Entry(loaded, model_bytes(loaded))
            with self._lock:
                self.loads += 1
                self._lru[key] = entry
                while len(self._lru) > self.max_models:
                    self._lru.popitem()
                self._log_evictions()
                self._key_locks.pop(key, None)
            return loaded

    def _log_evictions(self) -> None:
        for victim in self._lru.evicted:
            self.evictions += 1
            logger.info("model cache: evicted %s", victim)
        self._lru.evicted.clear()

    def evict(self, key: str) -> bool:
        """Forget ``key`` (a model that was deleted or retrained); whether it was cached."""
        with self._lock:
            found = self._lru.pop(key, None) is not None
            if found:
                self.evictions += 1
            return found

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._lru

    def keys(self) -> list[str]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._lru.keys())

    @property
    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"models": len(self._lru), "bytes": sum(e.size for e in self._lru.values()),
                    "keys": list(self._lru.keys()), "hits": self.hits, "misses": self.misses, "loads": self.loads,
                    "evictions": self.evictions, "max_models": self.max_models, "max_bytes": self.max_bytes}
