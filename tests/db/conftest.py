"""An empty database of each kind for the tests here."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

_fresh = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.db'}"
    return str(request.getfixturevalue("postgres").create_database(f"test_db_{next(_fresh)}"))
