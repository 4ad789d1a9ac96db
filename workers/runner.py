"""The job lifecycle every kind shares: claim, heartbeat, progress, cancel, finish.

A Celery task calls ``execute(job_id, handler)``; the handler is a plain function
``handler(job_id, params, ctx) -> dict`` that does the work. The job row is the source of
truth: claiming is an atomic compare-and-set on (status, attempts), so a message delivered
twice runs the job once, and a runner that lost its claim can no longer write the result.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update

from csra.jobctx import JobCancelled, JobError, JobTimeLimit
from csra.settings import get_settings
from db.base import utcnow
from db.models import TERMINAL, Job, JobEvent, JobStatus
from db.session import session_scope

logger = logging.getLogger(__name__)

Handler = Callable[[int, dict[str, Any], "DbJobContext"], dict[str, Any]]


class LostClaim(Exception):
    """This runner no longer owns the job (it was re-queued after a missed heartbeat)."""


@dataclass(frozen=True)
class Claim:
    job_id: int
    attempt: int
    worker: str
    params: dict[str, Any]


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def add_event(job_id: int, kind: str, message: str = "", data: dict[str, Any] | None = None) -> None:
    with session_scope() as s:
        s.add(JobEvent(job_id=job_id, kind=kind, message=message, data=data))


def _fail_exhausted(job: Job, max_attempts: int) -> None:
    job.status = JobStatus.FAILED.value
    job.finished_at = utcnow()
    job.error = (
        f"Gave up after {job.attempts} attempt(s) (CSRA_MAX_ATTEMPTS={max_attempts}): the worker running "
        "this job stopped unexpectedly each time (killed, out of memory, or lost its connection). "
        "Check the worker logs, then submit the job again."
    )
    job.stage = "failed: worker lost"


def claim(job_id: int) -> Claim | None:
    """Take the job for this process, or return None when it must not run here."""
    settings = get_settings()
    me = worker_name()
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            logger.warning("job %s does not exist; dropping its message", job_id)
            return None
        if job.status in TERMINAL:
            logger.info("job %s already %s; not running it again", job_id, job.status)
            return None
        if job.status == JobStatus.QUEUED and job.cancel_requested:
            _finish_cancelled(job)
            return None
        if job.status == JobStatus.RUNNING:
            fresh = job.heartbeat_at and utcnow() - job.heartbeat_at < timedelta(
                seconds=settings.stale_after_seconds
            )
            if fresh:
                # Another runner holds it, or one died a moment ago: the sweep re-queues it
                # once its heartbeat is stale.
                logger.info("job %s is running elsewhere (%s); dropping duplicate message", job_id, job.worker)
                return None
        if job.attempts >= settings.max_attempts:
            _fail_exhausted(job, settings.max_attempts)
            return None
        now = utcnow()
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == job.status, Job.attempts == job.attempts)
            .values(
                status=JobStatus.RUNNING.value,
                attempts=Job.attempts + 1,
                worker=me,
                started_at=job.started_at or now,
                heartbeat_at=now,
                stage="starting",
                error=None,
            )
            .execution_options(synchronize_session=False)
        )
        if res.rowcount != 1:
            return None
        attempt = job.attempts + 1
        params = dict(job.params or {})
        s.add(JobEvent(job_id=job_id, kind="status", message=f"running (attempt {attempt}) on {me}"))
    return Claim(job_id=job_id, attempt=attempt, worker=me, params=params)


def _finish_cancelled(job: Job) -> None:
    job.status = JobStatus.CANCELLED.value
    job.finished_at = utcnow()
    job.stage = "cancelled"


class DbJobContext:
    """``csra.jobctx.JobContext`` backed by the job row. Writes are throttled.

    ``check_cancelled`` also enforces the job kind's time limit (``CSRA_TIME_LIMIT_<KIND>``): the
    job stops at its first check past the limit, whatever pool runs it (Celery's own limits do not
    work in the generate worker's thread pool).
    """

    MIN_WRITE_INTERVAL = 0.5

    def __init__(self, claim_: Claim, kind: str) -> None:
        self.claim = claim_
        self.job_id = claim_.job_id
        self.attempt = claim_.attempt
        self.work_dir = get_settings().jobs_dir / str(claim_.job_id)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._last_progress = 0.0
        self._last_check = 0.0
        self._phase = ""
        self.time_limit, self.limit_setting = get_settings().time_limit(kind)
        self._deadline = time.monotonic() + self.time_limit

    def _owned(self) -> Any:
        return (Job.id == self.job_id, Job.worker == self.claim.worker, Job.attempts == self.claim.attempt)

    def progress(self, fraction: float, stage: str | None = None, eta_seconds: float | None = None) -> None:
        now = time.monotonic()
        phase = (stage or "").split(":", 1)[0]
        if now - self._last_progress < self.MIN_WRITE_INTERVAL and fraction < 1.0 and phase == self._phase:
            return  # throttled, unless a new phase begins ("loading model" -> "training: step 1/300")
        self._last_progress, self._phase = now, phase
        values: dict[str, Any] = {"progress": max(0.0, min(1.0, fraction)), "eta_seconds": eta_seconds}
        if stage is not None:
            values["stage"] = stage[:200]
        with session_scope() as s:
            s.execute(update(Job).where(*self._owned()).values(**values))

    def event(self, kind: str, message: str = "", **data: Any) -> None:
        add_event(self.job_id, kind, message, data or None)

    def check_cancelled(self) -> None:
        now = time.monotonic()
        if now > self._deadline:
            raise JobTimeLimit(time_limit_message(self.time_limit, self.limit_setting, "it was stopped"))
        if now - self._last_check < self.MIN_WRITE_INTERVAL:
            return
        self._last_check = now
        with session_scope() as s:
            row = s.execute(
                select(Job.cancel_requested, Job.worker, Job.attempts).where(Job.id == self.job_id)
            ).one()
        if row.worker != self.claim.worker or row.attempts != self.claim.attempt:
            raise LostClaim()
        if row.cancel_requested:
            raise JobCancelled()


class Heartbeat:
    """Beats ``heartbeat_at`` from a thread while the job runs (torch releases the GIL)."""

    def __init__(self, claim_: Claim, interval: float) -> None:
        self.claim = claim_
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claim_.job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with session_scope() as s:
                    s.execute(
                        update(Job)
                        .where(Job.id == self.claim.job_id, Job.worker == self.claim.worker)
                        .values(heartbeat_at=utcnow())
                    )
            except Exception:  # a missed beat is not fatal; the next one may succeed
                logger.warning("heartbeat of job %s failed", self.claim.job_id, exc_info=True)


def _record(claim_: Claim, **values: Any) -> bool:
    """Write the outcome only if this runner still owns the job."""
    with session_scope() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == claim_.job_id, Job.worker == claim_.worker, Job.attempts == claim_.attempt)
            .where(Job.status == JobStatus.RUNNING.value)
            .values(finished_at=utcnow(), eta_seconds=None, **values)
        )
        return res.rowcount == 1


def time_limit_message(seconds: float, setting: str, outcome: str) -> str:
    return (f"the job ran past its time limit of {seconds:g} s ({setting}); {outcome}. "
            f"Raise {setting} if jobs like this one need longer.")


def execute(job_id: int, kind: str, handler: Handler) -> None:
    """Run one job through its whole lifecycle. Never raises for a job-level failure."""
    claim_ = claim(job_id)
    if claim_ is None:
        return
    settings = get_settings()
    ctx = DbJobContext(claim_, kind)
    t0 = time.monotonic()
    with Heartbeat(claim_, settings.heartbeat_seconds):
        try:
            result = handler(job_id, claim_.params, ctx)
        except SoftTimeLimitExceeded:  # Celery interrupted a job that did not stop at its limit
            msg = time_limit_message(ctx.time_limit, ctx.limit_setting, "Celery's soft time limit interrupted it")
            _record(claim_, status=JobStatus.FAILED.value, error=msg, stage="failed: time limit")
            add_event(job_id, "status", f"failed: {msg}")
            return
        except JobCancelled:
            _record(claim_, status=JobStatus.CANCELLED.value, stage="cancelled")
            add_event(job_id, "status", "cancelled")
            return
        except LostClaim:
            logger.warning("job %s was taken over by another worker; this run stops", job_id)
            return
        except JobError as e:
            _record(claim_, status=JobStatus.FAILED.value, error=str(e), stage="failed")
            add_event(job_id, "status", f"failed: {e}")
            return
        except Exception as e:
            logger.exception("job %s crashed", job_id)
            msg = f"Internal error while running the job ({type(e).__name__}: {e}). See the worker log."
            _record(claim_, status=JobStatus.FAILED.value, error=msg, stage="failed")
            add_event(job_id, "status", f"failed: {msg}")
            return
    result = {**result, "wall_seconds": round(time.monotonic() - t0, 3)} if "wall_seconds" not in result else result
    if result.pop("_cancelled", False):
        _record(claim_, status=JobStatus.CANCELLED.value, stage="cancelled", result=result)
        add_event(job_id, "status", "cancelled (kept the best checkpoint)")
        return
    _record(claim_, status=JobStatus.SUCCEEDED.value, result=result, progress=1.0, stage="done")
    add_event(job_id, "status", "succeeded")


def work_dir_for(job_id: int) -> Path:
    return get_settings().jobs_dir / str(job_id)


def fail_past_hard_limit(job_id: int, kind: str, seconds: float) -> None:
    """Celery killed the job's worker process at its hard time limit: fail the job, naming the limit."""
    _, setting = get_settings().time_limit(kind)
    msg = (f"the job ran past its hard time limit of {seconds:g} s ({setting} + CSRA_TIME_LIMIT_GRACE_SECONDS) "
           f"without stopping, so its worker process was killed. Raise {setting} if jobs like this one need longer.")
    with session_scope() as s:
        res = s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
                        .values(status=JobStatus.FAILED.value, error=msg, stage="failed: hard time limit",
                                finished_at=utcnow(), eta_seconds=None))
        if res.rowcount == 1:
            s.add(JobEvent(job_id=job_id, kind="status", message=f"failed: {msg}"))
