"""Datasets and their examples."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_serializer

from api.schemas.common import OWNER_HELP, Public
from api.schemas.jobs import JobPublic
from csra.specs import ImportSpec

NAME_MAX = 200


class DatasetCreate(BaseModel):
    """Import from a server-side file or a Hugging Face dataset id."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=NAME_MAX)
    source: str = Field(
        ...,
        min_length=1,
        max_length=4096,
        description="a server-side path under an allowed import folder, or a Hugging Face dataset id "
        "(e.g. 'bitext/Bitext-customer-support-llm-chatbot-training-dataset'; prefix 'hf:' to force)",
    )
    options: ImportSpec = Field(default_factory=ImportSpec)


class DatasetPublic(Public):
    id: int
    name: str
    source: str
    status: str
    error: str | None = None
    options: dict[str, Any]
    stats: dict[str, Any] | None = None
    row_count: int
    owner: str | None = Field(None, description=OWNER_HELP)
    created_at: datetime
    updated_at: datetime

    @field_serializer("source")
    def _source(self, source: str) -> str:
        """An upload as ``upload:<file name>``: its server path (data dir, other users' folders) is not shown."""
        scheme, _, value = source.partition(":")
        return f"upload:{value.replace(chr(92), '/').rsplit('/', 1)[-1]}" if scheme == "upload" else source


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


class DatasetCreated(BaseModel):
    dataset: DatasetPublic
    job: JobPublic


class ExamplePublic(Public):
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
