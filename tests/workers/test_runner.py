"""The runner's fence and the job state machine, against a real migrated SQLite database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from db import jobs
from db.models import ChatMessage, ChatSession, Dataset, DatasetExample, Job
from workers.context import Claim
from workers.runner import Outcome, record


@pytest.fixture()
def db(tmp_path, monkeypatch) -> Iterator[None]:
    from csra.settings import get_settings
    from db import migrate
    from db.session import get_engine, get_sessionmaker

    monkeypatch.setenv("CSRA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CSRA_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens: stream ends are best effort
    for f in (get_settings, get_engine, get_sessionmaker):
        f.cache_clear()
    migrate.upgrade()
    yield
    get_engine().dispose()
    for f in (get_settings, get_engine, get_sessionmaker):
        f.cache_clear()


def _running_reply(worker: str) -> tuple[int, int]:
    """A running generation that answers a chat's pending assistant turn: (job id, message id)."""
    from db.session import session_scope

    with session_scope() as s:
        chat = ChatSession(title="t", settings={})
        s.add(chat)
        s.flush()
        msg = ChatMessage(chat_id=chat.id, role="assistant", content="", status="pending")
        s.add(msg)
        s.flush()
        job = jobs.new_job(s, "generate", {"reply_to": {"chat_id": chat.id, "message_id": msg.id}})
        job.status, job.worker, job.attempts = "running", worker, 1
        msg.job_id = job.id
        return job.id, msg.id


def test_a_runner_that_lost_its_job_writes_neither_outcome_nor_chat_turn(db) -> None:
    from db.session import session_scope

    job_id, message_id = _running_reply(worker="host:2")  # re-claimed by another runner
    stale = Claim(job_id=job_id, attempt=1, worker="host:1", params={})
    assert not record(stale, Outcome("succeeded", result={"text": "late", "raw_text": "late"}))
    with session_scope() as s:
        assert s.get(Job, job_id).status == "running"
        assert s.get(ChatMessage, message_id).status == "pending"
    owner = Claim(job_id=job_id, attempt=1, worker="host:2", params={})
    assert record(owner, Outcome("succeeded", result={"text": "hello", "raw_text": "hello", "model": "m"}))
    with session_scope() as s:  # the outcome and the chat turn landed together
        assert s.get(Job, job_id).status == "succeeded"
        msg = s.get(ChatMessage, message_id)
        assert (msg.status, msg.content, msg.model_name) == ("done", "hello", "m")


@pytest.mark.parametrize(("status", "shown"), [("failed", "failed"), ("cancelled", "cancelled")])
def test_a_reply_that_did_not_succeed_marks_its_turn(db, status: str, shown: str) -> None:
    from db.session import session_scope

    job_id, message_id = _running_reply(worker="w:1")
    record(Claim(job_id=job_id, attempt=1, worker="w:1", params={}),
           Outcome(status, result={"text": "partial"} if status == "cancelled" else None,
                   error="boom" if status == "failed" else None))
    with session_scope() as s:
        msg = s.get(ChatMessage, message_id)
        assert msg.status == shown and msg.error
        assert msg.content == ("partial" if status == "cancelled" else "")


def test_the_state_machine_refuses_impossible_moves(db) -> None:
    from db.session import session_scope

    with session_scope() as s:
        job = jobs.new_job(s, "train", {})
        jobs.finish(s, job, "cancelled")
        with pytest.raises(jobs.IllegalTransition):
            jobs.finish(s, job, "succeeded")
        with pytest.raises(jobs.IllegalTransition):
            jobs.requeue(s, job, "again")


def test_cancelling_a_parent_cancels_its_unfinished_children(db) -> None:
    from db.session import session_scope

    with session_scope() as s:
        parent = jobs.new_job(s, "sweep", {})
        parent.status = "waiting"
        queued = jobs.new_job(s, "train", {}, parent_id=parent.id)
        running = jobs.new_job(s, "train", {}, parent_id=parent.id)
        running.status = "running"
        ended = jobs.request_cancel(s, parent)
        assert {j.id for j in ended} == {parent.id, queued.id}
        assert running.status == "running" and running.cancel_requested  # stops at its next step


def test_a_failed_import_leaves_no_examples(db) -> None:
    from db.session import session_scope

    with session_scope() as s:
        ds = Dataset(name="d", source="file:/x", options={})
        s.add(ds)
        s.flush()
        s.add(DatasetExample(dataset_id=ds.id, split="train", instruction="i", input="q", output="a"))
        job = jobs.new_job(s, "import", {"dataset_id": ds.id}, dataset_id=ds.id)
        job.status = "running"
        jobs.finish(s, job, "failed", error="the worker was lost")
        s.flush()
        assert ds.status == "failed" and ds.error == "the worker was lost" and ds.row_count == 0
        assert s.query(DatasetExample).filter_by(dataset_id=ds.id).count() == 0


def test_a_handler_that_cannot_be_imported_fails_its_job_with_the_import_error(db) -> None:
    """Not left queued for ever (as when a worker still running old code met a newer handler module)."""
    from db.session import session_scope
    from workers.runner import execute, imported

    with session_scope() as s:
        job_id = jobs.new_job(s, "evaluate", {}).id
    execute(job_id, "evaluate", imported("workers.handlers.no_such_module", "handle"))
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job.status == "failed" and "ModuleNotFoundError" in job.error and "no_such_module" in job.error
    with session_scope() as s:
        job_id = jobs.new_job(s, "evaluate", {}).id
    execute(job_id, "evaluate", imported("workers.runner", "no_such_handler"))
    with session_scope() as s:
        assert "no_such_handler" in s.get(Job, job_id).error


def test_every_task_names_a_handler_that_exists() -> None:
    import importlib

    from db.jobs import JobKind
    from workers.tasks import HANDLERS

    assert set(HANDLERS) == {k for k in JobKind if k != JobKind.IMPORT}  # imports run a preloaded handler
    for module, name in HANDLERS.values():
        assert callable(getattr(importlib.import_module(module), name))
