"""Row ids as the database stores them (SQLite and PostgreSQL BIGINT: at most 2**63-1)."""

from __future__ import annotations

import re

MAX_ID = 2**63 - 1
_DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII digits only: str.isdigit() also accepts '²', which int() refuses


def parse_id(text: str) -> int | None:
    """The id ``text`` spells (``"42"`` -> 42), or None for anything else, an out-of-range number included."""
    if not _DIGITS.fullmatch(text):
        return None
    value = int(text)
    return value if value <= MAX_ID else None
