"""Memory jobs: (re)build the answer memory from a dataset's train split.

The entries of that dataset are replaced without a gap and without loss: the new ones are stored
(in chunks, so no long transaction holds the database) marked pending, hidden from every search;
then one transaction marks the old ones removed (so every process's index drops them) and the new
ones live. A rebuild that fails or is cancelled leaves the memory as it was; its pending rows are
dropped by the next one. The embedding model is exported to ONNX first if it is not yet.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import delete, update

from csra.jobctx import JobContext
from csra.memory import add_entries, embedder, group_keys
from csra.settings import get_settings
from db.base import utcnow
from db.models import MEMORY_PENDING as PENDING
from db.models import MemoryEntry
from db.session import session_scope
from workers.handlers.training import load_split

logger = logging.getLogger(__name__)

CHUNK = 256


def ensure_embedder() -> None:
    """Export the shipped MiniLM to ONNX once (torch is needed for that; this runs in a worker)."""
    from ml.memory.export import export_embedder
    from ml.metrics import embedding_model_dir

    export_embedder(embedding_model_dir(), get_settings().embedder_dir)
    embedder.cache_clear()


def handle_memory_rebuild(job_id: int, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    dataset_id = int(params["dataset_id"])
    ctx.progress(0.01, "preparing the embedding model")
    ensure_embedder()
    rows = load_split(dataset_id, "train")
    keys = group_keys([r["input"] for r in rows])
    with session_scope() as s:  # leftovers of a rebuild that did not finish
        s.execute(delete(MemoryEntry).where(MemoryEntry.dataset_id == dataset_id, MemoryEntry.removed_at == PENDING))
    model = embedder()
    stored = 0
    for start in range(0, len(rows), CHUNK):
        ctx.check_cancelled()
        chunk = rows[start: start + CHUNK]
        messages = model.embed([r["input"] for r in chunk])
        replies = model.embed_replies([r["output"] for r in chunk])
        entries = [{"message": r["input"], "reply": r["output"], "intent": r.get("intent") or "",
                    "category": r.get("category") or "", "source": "dataset", "dataset_id": dataset_id,
                    "example_id": r["id"], "group_key": key, "removed_at": PENDING}
                   for r, key in zip(chunk, keys[start: start + CHUNK], strict=True)]
        with session_scope() as s:
            stored += len(add_entries(s, entries, messages, replies))
        ctx.progress(0.05 + 0.9 * stored / max(len(rows), 1), f"embedded {stored}/{len(rows)} answers")
    ctx.check_cancelled()
    with session_scope() as s:  # the swap, in one transaction: old out, new in
        removed = s.execute(update(MemoryEntry).where(MemoryEntry.dataset_id == dataset_id,
                                                      MemoryEntry.removed_at.is_(None))
                            .values(removed_at=utcnow())).rowcount  # type: ignore[attr-defined]
        s.execute(update(MemoryEntry).where(MemoryEntry.dataset_id == dataset_id, MemoryEntry.removed_at == PENDING)
                  .values(removed_at=None))
    ctx.event("log", f"answer memory: {stored} answers from dataset {dataset_id} (replaced {removed})")
    return {"dataset_id": dataset_id, "entries": stored, "replaced": removed}
