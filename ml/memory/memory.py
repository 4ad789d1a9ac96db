"""Approved answers with their message and reply embeddings: similar answers, and intents by vote.

``AnswerMemory`` holds entries (the customer message, the approved reply, its intent) and two
indexes: over messages (a new customer message finds the answers to similar messages) and over
replies (a generated reply finds the intent of the approved replies it resembles, which is how
evaluation checks a reply's intent without a reference text).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ml.memory.embedder import DIM
from ml.memory.index import VectorIndex

INTENT_VOTERS = 5  # the nearest answers whose intents vote for a message's (or a reply's) intent


@dataclass(frozen=True)
class Entry:
    id: int
    message: str
    reply: str
    intent: str = ""
    category: str = ""
    source: str = "dataset"  # dataset | chat
    group: str = ""  # the leakage group (normalised customer message): never a neighbour of itself


@dataclass(frozen=True)
class Hit:
    entry: Entry
    similarity: float


@dataclass(frozen=True)
class IntentGuess:
    intent: str
    confidence: float  # the winning intent's share of the neighbours' similarity


class AnswerMemory:
    """Entries plus their message and reply indexes; safe to search while entries are added."""

    def __init__(self, exact: bool = False, ndim: int = DIM) -> None:
        self.entries: dict[int, Entry] = {}
        self.messages, self.replies = VectorIndex(ndim), VectorIndex(ndim)
        self.exact = exact  # brute-force search: evaluation wants the true nearest neighbours
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entries: list[Entry], message_vecs: np.ndarray, reply_vecs: np.ndarray | None) -> None:
        """Entries with their message vectors and (unless None: see ``add_replies``) reply vectors."""
        with self._lock:
            for e in entries:
                self.entries[e.id] = e
        keys = [e.id for e in entries]
        self.messages.add(keys, message_vecs)
        if reply_vecs is not None:
            self.replies.add(keys, reply_vecs)

    def add_replies(self, keys: list[int], reply_vecs: np.ndarray) -> None:
        """Reply vectors of entries already added (a sample is enough to judge a reply's intent)."""
        self.replies.add(keys, reply_vecs)

    def remove(self, entry_id: int) -> None:
        with self._lock:
            self.entries.pop(entry_id, None)
        self.messages.remove(entry_id)
        self.replies.remove(entry_id)

    def _hits(self, index: VectorIndex, vector: np.ndarray, k: int, exclude_group: str | None) -> list[Hit]:
        # more than asked: entries of the excluded leakage group (a message can have many rows) or just
        # removed ones are skipped; widened until k are left or the index is exhausted
        if not k:
            return []
        fetch = k + 8
        while True:
            found = index.search(vector, fetch, exact=self.exact)
            hits = [Hit(entry, sim) for key, sim in found
                    if (entry := self.entries.get(key)) is not None
                    and (exclude_group is None or entry.group != exclude_group)]
            if len(hits) >= k or len(found) < fetch:
                return hits[:k]
            fetch *= 4

    def similar(self, message_vec: np.ndarray, k: int, exclude_group: str | None = None) -> list[Hit]:
        """The answers to the ``k`` most similar customer messages, best first."""
        return self._hits(self.messages, message_vec, k, exclude_group)

    def similar_replies(self, reply_vec: np.ndarray, k: int) -> list[Hit]:
        return self._hits(self.replies, reply_vec, k, None)

    def intent_of_message(self, message_vec: np.ndarray, k: int = INTENT_VOTERS) -> IntentGuess | None:
        return vote(self.similar(message_vec, k))

    def intent_of_reply(self, reply_vec: np.ndarray, k: int = INTENT_VOTERS) -> IntentGuess | None:
        return vote(self.similar_replies(reply_vec, k))


def vote(hits: Iterable[Hit]) -> IntentGuess | None:
    """The intent the neighbours agree on most, weighted by similarity (None: no intents known)."""
    weights: dict[str, float] = defaultdict(float)
    for h in hits:
        if h.entry.intent:
            weights[h.entry.intent] += max(h.similarity, 0.0)
    total = sum(weights.values())
    if not weights or total <= 0:
        return None
    intent = max(sorted(weights), key=lambda i: weights[i])
    return IntentGuess(intent, round(weights[intent] / total, 4))
