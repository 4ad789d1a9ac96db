"""The model store."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

from api.schemas.common import OWNER_HELP, Public
from csra.specs import GgufQuantization, served_grounding


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
    reply_settings: dict[str, Any] | None = Field(None, description="a grounded model's reply settings set "
                                                  "after training (PUT /models/{ref}/reply-settings)")
    metrics: dict[str, Any] | None = None
    owner: str | None = Field(None, description=OWNER_HELP)
    created_at: datetime

    @computed_field(description="what a grounded model replies with: training_config's grounding with the reply "
                    "settings in place of the trained values (null: not grounded)")
    def grounding(self) -> dict[str, Any] | None:
        trained = (self.training_config or {}).get("grounding")
        return served_grounding(trained, self.reply_settings)


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["gguf"] = Field("gguf", description="GGUF: llama.cpp, Ollama, LM Studio")
    quantization: GgufQuantization = Field("f16", description=(
        "f16 (exact), bf16 (the fastest on CPUs with AVX512_BF16, where llama.cpp was built for them), q8_0, "
        "q4_k_m or q4_0 (smaller, approximate; q4_0 decodes fastest in batches on x86)"))


class ModelFile(BaseModel):
    name: str
    size_bytes: int
    url: str = Field(description="where to download it (same key)")


class ModelFiles(BaseModel):
    data: list[ModelFile]
    count: int


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int
