"""Engine and session factory, created lazily once per process (no work at import time).

SQLite (the default) and PostgreSQL (``CSRA_DATABASE_URL=postgresql+psycopg://user:pass@host/db``) get
the same pool size, one per FastAPI thread; each its own connection settings.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url, pool, text
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from csra.settings import get_settings

# as many pooled connections as FastAPI has threads: a fresh connection costs ~0.3 ms on SQLite, a few
# ms on PostgreSQL
POOL = {"pool_size": 20, "max_overflow": 20, "pool_timeout": 10}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer (API polls while workers write)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_dumps(value: Any) -> str:
    """JSON for PostgreSQL, whose json type refuses NaN and Infinity (a diverged loss): stored as null."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False)


def make_engine(url: str, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
        if "poolclass" not in kwargs:
            kwargs.update(POOL)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.startswith("postgresql"):
        if "poolclass" not in kwargs:
            kwargs.update(POOL)
        # connect_timeout: an unreachable server fails in seconds, not at the OS's TCP timeout (minutes)
        return create_engine(url, pool_pre_ping=True, json_serializer=json_dumps,
                             connect_args={"connect_timeout": 10}, **kwargs)
    return create_engine(url, pool_pre_ping=True, **kwargs)


def shown_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a database URL)"


def database_problem(url: str) -> str | None:
    """Why this process cannot use the database at ``url`` (it is unreachable, refuses us, or the URL is
    wrong), naming the setting; None when a connection opens and answers."""
    where = f"CSRA_DATABASE_URL={shown_url(url)}"
    try:
        engine = make_engine(url, poolclass=pool.NullPool)
    except (ArgumentError, ImportError, OSError, ValueError) as e:
        return (f"cannot use the database {where} ({e}). Set CSRA_DATABASE_URL to a SQLAlchemy URL this "
                "process can open (sqlite:////writable/path/csra.db, postgresql+psycopg://user:pass@host/db).")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError) as e:
        reason = " ".join(line.strip() for line in str(getattr(e, "orig", None) or e).strip().splitlines()[:2])
        return (f"cannot reach the database {where} ({reason}). Check that the database server is running "
                "and that CSRA_DATABASE_URL points at it.")
    finally:
        engine.dispose()
    return None


def write_lock(session: Session) -> None:
    """Make what this transaction reads next stay true until it commits, where rows cannot be locked.

    SQLite has one write lock for the whole database, which a transaction takes at its first write: a
    row read before that may be changed by another writer in between. ``BEGIN IMMEDIATE`` takes the
    lock first (waiting up to busy_timeout). PostgreSQL locks rows instead (``SELECT ... FOR UPDATE``,
    which SQLite ignores): nothing to do here. Call it first in the transaction.
    """
    conn = session.connection()
    if conn.dialect.name == "sqlite" and not conn.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
        conn.exec_driver_sql("BEGIN IMMEDIATE")


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    return make_engine(get_settings().database_url)


def _fresh_pool_after_fork() -> None:
    """A forked process (a Celery pool process) opens its own connections: one socket used by two
    processes corrupts both sessions. ``close=False`` leaves the parent's connections open for the
    parent (SQLAlchemy's recipe for multiprocessing)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)


os.register_at_fork(after_in_child=_fresh_pool_after_fork)


@lru_cache(maxsize=1)
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A transaction: commits on success, rolls back on error (``with session_scope() as s:``)."""
    with get_sessionmaker().begin() as session:
        yield session
