"""The answer memory over HTTP: search it, rebuild it from a dataset, add approved replies, remove entries."""

from __future__ import annotations

from fastapi import HTTPException
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.schemas.memory import MemoryHit, MemorySearch, MemoryStats
from api.services import jobs
from api.services.access import Caller
from csra.memory import INTENT_VOTERS, MemoryNotBuilt, add_entries, embedder, group_key, serving_memory, vote
from db.base import utcnow
from db.jobs import JobKind
from db.models import ChatMessage, Dataset, DatasetStatus, Job, MemoryEntry


def search(db: Session, query: str, k: int) -> MemorySearch:
    """The approved answers to the ``k`` customer messages most similar to ``query``, best first."""
    if not query.strip():
        raise HTTPException(status_code=422, detail="the search query is empty")
    memory = serving_memory().searchable()
    hits = memory.similar(embedder().embed([query])[0], k)
    rows = {r.id: r for r in db.scalars(select(MemoryEntry).where(MemoryEntry.id.in_([h.entry.id for h in hits]),
                                                                  MemoryEntry.removed_at.is_(None)))}
    guess = vote(hits[:INTENT_VOTERS])
    data = [MemoryHit.model_validate({**_public(rows[h.entry.id]), "similarity": round(h.similarity, 4)})
            for h in hits if h.entry.id in rows]
    return MemorySearch(query=query, intent=guess.intent if guess else None,
                        intent_confidence=guess.confidence if guess else None, data=data)


def _public(row: MemoryEntry) -> dict[str, object]:
    return {c: getattr(row, c) for c in ("id", "message", "reply", "intent", "category", "source", "dataset_id",
                                         "chat_message_id", "created_at")}


def rebuild(db: Session, dataset_id: int, caller: Caller) -> Job:
    ds = db.get(Dataset, dataset_id)
    if ds is None:
        raise HTTPException(status_code=422, detail=f"dataset {dataset_id} does not exist")
    if ds.status != DatasetStatus.READY:
        raise HTTPException(status_code=422, detail=f"dataset {dataset_id} is {ds.status}, not ready")
    # two rebuilds of one dataset would swap each other's half-written answers in and out
    running = db.scalar(select(Job.id).where(Job.kind == JobKind.MEMORY, Job.dataset_id == dataset_id,
                                             Job.status.in_(("queued", "running"))))
    if running is not None:
        raise HTTPException(status_code=409, detail=f"the memory of dataset {dataset_id} is already being rebuilt "
                                                    f"by job {running}; wait for it (GET /jobs/{running})")
    return jobs.submit(db, JobKind.MEMORY, {"dataset_id": dataset_id}, caller=caller, dataset_id=dataset_id)


def stats(db: Session) -> MemoryStats:
    live = select(MemoryEntry).where(MemoryEntry.removed_at.is_(None))
    by_source = dict(db.execute(select(MemoryEntry.source, func.count()).where(MemoryEntry.removed_at.is_(None))
                                .group_by(MemoryEntry.source)).all())
    datasets = db.scalars(select(MemoryEntry.dataset_id).where(MemoryEntry.removed_at.is_(None),
                                                               MemoryEntry.dataset_id.is_not(None)).distinct())
    try:
        embedder()
        ready = True
    except MemoryNotBuilt:
        ready = False
    return MemoryStats(entries=db.scalar(select(func.count()).select_from(live.subquery())) or 0,
                       by_source=by_source, datasets=sorted(d for d in datasets if d is not None),
                       embedder_ready=ready)


def remove(db: Session, entry_id: int) -> None:
    """Drop an entry (a wrong approval); its row stays marked removed so every index drops it too."""
    row = db.get(MemoryEntry, entry_id)
    if row is None:
        raise HTTPException(status_code=404, detail=f"memory entry {entry_id} not found")
    if row.removed_at is not None:
        raise HTTPException(status_code=404, detail=f"memory entry {entry_id} was already removed")
    row.removed_at = utcnow()
    for msg in db.scalars(select(ChatMessage).where(ChatMessage.memory_entry_id == entry_id)):
        msg.memory_entry_id = None
    db.commit()


def approve(db: Session, reply: ChatMessage, text: str) -> MemoryEntry | None:
    """Add an agent-approved answer (the reply as it is, or as corrected) to the memory, searchable at once.

    Its customer message is the user turn the reply answers. A reply approved again replaces its
    earlier entry.
    """
    question = db.scalar(select(ChatMessage).where(ChatMessage.chat_id == reply.chat_id, ChatMessage.role == "user",
                                                   ChatMessage.id < reply.id).order_by(ChatMessage.id.desc()))
    if question is None:
        raise HTTPException(status_code=409, detail=f"message {reply.id} answers no customer message")
    try:
        model = embedder()
        message_vec, reply_vec = model.embed([question.content]), model.embed_replies([text])
    except MemoryNotBuilt:
        # the feedback is still recorded; the answer joins the memory once it is built (a rebuild
        # takes the dataset only, so the reply's memory_entry_id stays empty to say so)
        return None
    withdraw(db, reply)  # an earlier approval of this reply is replaced
    (entry,) = add_entries(db, [{"message": question.content, "reply": text, "intent": reply.intent or "",
                                 "source": "chat", "chat_message_id": reply.id,
                                 "group_key": group_key(question.content)}],
                           message_vec, reply_vec)
    reply.memory_entry_id = entry.id
    return entry


def withdraw(db: Session, reply: ChatMessage) -> None:
    """A reply rated down after it was approved leaves the memory."""
    if reply.memory_entry_id is not None:
        old = db.get(MemoryEntry, reply.memory_entry_id)
        if old is not None and old.removed_at is None:
            old.removed_at = utcnow()
        reply.memory_entry_id = None


def entries(db: Session, source: str | None, limit: int, offset: int) -> tuple[list[MemoryEntry], int]:
    q = select(MemoryEntry).where(MemoryEntry.removed_at.is_(None))
    if source:
        q = q.where(MemoryEntry.source == source)
    count = db.scalar(select(func.count()).select_from(q.subquery())) or 0
    return list(db.scalars(q.order_by(MemoryEntry.id.desc()).limit(limit).offset(offset))), count
