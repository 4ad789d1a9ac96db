"""Declarative base and shared column types: the same values on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, String, Text, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase

# Row ids: BIGINT on PostgreSQL (db.ids.MAX_ID, 2**63-1, as on SQLite); SQLite's 64-bit rowid needs the
# column spelled INTEGER to be one
Id = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops tzinfo otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def _pg_text(value: str | None, dialect: Dialect) -> str | None:
    """PostgreSQL text cannot hold NUL characters (SQLite can): store U+FFFD in their place there."""
    if value is not None and dialect.name == "postgresql" and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


class Str(TypeDecorator[str]):
    """VARCHAR(length) that holds what it says on both databases: a longer value is cut to ``length``
    (SQLite would keep it whole, PostgreSQL would refuse the row); NUL as in ``Txt``."""

    impl = String
    cache_ok = True

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.max_length = length

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if isinstance(value, str) and len(value) > self.max_length:
            value = value[: self.max_length]
        return _pg_text(value, dialect)


class Txt(TypeDecorator[str]):
    """TEXT; a NUL character is stored as U+FFFD on PostgreSQL, whose text type cannot hold it."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return _pg_text(value, dialect)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict: JSON, list: JSON}
