"""Alembic environment: the URL comes from csra settings (or the Config's sqlalchemy.url)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

from db import models  # noqa: F401  (registers the tables on Base.metadata)
from db.base import Base
from db.session import make_engine

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from csra.settings import get_settings

    return get_settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        # render_as_batch: SQLite can only ALTER tables by copying them; batch mode does that.
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
