"""A dataset's train split as an answer memory, for evaluation and grounded training.

Evaluation answers with (retrieval), grounds prompts on (grounded models) and checks intents and
placeholders against the approved answers of the evaluated dataset's train split only, never the
deployment's whole memory (another dataset there could hold the test rows themselves). Search is
exact (brute force), so results are the true nearest neighbours and repeatable. The vectors come
from the memory entries stored for the dataset when it was built, and are computed otherwise.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select

from csra.jobctx import JobContext
from csra.memory import embedder, from_blob, group_keys
from csra.profile import Profile
from csra.settings import get_settings
from csra.specs import Grounding
from db.models import Dataset, MemoryEntry
from db.session import session_scope
from ml.inference.types import GenerationResult
from ml.memory.embedder import DIM
from ml.memory.grounding import allowed_slots, choose_answers, outside_contract
from ml.memory.memory import AnswerMemory, Entry, Hit
from ml.sampling import stratified_sample

logger = logging.getLogger(__name__)

TOP = 8  # neighbours kept per example: enough for any grounding k and the placeholder contract
CONTRACT_K = 3  # the exemplars whose placeholders are allowed (and the agent sees) by default


REPLY_SAMPLE = 2000  # training replies that judge a reply's intent: stratified by intent, about 75 per intent


def _stored_vectors(dataset_id: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The vectors a memory rebuild of this dataset stored (example id -> message, reply vector)."""
    with session_scope() as s:
        rows = s.execute(select(MemoryEntry.example_id, MemoryEntry.message_vec, MemoryEntry.reply_vec)
                         .where(MemoryEntry.dataset_id == dataset_id, MemoryEntry.removed_at.is_(None))).all()
    return {int(r.example_id): (from_blob(r.message_vec), from_blob(r.reply_vec)) for r in rows
            if r.example_id is not None}


class VectorCache:
    """A dataset's message and reply vectors on disk (``$CSRA_DATA_DIR/vectors/dataset-<id>-<created>.npz``).

    Embedding a whole train split takes minutes on two cores; evaluations and grounded training
    runs of the same dataset (whose rows never change after import) compute it once. Written
    atomically; a file that cannot be read is recomputed.
    """

    def __init__(self, dataset_id: int) -> None:
        with session_scope() as s:  # named by creation time too: a reused id never finds another's vectors
            made = s.scalar(select(Dataset.created_at).where(Dataset.id == dataset_id))
        stamp = made.strftime("%Y%m%dT%H%M%S%f") if made else "unknown"
        self.path = get_settings().data_dir / "vectors" / f"dataset-{dataset_id}-{stamp}.npz"
        self.messages: dict[int, np.ndarray] = {}
        self.replies: dict[int, np.ndarray] = {}
        try:
            with np.load(self.path) as f:
                self.messages = dict(zip(f["message_ids"].tolist(), f["message_vecs"], strict=True))
                self.replies = dict(zip(f["reply_ids"].tolist(), f["reply_vecs"], strict=True))
        except (OSError, KeyError, ValueError):
            pass

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}.npz")

        def stack(d: dict[int, np.ndarray]) -> np.ndarray:
            return np.stack(list(d.values())) if d else np.zeros((0, DIM), dtype=np.float32)

        np.savez(tmp, message_ids=np.array(list(self.messages), dtype=np.int64), message_vecs=stack(self.messages),
                 reply_ids=np.array(list(self.replies), dtype=np.int64), reply_vecs=stack(self.replies))
        os.replace(tmp, self.path)


def split_memory(dataset_id: int, train_rows: list[dict[str, Any]], ctx: JobContext | None = None
                 ) -> tuple[AnswerMemory, np.ndarray]:
    """The train split as an exact-search memory (keys: example ids) and its message vectors.

    Every row's message is indexed (the nearest answers); the replies index, which judges a
    generated reply's intent, holds a stratified sample of ``REPLY_SAMPLE`` replies. Vectors come
    from the dataset's memory entries when it was built, else from the cache, else are computed.
    """
    cache = VectorCache(dataset_id)
    for example_id, (m, r) in _stored_vectors(dataset_id).items():
        cache.messages.setdefault(example_id, m)
        cache.replies.setdefault(example_id, r)
    judges = stratified_sample(train_rows, REPLY_SAMPLE, seed=0)
    todo_m = [r for r in train_rows if r["id"] not in cache.messages]
    todo_r = [r for r in judges if r["id"] not in cache.replies]
    if todo_m or todo_r:
        if ctx is not None:
            ctx.event("log", f"embedding {len(todo_m)} training messages and {len(todo_r)} replies of dataset "
                             f"{dataset_id} (once: kept in {cache.path.name})")
        model = embedder()
        cache.messages.update(zip([r["id"] for r in todo_m], model.embed([r["input"] for r in todo_m]), strict=True))
        cache.replies.update(zip([r["id"] for r in todo_r], model.embed_replies([r["output"] for r in todo_r]),
                                 strict=True))
        cache.save()
    keys = group_keys([r["input"] for r in train_rows])
    entries = [Entry(id=r["id"], message=r["input"], reply=r["output"], intent=r.get("intent") or "",
                     category=r.get("category") or "", group=key) for r, key in zip(train_rows, keys, strict=True)]
    message_vecs = np.stack([cache.messages[r["id"]] for r in train_rows])
    memory = AnswerMemory(exact=True)
    memory.add(entries, message_vecs, None)
    memory.add_replies([r["id"] for r in judges], np.stack([cache.replies[r["id"]] for r in judges]))
    return memory, message_vecs


