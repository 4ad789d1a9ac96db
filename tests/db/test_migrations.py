"""The schema comes from Alembic: upgrade an empty database to head and back down, on SQLite and on
PostgreSQL (a throw-away server, tests/stack.py PostgresServer), every revision one step at a time."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from db import (
    migrate,
    models,  # noqa: F401
)
from db.base import Base

TABLES = {"datasets", "dataset_examples", "jobs", "job_events", "models", "chat_sessions", "chat_messages",
          "evaluations", "evaluation_examples", "app_settings"}


def _revisions() -> list[str]:
    script = ScriptDirectory.from_config(migrate.alembic_config())
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def test_upgrade_to_head_and_back_down(url):
    migrate.upgrade(url)
    engine = create_engine(url)
    assert TABLES <= set(inspect(engine).get_table_names())
    migrate.downgrade(url, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    migrate.upgrade(url)
    assert TABLES <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_every_revision_downgrades_and_upgrades_again(url):
    """Each step down and up again, at every revision: a downgrade that breaks on one database shows here."""
    revisions = _revisions()
    assert revisions[0] == "0001" and len(revisions) >= 7
    for below, rev in zip(["base", *revisions], revisions, strict=False):
        migrate.upgrade(url, rev)
        migrate.downgrade(url, below)
        migrate.upgrade(url, rev)
    engine = create_engine(url)
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == revisions[-1]
    engine.dispose()


def test_migrations_match_the_orm_models(url):
    """A model change without a migration fails here (alembic autogenerate finds a diff)."""
    migrate.upgrade(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_0006_keeps_evaluation_examples_both_ways_and_clears_key_fingerprints(url):
    """0006 adds owners: up and back down keeps every stored prediction (a copy-and-rename of
    ``evaluations`` would cascade into them), and the old single key's fingerprints stop being owners."""
    from sqlalchemy import text

    migrate.upgrade(url, "0005")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO jobs (id, kind, queue, status, params, progress, stage, attempts, "
                          "cancel_requested, owner, created_at) VALUES (1, 'evaluate', 'train', 'succeeded', '{}', "
                          "1, 'done', 1, false, '0123456789abcdef', '2026-01-01')"))
        conn.execute(text("INSERT INTO evaluations (id, job_id, split, params, status, created_at) "
                          "VALUES (1, 1, 'test', '{}', 'done', '2026-01-01')"))
        conn.execute(text("INSERT INTO evaluation_examples (evaluation_id, model_name, intent, category, prompt, "
                          "reference, prediction, scores) VALUES (1, 'm', '', '', 'p', 'r', 'x', '{}')"))

    def count() -> int:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM evaluation_examples")).scalar_one()

    migrate.upgrade(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT owner FROM jobs")).scalar_one() is None
    assert count() == 1
    migrate.downgrade(url, "0005")
    assert count() == 1
    engine.dispose()
