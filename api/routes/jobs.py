"""Jobs of every kind: list, read, events (progress, logs, loss curve), cancel."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException, Query
from sqlalchemy import func, select

from api.deps import DbSession, Owner
from api.schemas import JobEventsPublic, JobPublic, JobsPublic
from db.base import utcnow
from db.models import TERMINAL, Job, JobEvent, JobKind, JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])

KindQ = Literal["import", "train", "evaluate", "generate", "sweep"]
StatusQ = Literal["queued", "running", "succeeded", "failed", "cancelled"]


def get_job_or_404(db: DbSession, job_id: int, owner: str | None) -> Job:
    job = db.get(Job, job_id)
    if job is None or (owner is not None and job.owner not in (None, owner)):
        raise HTTPException(status_code=404, detail=f"job {job_id} not found")
    return job


@router.get("", response_model=JobsPublic)
def list_jobs(
    db: DbSession,
    owner: Owner,
    kind: KindQ | None = None,
    status: StatusQ | None = None,
    parent_id: int | None = None,
    limit: int = Query(50, ge=1, le=1000),
    offset: int = Query(0, ge=0),
) -> JobsPublic:
    q = select(Job)
    if kind:
        q = q.where(Job.kind == kind)
    if status:
        q = q.where(Job.status == status)
    if parent_id is not None:
        q = q.where(Job.parent_id == parent_id)
    if owner is not None:
        q = q.where((Job.owner == owner) | Job.owner.is_(None))
    count = db.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = db.scalars(q.order_by(Job.id.desc()).limit(limit).offset(offset)).all()
    return JobsPublic(data=[JobPublic.model_validate(j) for j in rows], count=count)


@router.get("/{job_id}", response_model=JobPublic)
def read_job(job_id: int, db: DbSession, owner: Owner) -> Job:
    """The hot polling path: a primary-key read, in the thread pool like every database call."""
    return get_job_or_404(db, job_id, owner)


@router.get("/{job_id}/events", response_model=JobEventsPublic)
def job_events(
    job_id: int,
    db: DbSession,
    owner: Owner,
    after: int = Query(0, ge=0, description="only events with a larger id (for incremental polling)"),
    kind: Literal["log", "metric", "status"] | None = None,
    limit: int = Query(1000, ge=1, le=10000),
) -> JobEventsPublic:
    get_job_or_404(db, job_id, owner)
    q = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
    if kind:
        q = q.where(JobEvent.kind == kind)
    rows = db.scalars(q.order_by(JobEvent.id).limit(limit)).all()
    return JobEventsPublic(data=rows, count=len(rows))  # type: ignore[arg-type]


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: int, db: DbSession, owner: Owner) -> Job:
    """Cooperative cancel: a queued job never starts; a running one stops at its next step."""
    job = get_job_or_404(db, job_id, owner)
    if job.status in TERMINAL:
        raise HTTPException(status_code=409, detail=f"job {job_id} already {job.status}; nothing to cancel")
    job.cancel_requested = True
    if job.status == JobStatus.QUEUED:
        job.status = JobStatus.CANCELLED.value
        job.stage = "cancelled before it started"
        job.finished_at = utcnow()
        db.add(JobEvent(job_id=job.id, kind="status", message="cancelled before it started"))
    else:
        db.add(JobEvent(job_id=job.id, kind="status", message="cancel requested"))
    for child in db.scalars(select(Job).where(Job.parent_id == job.id, Job.status.not_in(TERMINAL))):
        child.cancel_requested = True
        if child.status == JobStatus.QUEUED:
            child.status = JobStatus.CANCELLED.value
            child.finished_at = utcnow()
    db.commit()
    db.refresh(job)
    return job


_ = JobKind  # kinds are documented in db.models.JobKind
