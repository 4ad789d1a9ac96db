"""Jobs and their events."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, computed_field

from api.schemas.common import OWNER_HELP, Public
from db.jobs import TERMINAL


class JobPublic(Public):
    id: int
    kind: str
    queue: str
    status: str
    params: dict[str, Any]
    progress: float
    stage: str
    eta_seconds: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    attempts: int
    cancel_requested: bool
    worker: str | None = None
    created_at: datetime
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    finished_at: datetime | None = None
    parent_id: int | None = None
    dataset_id: int | None = None
    owner: str | None = Field(None, description=OWNER_HELP)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def finished(self) -> bool:
        """The job ended (succeeded, failed or cancelled): clients poll until this is true."""
        return self.status in TERMINAL


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class JobEventPublic(Public):
    id: int
    job_id: int
    ts: datetime
    kind: str
    message: str
    data: dict[str, Any] | None = None


class JobEventsPublic(BaseModel):
    data: list[JobEventPublic]
    count: int
