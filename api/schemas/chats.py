"""Chats, their messages, feedback and what posting a message answers."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.schemas.common import OWNER_HELP, Public
from api.schemas.jobs import JobPublic
from csra.specs import GenerationOverrides, GenerationSettings

ExportFormat = Literal["jsonl", "csv", "txt", "md"]


class ChatSettings(GenerationSettings):
    model_id: str = "baseline"


class ChatCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field("New chat", min_length=1, max_length=200)
    settings: ChatSettings = Field(default_factory=ChatSettings)


class ChatUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str | None = Field(None, min_length=1, max_length=200)
    settings: ChatSettings | None = None


class MessageCreate(GenerationOverrides):
    """A customer message; any generation setting given here overrides the chat's for this reply."""

    content: str
    model_id: str | None = None


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rating: Literal["up", "down"]
    corrected_reply: str | None = Field(None, max_length=20_000)


class MessagePublic(Public):
    id: int
    chat_id: int
    role: str
    content: str
    raw_content: str | None = None
    model_name: str | None = None
    settings: dict[str, Any] | None = None
    status: str  # pending | done | failed | cancelled
    error: str | None = None
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    feedback: str | None = None
    corrected_reply: str | None = None
    job_id: int | None = None
    intent: str | None = None  # the customer message's intent, predicted from the answer memory
    intent_confidence: float | None = None
    similar: list[dict[str, Any]] | None = None  # approved answers to the most similar messages
    slot_warnings: list[str] | None = None  # placeholders outside the contract (profile + exemplars)
    memory_entry_id: int | None = None  # the memory entry this reply's approval made
    # a grounded reply: held to its approved answers (True), or the model's own words because no approved
    # answer's message is close to the customer's (False); None: not grounded
    follows_approved: bool | None = None
    created_at: datetime


class ChatPublic(Public):
    id: int
    title: str
    settings: dict[str, Any]
    owner: str | None = Field(None, description=OWNER_HELP)
    created_at: datetime
    updated_at: datetime
    messages: list[MessagePublic] = Field(default_factory=list)


class ChatsPublic(BaseModel):
    data: list[ChatPublic]
    count: int


class MessageAccepted(BaseModel):
    user_message: MessagePublic
    assistant_message: MessagePublic
    job: JobPublic
