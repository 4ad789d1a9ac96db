"""Creating job rows (shared by the API and by jobs that start child jobs, such as sweeps)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from csra.queue import TASKS
from db.models import Job, JobEvent


def new_job(
    session: Session,
    kind: str,
    params: dict[str, Any],
    *,
    owner: str | None = None,
    dataset_id: int | None = None,
    parent_id: int | None = None,
) -> Job:
    """Add a queued job row (and its first event) to the session and flush it to get an id."""
    job = Job(kind=kind, queue=TASKS[kind][1], params=params, owner=owner, dataset_id=dataset_id,
              parent_id=parent_id)
    session.add(job)
    session.flush()
    session.add(JobEvent(job_id=job.id, kind="status", message="queued"))
    return job
