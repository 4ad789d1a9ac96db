"""The model store."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from api.schemas.common import OWNER_HELP, Public


class ModelPublic(Public):
    id: int
    name: str
    kind: str
    base_model: str | None = None
    architecture: str | None = None
    model_type: str | None = None
    parameter_count: int | None = None
    size_bytes: int | None = None
    content_hash: str | None = None
    train_job_id: int | None = None
    dataset_id: int | None = None
    training_config: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    owner: str | None = Field(None, description=OWNER_HELP)
    created_at: datetime


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int
