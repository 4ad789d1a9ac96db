"""The answer memory: entries, search results, rebuilds."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from api.schemas.common import Public


class MemoryRebuild(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset_id: int


class MemoryEntryPublic(Public):
    id: int
    message: str
    reply: str
    intent: str
    category: str
    source: str
    dataset_id: int | None = None
    chat_message_id: int | None = None
    created_at: datetime


class MemoryHit(MemoryEntryPublic):
    similarity: float


class MemorySearch(BaseModel):
    query: str
    intent: str | None = None
    intent_confidence: float | None = None
    data: list[MemoryHit]


class MemoryEntries(BaseModel):
    data: list[MemoryEntryPublic]
    count: int


class MemoryStats(BaseModel):
    entries: int
    by_source: dict[str, int]
    datasets: list[int]
    embedder_ready: bool
