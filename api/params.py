"""Query and path parameter types the routes share: every number bounded before it reaches SQL."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from fastapi import Path, Query
from pydantic import BeforeValidator

from db.ids import MAX_ID

MAX_LIMIT = 500

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"page size (1..{MAX_LIMIT})")]
Offset = Annotated[int, Query(ge=0, le=MAX_ID, description="rows to skip")]
IdQuery = Annotated[int, Query(ge=1, le=MAX_ID)]
IdPath = Annotated[int, Path(ge=1, le=MAX_ID)]
After = Annotated[int, Query(ge=0, le=MAX_ID, description="only events with a larger id (for incremental polling)")]


def _not_a_number(value: object) -> object:
    """Refuse ``since=0.5``: pydantic would read a bare number as seconds since 1970."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        raise ValueError("give a date or date-time such as 2026-01-31 or 2026-01-31T12:00:00Z, not a number")
    return value


_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
Since = Annotated[datetime | None, BeforeValidator(_not_a_number),
                  Query(description="only chats updated at or after this ISO 8601 date or date-time")]
