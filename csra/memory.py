"""The answer memory as a process serves it: entries kept in the database, loaded into an in-memory
index (``ml.memory``) and kept in step before each use.

The database is the source of truth, so the API and every worker (on any host) see the same memory:
each process adds the entries created since its last look and drops those removed since. An
approval in the API is therefore searchable by the generate worker on its next reply.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from csra.settings import get_settings
from db.base import utcnow
from db.models import MemoryEntry
from db.session import session_scope
from ml.importing.clean import message_key
from ml.memory.embedder import DIM, Embedder, EmbedderMissing
from ml.memory.memory import INTENT_VOTERS, AnswerMemory, Entry, vote

# Every use looks at the database first (three indexed queries, about a millisecond): an approval is
# then part of the very next reply, in any process. A throttle here once made the next reply miss it.
REMOVAL_LOOKBACK = timedelta(seconds=30)


class MemoryNotBuilt(RuntimeError):
    """Nothing to search yet: no entries, or the embedding model was never exported."""

    def __init__(self, what: str) -> None:
        super().__init__(f"the answer memory is not built yet ({what}): POST /memory/rebuild "
                         '{"dataset_id": N} builds it from a dataset\'s train split')


@lru_cache(maxsize=1)
def embedder() -> Embedder:
    """The process's embedding model (MiniLM through ONNX Runtime); MemoryNotBuilt until exported."""
    try:
        return Embedder(get_settings().embedder_dir, threads=get_settings().torch_threads)
    except EmbedderMissing:
        raise MemoryNotBuilt("the embedding model has not been exported") from None


def to_blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()


def from_blob(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32)


def as_entry(row: MemoryEntry) -> Entry:
    return Entry(id=row.id, message=row.message, reply=row.reply, intent=row.intent, category=row.category,
                 source=row.source, group=row.group_key)


def add_entries(session: Session, rows: list[dict[str, Any]], message_vecs: np.ndarray,
                reply_vecs: np.ndarray) -> list[MemoryEntry]:
    """Store entries with their vectors (``rows``: message, reply, intent, category, source, ...)."""
    made = [MemoryEntry(**row, message_vec=to_blob(m), reply_vec=to_blob(r))
            for row, m, r in zip(rows, message_vecs, reply_vecs, strict=True)]
    session.add_all(made)
    session.flush()
    return made


class ServingMemory:
    """This process's copy of the memory, brought up to date with the database before each use."""

    def __init__(self) -> None:
        self.memory = AnswerMemory()
        self._last_id = 0
        self._removed_since: datetime | None = None
        self._lock = threading.Lock()

    def sync(self) -> AnswerMemory:
        with self._lock:
            now = utcnow()
            with session_scope() as s:
                self._add_new(s)
                if self._removed_since is not None:
                    # a little look-back: a removal committed just after our last look, stamped before it
                    since = self._removed_since - REMOVAL_LOOKBACK
                    for entry_id in s.scalars(select(MemoryEntry.id).where(MemoryEntry.removed_at >= since)):
                        self.memory.remove(entry_id)
                live = s.scalar(select(func.count()).select_from(MemoryEntry)
                                .where(MemoryEntry.removed_at.is_(None))) or 0
                if live != len(self.memory):
                    # out of step (an insert with a lower id committed late, a rebuild replaced the
                    # memory): reload it whole rather than guess which rows differ
                    self.memory, self._last_id = AnswerMemory(), 0
                    self._add_new(s)
            self._removed_since = now
            return self.memory

    def _add_new(self, s: Session) -> None:
        new = s.scalars(select(MemoryEntry).where(MemoryEntry.id > self._last_id, MemoryEntry.removed_at.is_(None))
                        .order_by(MemoryEntry.id)).all()
        if new:
            self.memory.add([as_entry(r) for r in new], np.stack([from_blob(r.message_vec) for r in new]),
                            np.stack([from_blob(r.reply_vec) for r in new]))
            self._last_id = max(self._last_id, new[-1].id)

    def searchable(self) -> AnswerMemory:
        """The synced memory; ``MemoryNotBuilt`` when it has no entries."""
        memory = self.sync()
        if len(memory) == 0:
            raise MemoryNotBuilt("it has no entries")
        return memory


@lru_cache(maxsize=1)
def serving_memory() -> ServingMemory:
    return ServingMemory()


def group_keys(messages: list[str]) -> list[str]:
    """The leakage groups of customer messages (the importer's key: the same message, any copy of it)."""
    return [str(k) for k in message_key(pd.Series(messages, dtype="str"))] if messages else []


def group_key(message: str) -> str:
    return group_keys([message])[0]


__all__ = ["DIM", "INTENT_VOTERS", "MemoryNotBuilt", "ServingMemory", "add_entries", "embedder", "group_key",
           "group_keys", "serving_memory", "vote"]
