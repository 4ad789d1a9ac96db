"""API response and request schemas (``XCreate`` / ``XPublic`` / ``XsPublic{data,count}``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field

from csra.specs import ImportSpec
from db.models import TERMINAL


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class JobPublic(_Public):
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

    @computed_field  # type: ignore[prop-decorator]
    @property
    def finished(self) -> bool:
        """The job ended (succeeded, failed or cancelled): clients poll until this is true."""
        return self.status in TERMINAL


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class JobEventPublic(_Public):
    id: int
    job_id: int
    ts: datetime
    kind: str
    message: str
    data: dict[str, Any] | None = None


class JobEventsPublic(BaseModel):
    data: list[JobEventPublic]
    count: int


class DatasetCreate(BaseModel):
    """Import from a server-side file or a Hugging Face dataset id."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=200)
    source: str = Field(
        ...,
        min_length=1,
        description="a server-side path under an allowed import folder, or a Hugging Face dataset id "
        "(e.g. 'bitext/Bitext-customer-support-llm-chatbot-training-dataset'; prefix 'hf:' to force)",
    )
    options: ImportSpec = Field(default_factory=ImportSpec)


class DatasetPublic(_Public):
    id: int
    name: str
    source: str
    status: str
    error: str | None = None
    options: dict[str, Any]
    stats: dict[str, Any] | None = None
    row_count: int
    created_at: datetime
    updated_at: datetime


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


class DatasetCreated(BaseModel):
    dataset: DatasetPublic
    job: JobPublic


class ExamplePublic(_Public):
    id: int
    split: str
    instruction: str
    input: str
    output: str
    intent: str
    category: str
    flags: str


class ExamplesPublic(BaseModel):
    data: list[ExamplePublic]
    count: int


class ModelPublic(_Public):
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
    created_at: datetime


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int
