"""Putting committed jobs on the queue, and what follows when jobs end (shared by API and workers).

The job row is committed first, then its message is published (Celery docs, "Database
transactions"). If Redis is unreachable nothing is left behind: ``check_queue`` refuses before
any row is written, and a publish that fails after the commit deletes the rows it made.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import redis
from sqlalchemy.orm import Session

from csra.queue import send_job
from csra.redis_conn import get_redis, redis_ok, safe_redis_url
from csra.streams import publish_end
from db import jobs
from db.models import Job
from db.session import session_scope

logger = logging.getLogger(__name__)


class QueueUnavailable(Exception):
    """Redis (the job queue) cannot take the job: nothing was created."""

    def __init__(self) -> None:
        super().__init__(f"the job queue (Redis at {safe_redis_url()}) is unreachable, so the job was not "
                         "created; reads keep working. Start Redis (or check CSRA_REDIS_URL) and submit again.")


def check_queue() -> None:
    """Refuse early (before any row is written) while Redis is down."""
    if not redis_ok():
        raise QueueUnavailable()


def send_committed(session: Session, job: Job, undo: Sequence[object] = ()) -> None:
    """Publish the message of ``job`` (already committed). If that fails, delete the job and the
    ``undo`` rows made with it, commit, and raise ``QueueUnavailable``."""
    try:
        send_job(job.id, job.kind)
    except Exception:
        logger.exception("could not enqueue job %s", job.id)
        for row in (*undo, job):
            session.delete(row)
        session.commit()
        raise QueueUnavailable() from None


def after_jobs_ended(ended: Iterable[tuple[int, str, str, str | None, int | None]]) -> None:
    """Once the transaction that ended jobs has committed: end their token streams (generations) and
    wake the sweeps whose last child just ended. ``ended``: (id, kind, status, error, parent_id)."""
    for job_id, kind, status, error, parent_id in ended:
        if kind == jobs.JobKind.GENERATE:
            try:
                publish_end(get_redis(), job_id, status, error)
            except (redis.RedisError, OSError):  # readers fall back to the job row after a second
                logger.warning("could not end the token stream of job %s", job_id, exc_info=True)
        if parent_id is not None:
            wake_parent(parent_id)


def ended_tuple(job: Job) -> tuple[int, str, str, str | None, int | None]:
    return job.id, job.kind, job.status, job.error, job.parent_id


def wake_parent(parent_id: int) -> bool:
    """A waiting sweep whose children have all ended goes back to the queue (idempotent)."""
    with session_scope() as s:
        parent = jobs.lock_job(s, parent_id)  # two wakers (a runner, the reaper) requeue it once
        if parent is None or parent.status != jobs.JobStatus.WAITING or not jobs.children_done(s, parent_id):
            return False
        jobs.requeue(s, parent, "queued again: its child jobs ended")
        kind = parent.kind
    try:
        send_job(parent_id, kind)
    except Exception:  # the reaper re-sends a queued job whose message is missing
        logger.warning("could not enqueue job %s; the sweep will re-send it", parent_id, exc_info=True)
    return True
