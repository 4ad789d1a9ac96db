"""What every schema shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Public(BaseModel):
    """A response read from an ORM row."""

    model_config = ConfigDict(from_attributes=True)
