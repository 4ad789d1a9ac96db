"""The stale-job reaper (Celery beat, queue ``maintenance``): no job stays stuck.

- A ``running`` job whose heartbeat is older than ``CSRA_STALE_AFTER_SECONDS`` lost its
  worker: it is re-queued (and re-sent) while attempts remain, else failed with a clear error
  (and its chat turn or dataset settled with it, ``db.jobs.finish``).
- A ``queued`` job whose message is nowhere in Redis (neither waiting in its queue nor
  delivered-but-unacked) for ``CSRA_LOST_MESSAGE_AFTER_SECONDS`` is re-sent from the row:
  Redis restarted without it, or the API died between commit and publish.
- A ``waiting`` sweep whose child jobs have all ended is queued again (normally the runner that
  ends the last child does this at once; this catches the rest).

Several reapers may run at once (two beat workers, two hosts): each reads the jobs it acts on locked,
``FOR UPDATE SKIP LOCKED`` on PostgreSQL (a job another reaper or its runner holds is left to them; the
state it is read in is the state it is changed from), under the database's write lock on SQLite.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

import redis
from sqlalchemy import or_, select

from csra.enqueue import after_jobs_ended, ended_tuple, wake_parent
from csra.queue import QUEUES, TASK_NAMES, send_job, task_id_for
from csra.redis_conn import get_redis
from csra.settings import get_settings
from db import jobs
from db.base import utcnow
from db.models import Job, JobEvent
from db.session import session_scope, write_lock

logger = logging.getLogger(__name__)


def task_ids_in_redis(client: redis.Redis) -> set[str]:
    """Task ids of every message Redis holds: waiting in a queue list or delivered but unacked."""
    ids: set[str] = set()
    raw: list[Any] = []
    for q in QUEUES:
        for key in client.scan_iter(match=f"{q}*", count=100):  # priority sub-queues: "train\x06\x163"
            if client.type(key) == b"list":
                raw.extend(client.lrange(key, 0, -1))
    raw.extend(client.hvals("unacked"))
    for item in raw:
        try:
            payload = json.loads(item)
            if isinstance(payload, list):  # unacked: [message, exchange, routing_key]
                payload = payload[0]
            ids.add(payload["headers"]["id"])
        except (ValueError, KeyError, TypeError, IndexError):
            continue
    return ids


def requeue_stale_running() -> list[int]:
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.stale_after_seconds)
    stale_q = select(Job.id).where(Job.status == jobs.JobStatus.RUNNING, Job.heartbeat_at < cutoff)
    with session_scope() as s:  # the common case, nothing stale, takes no lock
        if not s.scalars(stale_q.limit(1)).first():
            return []
    to_send: list[tuple[int, str]] = []
    ended = []
    with session_scope() as s:
        write_lock(s)
        stale = s.scalars(select(Job).where(Job.id.in_(stale_q.scalar_subquery()))
                          .with_for_update(skip_locked=True).execution_options(populate_existing=True)).all()
        for job in stale:
            if job.attempts >= settings.max_attempts:
                jobs.finish(s, job, jobs.JobStatus.FAILED, stage="failed: worker lost",
                            error=jobs.exhausted_error(job.attempts, settings.max_attempts))
                ended.append(ended_tuple(job))
                continue
            jobs.requeue(s, job, f"re-queued: worker {job.worker} stopped responding")
            to_send.append((job.id, job.kind))
    after_jobs_ended(ended)
    for job_id, kind in to_send:
        send_job(job_id, kind)
    return [j for j, _ in to_send]


def _lost_query(cutoff: object) -> Any:
    return select(Job).where(
        Job.status == jobs.JobStatus.QUEUED,
        Job.kind.in_(list(TASK_NAMES)),
        or_(Job.enqueued_at < cutoff, Job.enqueued_at.is_(None) & (Job.created_at < cutoff)),
    )


def resend_lost_messages(client: redis.Redis) -> list[int]:
    """Re-send queued jobs whose message Redis does not hold. The jobs stay locked from the read to the
    new ``enqueued_at``: another reaper skips them, and a worker claiming one waits the few ms."""
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.lost_message_after_seconds)
    with session_scope() as s:  # the common case, nothing old in the queue, takes no lock
        if not s.scalars(_lost_query(cutoff).with_only_columns(Job.id).limit(1)).first():
            return []
    resent = []
    with session_scope() as s:
        write_lock(s)
        rows = s.scalars(_lost_query(cutoff).with_for_update(skip_locked=True)
                         .execution_options(populate_existing=True)).all()
        present = task_ids_in_redis(client) if rows else set()
        for job in rows:
            if task_id_for(job.id) in present:
                continue
            send_job(job.id, job.kind)  # a message sent twice (this commit failed) runs the job once
            job.enqueued_at = utcnow()
            s.add(JobEvent(job_id=job.id, kind="status", message="re-enqueued: its queue message was lost"))
            resent.append(job.id)
    return resent


def wake_finished_waiters() -> list[int]:
    with session_scope() as s:
        waiting = s.scalars(select(Job.id).where(Job.status == jobs.JobStatus.WAITING)).all()
    return [job_id for job_id in waiting if wake_parent(job_id)]


def reap_stale_jobs() -> dict[str, list[int]]:
    result = {"requeued_stale": requeue_stale_running(), "resent_lost": resend_lost_messages(get_redis()),
              "woke_waiting": wake_finished_waiters()}
    if any(result.values()):
        logger.warning("stale-job reaper: %s", result)
    return result
