"""Jobs of every kind: list, read, events (progress, logs, loss curve), cancel."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter

from api.deps import Agent, DbSession
from api.params import MAX_LIMIT, After, IdPath, IdQuery, Limit, Offset
from api.roles import RoleRoute
from api.schemas.jobs import JobEventPublic, JobEventsPublic, JobPublic, JobsPublic
from api.services import jobs
from db.models import Job

router = APIRouter(route_class=RoleRoute, prefix="/jobs", tags=["jobs"])

KindQ = Literal["import", "train", "evaluate", "generate", "sweep", "memory", "export"]
StatusQ = Literal["queued", "running", "waiting", "succeeded", "failed", "cancelled"]


@router.get("", response_model=JobsPublic)
def list_jobs(db: DbSession, caller: Agent, kind: KindQ | None = None, status: StatusQ | None = None,
              parent_id: IdQuery | None = None, limit: Limit = 50,
              offset: Offset = 0) -> JobsPublic:
    rows, count = jobs.list_jobs(db, caller, kind, status, parent_id, limit, offset)
    return JobsPublic(data=[JobPublic.model_validate(j) for j in rows], count=count)


@router.get("/{job_id}", response_model=JobPublic)
def read_job(job_id: IdPath, db: DbSession, caller: Agent) -> Job:
    """The hot polling path: a primary-key read, in the thread pool like every database call."""
    return jobs.get_job_or_404(db, job_id, caller)


@router.get("/{job_id}/events", response_model=JobEventsPublic)
def job_events(
    job_id: IdPath, db: DbSession, caller: Agent, after: After = 0,
    kind: Literal["log", "metric", "status"] | None = None, limit: Limit = MAX_LIMIT,
) -> JobEventsPublic:
    jobs.get_job_or_404(db, job_id, caller)
    rows = jobs.events(db, job_id, after, kind, limit)
    return JobEventsPublic(data=[JobEventPublic.model_validate(e) for e in rows], count=len(rows))


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: IdPath, db: DbSession, caller: Agent) -> Job:
    """Cooperative cancel: a queued job never starts; a running one stops at its next step."""
    return jobs.cancel(db, job_id, caller)
