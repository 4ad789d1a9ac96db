"""The job lifecycle every kind shares: claim, run the handler, record the outcome.

A Celery task calls ``execute(job_id, kind, handler)``; the handler is a plain function
``handler(job_id, params, ctx) -> dict`` that does the work. The job row is the source of
truth: claiming is an atomic compare-and-set on (status, attempts), so a message delivered
twice runs the job once, and a runner that lost its claim can no longer write anything. Every read that
decides a write locks the job first (``db.jobs.lock_job``: a row lock on PostgreSQL, the write lock on
SQLite), so the stale-job reaper and another runner never act on the same state twice.

The outcome is written by ``db.jobs.finish`` in one transaction with what the job serves (a chat
turn, a dataset); only after that commit are token streams ended and waiting parents woken
(``csra.enqueue.after_jobs_ended``), so whoever reads the end marker finds the job finished.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psutil
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import CursorResult, update

from csra.enqueue import after_jobs_ended, ended_tuple, wake_parent
from csra.jobctx import JobCancelled, JobError, TransientJobError, WaitForChildren
from csra.queue import send_job
from csra.settings import get_settings
from db import jobs
from db.base import utcnow
from db.models import Job, JobEvent
from db.session import session_scope
from workers.context import Claim, DbJobContext, Heartbeat, LostClaim, time_limit_message, worker_name

logger = logging.getLogger(__name__)

Handler = Callable[[int, dict[str, Any], DbJobContext], dict[str, Any]]


@dataclass(frozen=True)
class Outcome:
    status: str
    result: dict[str, Any] | None = None
    error: str | None = None
    stage: str | None = None
    message: str | None = None


def claim(job_id: int) -> Claim | None:
    """Take the job for this process, or return None when it must not run here."""
    settings = get_settings()
    me = worker_name()
    ended = []
    with session_scope() as s:
        job = jobs.lock_job(s, job_id)
        if job is None:
            logger.warning("job %s does not exist; dropping its message", job_id)
            return None
        if job.status in jobs.TERMINAL or job.status == jobs.JobStatus.WAITING:
            logger.info("job %s is %s; not running it now", job_id, job.status)
            return None
        if job.status == jobs.JobStatus.QUEUED and job.cancel_requested:
            jobs.finish(s, job, jobs.JobStatus.CANCELLED, stage="cancelled before it ran")
            ended.append(ended_tuple(job))
        elif job.status == jobs.JobStatus.RUNNING and job.heartbeat_at and \
                utcnow() - job.heartbeat_at < timedelta(seconds=settings.stale_after_seconds):
            # Another runner holds it, or one died a moment ago: the reaper re-queues it once its
            # heartbeat is stale.
            logger.info("job %s is running elsewhere (%s); dropping duplicate message", job_id, job.worker)
            return None
        elif job.attempts >= settings.max_attempts:
            jobs.finish(s, job, jobs.JobStatus.FAILED, stage="failed: worker lost",
                        error=jobs.exhausted_error(job.attempts, settings.max_attempts))
            ended.append(ended_tuple(job))
    if ended:
        after_jobs_ended(ended)
        return None
    return _take(job_id, me)


def _take(job_id: int, me: str) -> Claim | None:
    with session_scope() as s:
        job = jobs.lock_job(s, job_id)
        if job is None or job.status not in (jobs.JobStatus.QUEUED, jobs.JobStatus.RUNNING):
            return None
        now = utcnow()
        res: CursorResult[Any] = s.execute(  # type: ignore[assignment]  # an UPDATE gives a CursorResult
            update(Job)
            .where(Job.id == job_id, Job.status == job.status, Job.attempts == job.attempts)
            .values(status=jobs.JobStatus.RUNNING.value, attempts=Job.attempts + 1, worker=me,
                    started_at=job.started_at or now, heartbeat_at=now, stage="starting", error=None)
            .execution_options(synchronize_session=False)
        )
        if res.rowcount != 1:
            return None
        attempt = job.attempts + 1
        params = dict(job.params or {})
        s.add(JobEvent(job_id=job_id, kind="status", message=f"running (attempt {attempt}) on {me}"))
    return Claim(job_id=job_id, attempt=attempt, worker=me, params=params)


def _owned_job(s: Any, claim_: Claim) -> Job | None:
    """The job row, if this runner still owns it (fenced by worker and attempt)."""
    job = jobs.lock_job(s, claim_.job_id)
    if job is None or job.status != jobs.JobStatus.RUNNING or job.worker != claim_.worker \
            or job.attempts != claim_.attempt:
        return None
    return job


def record(claim_: Claim, outcome: Outcome) -> bool:
    """Write the outcome (and settle what the job serves) if this runner still owns the job."""
    with session_scope() as s:
        job = _owned_job(s, claim_)
        if job is None:
            return False
        jobs.finish(s, job, outcome.status, result=outcome.result, error=outcome.error, stage=outcome.stage,
                    message=outcome.message)
        ended = [ended_tuple(job)]
    after_jobs_ended(ended)
    return True


RETRY_DELAY_SECONDS = 5.0  # times the attempt: a store that just went away is given a moment


def retry_later(claim_: Claim, kind: str, error: str) -> bool:
    """A transient failure: the job goes back to the queue (its attempts count on) and its message is
    sent again after a delay. False if this runner no longer owns the job."""
    delay = RETRY_DELAY_SECONDS * claim_.attempt
    with session_scope() as s:
        job = _owned_job(s, claim_)
        if job is None:
            return False
        jobs.requeue(s, job, f"retrying in {delay:g} s (attempt {claim_.attempt} failed: {error})")
    send_job(claim_.job_id, kind, countdown=delay)  # lost? the lost-message sweep sends it again
    return True


def record_waiting(claim_: Claim, children: list[int]) -> bool:
    """A sweep started its child jobs: it waits for them without holding this worker."""
    with session_scope() as s:
        job = _owned_job(s, claim_)
        if job is None:
            return False
        jobs.wait_for_children(s, job, children)
    wake_parent(claim_.job_id)  # its children may all have ended already (a retried sweep)
    return True


def _outcome_of_error(job_id: int, ctx: DbJobContext, exc: BaseException) -> Outcome:
    if isinstance(exc, SoftTimeLimitExceeded):  # Celery interrupted a job that did not stop at its limit
        msg = time_limit_message(ctx.time_limit, ctx.limit_setting, "Celery's soft time limit interrupted it")
        return Outcome(jobs.JobStatus.FAILED, error=msg, stage="failed: time limit")
    if isinstance(exc, JobCancelled):
        return Outcome(jobs.JobStatus.CANCELLED, result=exc.result, stage="cancelled")
    if isinstance(exc, JobError):
        return Outcome(jobs.JobStatus.FAILED, error=str(exc), stage="failed")
    logger.error("job %s crashed", job_id, exc_info=exc)
    msg = f"Internal error while running the job ({type(exc).__name__}: {exc}). See the worker log."
    return Outcome(jobs.JobStatus.FAILED, error=msg, stage="failed")


def _outcome_of_result(result: dict[str, Any], wall: float) -> Outcome:
    result = {**result, "wall_seconds": round(wall, 3)} if "wall_seconds" not in result else result
    if result.pop("_cancelled", False):
        return Outcome(jobs.JobStatus.CANCELLED, result=result, stage="cancelled",
                       message="cancelled (kept the best checkpoint)")
    return Outcome(jobs.JobStatus.SUCCEEDED, result=result, stage="done")


def imported(module: str, name: str) -> Handler:
    """The handler ``module.name``, imported when its job runs, inside ``execute``.

    Handlers are imported lazily so a worker loads only what its jobs need (an import worker never
    loads torch). Imported inside ``execute``, one that cannot be imported (a package missing on
    this host, an upgrade applied to the files under a running worker) fails its job with the import
    error instead of leaving the job queued for ever.
    """

    def handler(job_id: int, params: dict[str, Any], ctx: DbJobContext) -> dict[str, Any]:
        run: Handler = getattr(importlib.import_module(module), name)
        return run(job_id, params, ctx)

    return handler


def execute(job_id: int, kind: str, handler: Handler) -> None:
    """Run one job through its whole lifecycle. Never raises for a job-level failure."""
    claim_ = claim(job_id)
    if claim_ is None:
        return
    ctx = DbJobContext(claim_, kind)
    t0 = time.monotonic()
    with Heartbeat(claim_, get_settings().heartbeat_seconds):
        try:
            outcome = _outcome_of_result(handler(job_id, claim_.params, ctx), time.monotonic() - t0)
        except LostClaim:
            logger.warning("job %s was taken over by another worker; this run stops", job_id)
            return
        except WaitForChildren as wait:
            record_waiting(claim_, wait.children)
            return
        except TransientJobError as exc:
            if claim_.attempt < get_settings().max_attempts and retry_later(claim_, kind, str(exc)):
                return
            outcome = _outcome_of_error(job_id, ctx, exc)
        except (Exception, SoftTimeLimitExceeded) as exc:
            outcome = _outcome_of_error(job_id, ctx, exc)
    if not record(claim_, outcome):
        logger.warning("job %s: this run lost its claim before recording %s", job_id, outcome.status)


def fail_past_hard_limit(job_id: int, kind: str, seconds: float) -> None:
    """Celery killed the job's worker process at its hard time limit: fail the job, naming the limit."""
    _, setting = get_settings().time_limit(kind)
    msg = (f"the job ran past its hard time limit of {seconds:g} s ({setting} + CSRA_TIME_LIMIT_GRACE_SECONDS) "
           f"without stopping, so its worker process was killed. Raise {setting} if jobs like this one need longer.")
    with session_scope() as s:  # not locked yet: the stuck process may hold the lock (SQLite's, or the row's)
        job = s.get(Job, job_id)
        worker = job.worker if job is not None and job.status == jobs.JobStatus.RUNNING else None
    if worker is None:
        return
    _kill_stuck_process(worker)
    with session_scope() as s:
        job = jobs.lock_job(s, job_id)
        if job is None or job.status != jobs.JobStatus.RUNNING or job.worker != worker:
            return
        jobs.finish(s, job, jobs.JobStatus.FAILED, error=msg, stage="failed: hard time limit")
        ended = [ended_tuple(job)]
    after_jobs_ended(ended)


def _kill_stuck_process(worker: str | None) -> None:
    """Kill the job's stuck pool process (``host:pid``) now, if it is one of this worker's.

    Celery calls ``fail_past_hard_limit`` before it kills the process, and a process frozen inside a
    write still holds SQLite's write lock: the failure could not be recorded (database is locked) and
    the job stayed "running" until the reaper found its beat stale. Celery kills it next anyway.
    """
    pid_text = (worker or "").rpartition(":")[2]
    if not pid_text.isdigit():
        return
    try:
        proc = psutil.Process(int(pid_text))
        if proc.ppid() == os.getpid():  # a pool process of this very worker, never another one's
            proc.kill()  # its locks go with it; Celery still reaps it
    except psutil.Error:
        return
