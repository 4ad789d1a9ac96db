"""Jobs: find one (404), submit one (commit, then enqueue), cancel one (with its children)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import HTTPException
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.services.access import Caller, may_see, owned
from csra.enqueue import after_jobs_ended, check_queue, ended_tuple, send_committed
from db import jobs
from db.models import Job, JobEvent


def get_job_or_404(db: Session, job_id: int, caller: Caller) -> Job:
    job = db.get(Job, job_id)
    if job is None or not may_see(job.owner, caller):
        raise HTTPException(status_code=404, detail=f"job {job_id} not found")
    return job


def submit(db: Session, kind: str, params: dict[str, Any], *, caller: Caller, dataset_id: int | None = None,
           undo: Sequence[object] = (), before_commit: Callable[[Job], None] | None = None) -> Job:
    """Create the job row (with whatever the caller added to ``db``), commit once, then enqueue.

    ``before_commit(job)`` links the caller's rows to the new job in the same transaction. Refused
    with 503 before anything is written while Redis is down; if the publish fails after the
    commit, the job and the ``undo`` rows made with it are deleted again.
    """
    check_queue()
    job = jobs.new_job(db, kind, params, owner=caller.name, dataset_id=dataset_id)
    if before_commit is not None:
        before_commit(job)
    db.commit()
    send_committed(db, job, undo)
    return job


def list_jobs(db: Session, caller: Caller, kind: str | None, status: str | None, parent_id: int | None,
              limit: int, offset: int) -> tuple[list[Job], int]:
    q = select(Job)
    if kind:
        q = q.where(Job.kind == kind)
    if status:
        q = q.where(Job.status == status)
    if parent_id is not None:
        q = q.where(Job.parent_id == parent_id)
    q = owned(q, Job.owner, caller)
    count = db.scalar(select(func.count()).select_from(q.subquery())) or 0
    return list(db.scalars(q.order_by(Job.id.desc()).limit(limit).offset(offset))), count


def events(db: Session, job_id: int, after: int, kind: str | None, limit: int) -> list[JobEvent]:
    q = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
    if kind:
        q = q.where(JobEvent.kind == kind)
    return list(db.scalars(q.order_by(JobEvent.id).limit(limit)))


def cancel(db: Session, job_id: int, caller: Caller) -> Job:
    """Cooperative cancel: a queued (or waiting) job ends now; a running one at its next step."""
    job = get_job_or_404(db, job_id, caller)
    if job.status in jobs.TERMINAL:
        raise HTTPException(status_code=409, detail=f"job {job_id} already {job.status}; nothing to cancel")
    ended = [ended_tuple(j) for j in jobs.request_cancel(db, job)]
    db.commit()
    after_jobs_ended(ended)
    db.refresh(job)
    return job
