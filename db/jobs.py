"""The job state machine, defined once: kinds and their queues, statuses, allowed transitions, and
the writes that move a job between them.

Every path that ends a job (its runner, a cancel, the stale-job reaper, a hard time limit) goes
through ``finish``, which also settles what the job serves in the same transaction: the chat turn
a generation answers, the dataset an import fills, the sweep that waits for its children. So a
reader never sees a finished job next to a pending chat turn, and nothing repairs rows on read.

::

    queued --> running --> succeeded | failed | cancelled
      |          |  \\--> waiting (a sweep, for its child jobs) --> queued (children done)
      |          \\--> queued (its worker was lost; the reaper re-queues it)
      \\--> cancelled | failed
"""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.base import utcnow
from db.models import ChatMessage, Dataset, DatasetExample, Job, JobEvent
from db.session import write_lock


class JobKind(enum.StrEnum):
    IMPORT = "import"
    TRAIN = "train"
    EVALUATE = "evaluate"
    GENERATE = "generate"
    SWEEP = "sweep"  # a hyper-parameter sweep: child training jobs, then an evaluation of their models
    MEMORY = "memory"  # (re)build the answer memory from a dataset
    EXPORT = "export"  # write a model of the store as a GGUF file


# the Celery queue each kind runs on (csra.queue routes by it)
QUEUE_OF: dict[str, str] = {
    JobKind.IMPORT: "default", JobKind.TRAIN: "train", JobKind.EVALUATE: "train",
    JobKind.GENERATE: "generate", JobKind.SWEEP: "default", JobKind.MEMORY: "default",
    JobKind.EXPORT: "default",
}


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"  # holds no worker: a sweep waiting for its child jobs
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value})
ENDINGS = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
TRANSITIONS: dict[str, frozenset[str]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset({JobStatus.QUEUED, JobStatus.WAITING, *ENDINGS}),
    JobStatus.WAITING: frozenset({JobStatus.QUEUED, JobStatus.CANCELLED, JobStatus.FAILED}),
}


class IllegalTransition(RuntimeError):
    """A write that would move a job along an edge the state machine does not have."""


def lock_job(session: Session, job_id: int) -> Job | None:
    """The job row, read so that no other transaction can change it before this one ends (a row lock,
    ``FOR UPDATE``, on PostgreSQL; the database's write lock on SQLite): whoever moves a job reads its
    state this way first, so two writers never both act on the same state. Call it first in a transaction."""
    write_lock(session)
    return session.get(Job, job_id, with_for_update=True, populate_existing=True)


def can_move(job: Job, status: str) -> bool:
    return status in TRANSITIONS.get(job.status, frozenset())


def _move(session: Session, job: Job, status: str, stage: str, message: str | None = None) -> None:
    if not can_move(job, status):
        raise IllegalTransition(f"job {job.id} cannot go from {job.status} to {status}")
    job.status, job.stage = status, stage[:200]
    session.add(JobEvent(job_id=job.id, kind="status", message=message or stage))


def new_job(session: Session, kind: str, params: dict[str, Any], *, owner: str | None = None,
            dataset_id: int | None = None, parent_id: int | None = None) -> Job:
    """Add a queued job row (and its first event) to the session and flush it to get an id."""
    job = Job(kind=kind, queue=QUEUE_OF[kind], params=params, owner=owner, dataset_id=dataset_id,
              parent_id=parent_id, status=JobStatus.QUEUED.value, stage="queued", enqueued_at=utcnow())
    session.add(job)
    session.flush()
    session.add(JobEvent(job_id=job.id, kind="status", message="queued"))
    return job


def finish(session: Session, job: Job, status: str, *, result: dict[str, Any] | None = None,
           error: str | None = None, stage: str | None = None, message: str | None = None) -> None:
    """End ``job`` (succeeded, failed or cancelled) and settle what it serves, in this transaction."""
    if status not in TERMINAL:
        raise IllegalTransition(f"finish() ends a job; {status!r} is not an ending")
    _move(session, job, status, stage or status, message or (f"{status}: {error}" if error else status))
    job.finished_at, job.eta_seconds = utcnow(), None
    if result is not None:
        job.result = result
    if error is not None:
        job.error = error
    if status == JobStatus.SUCCEEDED:
        job.progress = 1.0
    _settle_chat_turn(session, job)
    _settle_dataset(session, job)


