"""The caller, as ``GET /me`` shows it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class CallerPublic(BaseModel):
    name: str | None = Field(description="the key's name (the owner of what it makes); null while keys are off")
    role: Literal["admin", "agent"]
    keys_on: bool = Field(description="whether the API checks keys (CSRA_API_KEY is set)")
