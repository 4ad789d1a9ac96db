"""What a running job's handler sees of its job row: progress, events, cancellation, deadline,
and the heartbeat that tells the reaper the runner is alive."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from csra.jobctx import JobCancelled, JobTimeLimit
from csra.settings import get_settings
from db.base import utcnow
from db.models import Job, JobEvent
from db.session import session_scope

logger = logging.getLogger(__name__)


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


def time_limit_message(seconds: float, setting: str, outcome: str) -> str:
    return (f"the job ran past its time limit of {seconds:g} s ({setting}); {outcome}. "
            f"Raise {setting} if jobs like this one need longer.")


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
