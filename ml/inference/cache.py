"""Loaded models kept in memory: a thread-safe LRU bounded by count and by bytes."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

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


class ModelCache:
    """A thread-safe LRU of loaded models, bounded by count and by parameter bytes.

    ``get`` loads a model once (concurrent callers for the same key wait for the one load) and
    never reloads a cached one. After a load, least recently used models are evicted until both
    bounds hold; the model just loaded always stays, even when it alone exceeds ``max_bytes``.
    """

    def __init__(self, max_models: int = 2, max_bytes: int | None = None) -> None:
        if max_models < 1:
            raise ValueError("max_models must be >= 1")
        self.max_models, self.max_bytes = max_models, max_bytes
        self._lock = threading.Lock()
        self._models: OrderedDict[str, tuple[LoadedModel, int]] = OrderedDict()
        self._loading: dict[str, threading.Event] = {}
        self._key_locks: dict[str, threading.Lock] = {}
        self.hits = self.misses = self.loads = self.evictions = 0

    def get(self, key: str, loader: Loader) -> LoadedModel:
        """The model cached under ``key``, loaded with ``loader()`` on a miss."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                self.hits += 1
                return self._models[key][0]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one load per key; other keys load in parallel
            with self._lock:
                if key in self._models:  # loaded by the thread we waited for
                    self._models.move_to_end(key)
                    self.hits += 1
                    return self._models[key][0]
                self.misses += 1
            loaded = loader()
            size = model_bytes(loaded)
            with self._lock:
                self.loads += 1
                self._models[key] = (loaded, size)
                self._models.move_to_end(key)
                self._evict_over_limits(keep=key)
                self._key_locks.pop(key, None)
            return loaded

    def _total_bytes(self) -> int:
        return sum(size for _, size in self._models.values())

    def _evict_over_limits(self, keep: str) -> None:
        def over() -> bool:
            too_many = len(self._models) > self.max_models
            too_big = self.max_bytes is not None and self._total_bytes() > self.max_bytes
            return too_many or too_big

        while over() and len(self._models) > 1:
            victim = next(k for k in self._models if k != keep)
            del self._models[victim]
            self.evictions += 1
            logger.info("model cache: evicted %s", victim)

    def evict(self, key: str) -> bool:
        """Forget ``key`` (a model that was deleted or retrained); whether it was cached."""
        with self._lock:
            found = self._models.pop(key, None) is not None
            if found:
                self.evictions += 1
            return found

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._models

    def keys(self) -> list[str]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._models)

    @property
    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"models": len(self._models), "bytes": self._total_bytes(), "keys": list(self._models),
                    "hits": self.hits, "misses": self.misses, "loads": self.loads, "evictions": self.evictions,
                    "max_models": self.max_models, "max_bytes": self.max_bytes}
