"""A transient failure (the model store briefly unreachable) goes back to the queue while the job has
attempts left, then fails with its message. Real SQLite database and a real redis-server (the queue)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csra.jobctx import JobError
from db import jobs
from db.models import Job
from models_store.remote import ModelStoreError
from tests.stack import RedisServer


@pytest.fixture()
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from csra.queue import get_celery
    from csra.redis_conn import get_redis
    from csra.settings import get_settings
    from db import migrate
    from db.session import get_engine, get_sessionmaker

    server = RedisServer(tmp_path / "redis")
    server.start()
    monkeypatch.setenv("CSRA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CSRA_REDIS_URL", server.url)
    monkeypatch.setenv("CSRA_MAX_ATTEMPTS", "2")
    caches = [get_settings, get_engine, get_sessionmaker, get_redis, get_celery]
    for f in caches:
        f.cache_clear()  # type: ignore[attr-defined]
    migrate.upgrade()
    try:
        yield
    finally:
        get_engine().dispose()
        for f in caches:
            f.cache_clear()  # type: ignore[attr-defined]
        server.stop()


def _job() -> int:
    from db.session import session_scope

    with session_scope() as s:
        return jobs.new_job(s, "evaluate", {"model_ids": ["m"]}).id


def _row(job_id: int) -> Job:
    from db.session import session_scope

    with session_scope() as s:
        job = s.get(Job, job_id)
        s.expunge(job)
        return job


def _unreachable(*_: Any) -> dict[str, Any]:
    raise ModelStoreError("the model store file:///mnt/gone (CSRA_MODEL_STORE_URL) is unreachable")


def test_a_store_failure_is_retried_then_fails_with_its_message(db) -> None:
    from workers.runner import execute

    job_id = _job()
    execute(job_id, "evaluate", _unreachable)
    job = _row(job_id)
    assert job.status == "queued" and job.attempts == 1 and job.worker is None
    assert job.stage.startswith("retrying in 5 s") and "CSRA_MODEL_STORE_URL" in job.stage

    execute(job_id, "evaluate", _unreachable)  # the second (last) attempt fails for good
    job = _row(job_id)
    assert job.status == "failed" and job.attempts == 2
    assert "CSRA_MODEL_STORE_URL" in (job.error or "")


def test_a_store_that_comes_back_lets_the_retry_succeed(db) -> None:
    from workers.runner import execute

    job_id = _job()
    execute(job_id, "evaluate", _unreachable)
    execute(job_id, "evaluate", lambda *_: {"ok": True})
    job = _row(job_id)
    assert job.status == "succeeded" and job.attempts == 2 and job.result["ok"] is True


def test_other_job_errors_are_not_retried(db) -> None:
    from workers.runner import execute

    def bad_input(*_: Any) -> dict[str, Any]:
        raise JobError("dataset 7 has no test split")

    job_id = _job()
    execute(job_id, "evaluate", bad_input)
    job = _row(job_id)
    assert job.status == "failed" and job.attempts == 1 and job.error == "dataset 7 has no test split"
