"""The answer memory: a team's approved answers (a dataset's train split, approved chat replies)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Response

from api.deps import Admin, Agent, DbSession
from api.params import IdPath, Limit, Offset
from api.roles import RoleRoute
from api.schemas.jobs import JobPublic
from api.schemas.memory import MemoryEntries, MemoryEntryPublic, MemoryRebuild, MemorySearch, MemoryStats
from api.services import memory
from db.models import Job

router = APIRouter(route_class=RoleRoute, prefix="/memory", tags=["memory"])


@router.get("", response_model=MemoryStats)
def memory_stats(db: DbSession, caller: Agent) -> MemoryStats:
    return memory.stats(db)


@router.post("/rebuild", status_code=202, response_model=JobPublic)
def rebuild_memory(body: MemoryRebuild, db: DbSession, caller: Admin) -> Job:
    """Replace the memory's answers from a dataset's train split with fresh embeddings (a job)."""
    return memory.rebuild(db, body.dataset_id, caller)


@router.get("/search", response_model=MemorySearch)
def search_memory(db: DbSession, caller: Agent, q: str = Query(..., max_length=4000),
                  k: int = Query(5, ge=1, le=50)) -> MemorySearch:
    """Approved answers to the most similar customer messages, with similarity, intent and source."""
    return memory.search(db, q, k)


@router.get("/entries", response_model=MemoryEntries)
def list_entries(db: DbSession, caller: Admin, source: Literal["dataset", "chat"] | None = None,
                 limit: Limit = 50, offset: Offset = 0) -> MemoryEntries:
    rows, count = memory.entries(db, source, limit, offset)
    return MemoryEntries(data=[MemoryEntryPublic.model_validate(r) for r in rows], count=count)


@router.delete("/entries/{entry_id}", status_code=204)
def remove_entry(entry_id: IdPath, db: DbSession, caller: Admin) -> Response:
    """Remove an answer (a wrong approval); it stops being found within a second everywhere."""
    memory.remove(db, entry_id)
    return Response(status_code=204)