def nearest(memory: AnswerMemory, vectors: np.ndarray, messages: list[str], k: int = TOP) -> list[list[Hit]]:
    """Each message's ``k`` nearest training answers, never from its own leakage group."""
    keys = group_keys(messages)
    return [memory.similar(v, k, exclude_group=key) for v, key in zip(vectors, keys, strict=True)]


@dataclass
class Neighbours:
    """The evaluated examples' nearest training answers, and the memory to judge replies with."""

    memory: AnswerMemory
    hits: list[list[Hit]]
    profile: Profile
    # (example, k, consensus_pool) -> its chosen answers: chosen once (a consensus costs up to 56 sentence
    # BLEUs) for its prompt or a consensus responder's reply, reused by the contract check
    _chosen: dict[tuple[int, int, int], list[Hit]] = field(default_factory=dict, repr=False)

    def _choose(self, i: int, k: int, consensus_pool: int) -> list[Hit]:
        key = (i, k, consensus_pool)
        if key not in self._chosen:
            self._chosen[key] = choose_answers(self.hits[i], k, consensus_pool)
        return self._chosen[key]

    def retrieved(self, consensus_pool: int = 0) -> list[GenerationResult]:
        """A retrieval responder's replies: each example's nearest training answer (``consensus_pool`` n:
        the one the n nearest agree on, ``choose_answers``)."""
        chosen = [self._choose(i, 1, consensus_pool) for i in range(len(self.hits))]
        return [GenerationResult(text=c[0].entry.reply if c else "", prompt_tokens=0, completion_tokens=0,
                                 finish_reason="retrieval", latency_ms=0.0, first_token_ms=None)
                for c in chosen]

    def exemplars(self, i: int, grounding: Grounding | None, consensus_pool: int = 0) -> list[str]:
        """The approved answers example ``i``'s reply stands on: a grounded model's prompt exemplars, else
        (the placeholder contract of an ungrounded model or retrieval) the ``CONTRACT_K`` nearest, and the
        answer a consensus responder (``consensus_pool``) chose."""
        if grounding is None:
            chosen = self._choose(i, 1, consensus_pool) if consensus_pool else []
            return [h.entry.reply for h in self.hits[i][:CONTRACT_K] + chosen]
        return [h.entry.reply for h in self._choose(i, grounding.k, grounding.consensus_pool)]

    def nearest_similarity(self, i: int) -> float | None:
        """How similar example ``i``'s message is to its nearest training message (None: no neighbours)."""
        return self.hits[i][0].similarity if self.hits[i] else None

    def judge(self, predictions: list[str], grounding: Grounding | None, consensus_pool: int = 0
              ) -> list[dict[str, Any]]:
        """Per reply: ``intent_match`` (the intent its nearest training replies vote for, as the
        predicted intent) and ``slots_outside_contract`` (a placeholder neither the profile nor the
        exemplars know). ``intent_match`` is filled in by the caller, who knows the true intent."""
        vectors = embedder().embed_replies([p or " " for p in predictions])
        out = []
        for i, (text, vec) in enumerate(zip(predictions, vectors, strict=True)):
            guess = self.memory.intent_of_reply(vec)
            foreign = outside_contract(text, allowed_slots(self.profile, self.exemplars(i, grounding, consensus_pool)))
            out.append({"reply_intent": guess.intent if guess else None, "slots_outside_contract": bool(foreign),
                        "foreign_slots": foreign})
        return out


def neighbours_for(dataset_id: int, train_rows: list[dict[str, Any]], examples: list[dict[str, Any]],
                   profile: Profile, ctx: JobContext) -> Neighbours:
    memory, _ = split_memory(dataset_id, train_rows, ctx)
    vectors = embedder().embed([e["input"] for e in examples])
    return Neighbours(memory, nearest(memory, vectors, [e["input"] for e in examples]), profile)
