"""Evaluations: metrics per model, the evaluated sample's make-up."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from api.schemas.common import OWNER_HELP, Public


class EvaluationPublic(Public):
    id: int
    job_id: int | None
    dataset_id: int | None
    split: str
    status: str
    params: dict[str, Any]
    metrics: dict[str, Any] | None
    sample: dict[str, Any] | None = None
    owner: str | None = Field(None, description=OWNER_HELP)
    created_at: datetime


class EvaluationsPublic(BaseModel):
    data: list[EvaluationPublic]
    count: int
