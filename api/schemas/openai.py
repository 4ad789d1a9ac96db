"""The OpenAI-compatible request bodies (chat completions, fine-tuning jobs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from csra.specs import MaxNewTokens, Temperature, Tone, TopP


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # the client sends fields csra ignores (n=1, user, ...)
    model: str
    messages: list[ChatMessageIn] = Field(..., min_length=1)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: MaxNewTokens | None = None
    max_completion_tokens: MaxNewTokens | None = None
    seed: int | None = None
    stream: bool = False
    # csra extensions (pass with extra_body=...)
    tone: Tone = "neutral"
    ask_details_only_if_relevant: bool = True


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="ignore")
    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"


class FineTuneCreate(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = "baseline"
    training_file: str = Field(..., description="a csra dataset id ('3' or 'ds-3')")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    suffix: str | None = Field(None, max_length=40)
    seed: int | None = None
    validation_file: str | None = None