def requeue(session: Session, job: Job, stage: str) -> None:
    """Back to the queue (its worker was lost, or the children a sweep waited for are done)."""
    _move(session, job, JobStatus.QUEUED, stage)
    job.worker, job.enqueued_at = None, utcnow()


def wait_for_children(session: Session, job: Job, children: list[int]) -> None:
    """A running sweep gives its worker slot back until its child jobs have ended."""
    _move(session, job, JobStatus.WAITING, f"waiting for child jobs {children}")
    job.worker = None
    job.attempts = 0  # this phase ended cleanly: attempts count the lost workers of one phase


def request_cancel(session: Session, job: Job) -> list[Job]:
    """Cancel ``job`` and its unfinished children: queued or waiting ones at once, running ones at their
    next step (their runner sees ``cancel_requested``). Returns the jobs that ended here."""
    ended: list[Job] = []
    for j in [job, *unfinished_children(session, job.id)]:
        j.cancel_requested = True
        if j.status in (JobStatus.QUEUED, JobStatus.WAITING):
            finish(session, j, JobStatus.CANCELLED, stage="cancelled before it ran" if j.status == "queued"
                   else "cancelled", message="cancelled")
            ended.append(j)
        elif j.status == JobStatus.RUNNING:
            session.add(JobEvent(job_id=j.id, kind="status", message="cancel requested"))
    return ended


def unfinished_children(session: Session, job_id: int) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.parent_id == job_id, Job.status.not_in(TERMINAL))
                                .order_by(Job.id)))


def children_done(session: Session, job_id: int) -> bool:
    return not unfinished_children(session, job_id)


def exhausted_error(attempts: int, max_attempts: int) -> str:
    return (f"Gave up after {attempts} attempt(s) (CSRA_MAX_ATTEMPTS={max_attempts}): the worker running "
            "this job stopped unexpectedly each time (killed, out of memory, or lost its connection). "
            "Check the worker logs, then submit the job again.")


# ----------------------------------------------------------------------------- what a job serves


def _settle_chat_turn(session: Session, job: Job) -> None:
    """A generation that answers a chat fills in (or fails, or cancels) that chat's assistant turn."""
    if job.kind != JobKind.GENERATE:
        return
    reply_to = (job.params or {}).get("reply_to") or {}
    message = session.get(ChatMessage, reply_to.get("message_id")) if reply_to.get("message_id") else None
    if message is None or message.status != "pending":
        return
    result = job.result or {}
    if job.status == JobStatus.SUCCEEDED:
        message.content, message.raw_content = result.get("text", ""), result.get("raw_text")
        message.status, message.model_name = "done", result.get("model") or message.model_name
        message.latency_ms, message.prompt_tokens = result.get("latency_ms"), result.get("prompt_tokens")
        message.completion_tokens = result.get("completion_tokens")
        message.intent, message.intent_confidence = result.get("intent"), result.get("intent_confidence")
        message.similar, message.slot_warnings = result.get("similar"), result.get("slot_warnings")
        message.follows_approved = result.get("follows_approved")
    else:
        message.status = "cancelled" if job.status == JobStatus.CANCELLED else "failed"
        message.content = result.get("text", "") if job.status == JobStatus.CANCELLED else ""
        message.error = job.error or ("generation cancelled" if job.status == JobStatus.CANCELLED else job.status)
    if message.chat is not None:
        message.chat.updated_at = utcnow()


def _settle_dataset(session: Session, job: Job) -> None:
    """An import that did not succeed leaves its dataset failed, with none of its examples stored."""
    if job.kind != JobKind.IMPORT or job.status == JobStatus.SUCCEEDED or job.dataset_id is None:
        return
    dataset = session.get(Dataset, job.dataset_id)
    if dataset is None or dataset.status == "ready":
        return
    session.execute(delete(DatasetExample).where(DatasetExample.dataset_id == dataset.id))
    dataset.status, dataset.row_count = "failed", 0
    dataset.error = job.error or f"import {job.status}"
