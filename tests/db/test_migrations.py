"""The schema comes from Alembic: upgrade an empty database to head and back down."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from db import (
    migrate,
    models,  # noqa: F401
)
from db.base import Base

TABLES = {"datasets", "dataset_examples", "jobs", "job_events", "models", "chat_sessions", "chat_messages",
          "evaluations", "evaluation_examples", "app_settings"}


def test_upgrade_to_head_and_back_down(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrate.upgrade(url)
    engine = create_engine(url)
    assert TABLES <= set(inspect(engine).get_table_names())
    migrate.downgrade(url, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    migrate.upgrade(url)
    assert TABLES <= set(inspect(engine).get_table_names())


def test_migrations_match_the_orm_models(tmp_path):
    """A model change without a migration fails here (alembic autogenerate finds a diff)."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrate.upgrade(url)
    with create_engine(url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
