"""The periodic sweep (Celery beat, queue ``default``): no job stays stuck.

- A ``running`` job whose heartbeat is older than ``CSRA_STALE_AFTER_SECONDS`` lost its
  worker: it is re-queued (and re-sent) while attempts remain, else failed with a clear error.
- A ``queued`` job whose message is nowhere in Redis (neither waiting in its queue nor
  delivered-but-unacked) for ``CSRA_LOST_MESSAGE_AFTER_SECONDS`` is re-sent from the row:
  Redis restarted without it, or the API died between commit and publish.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

import redis
from sqlalchemy import or_, select

from csra.queue import QUEUES, TASKS, send_job, task_id_for
from csra.settings import get_settings
from db.base import utcnow
from db.models import Job, JobEvent, JobStatus
from db.session import session_scope
from workers.runner import _fail_exhausted

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
    to_send: list[tuple[int, str]] = []
    with session_scope() as s:
        stale = s.scalars(
            select(Job).where(Job.status == JobStatus.RUNNING.value, Job.heartbeat_at < cutoff)
        ).all()
        for job in stale:
            if job.attempts >= settings.max_attempts:
                _fail_exhausted(job, settings.max_attempts)
                s.add(JobEvent(job_id=job.id, kind="status", message=f"failed: {job.error}"))
                continue
            job.status = JobStatus.QUEUED.value
            job.stage = f"re-queued: worker {job.worker} stopped responding"
            job.worker = None
            job.enqueued_at = utcnow()
            s.add(JobEvent(job_id=job.id, kind="status", message=job.stage))
            to_send.append((job.id, job.kind))
    for job_id, kind in to_send:
        send_job(job_id, kind)
    return [j for j, _ in to_send]


def resend_lost_messages(client: redis.Redis) -> list[int]:
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.lost_message_after_seconds)
    with session_scope() as s:
        rows = s.execute(
            select(Job.id, Job.kind).where(
                Job.status == JobStatus.QUEUED.value,
                Job.kind.in_(list(TASKS)),
                or_(Job.enqueued_at < cutoff, Job.enqueued_at.is_(None) & (Job.created_at < cutoff)),
            )
        ).all()
    if not rows:
        return []
    present = task_ids_in_redis(client)
    resent = []
    for job_id, kind in rows:
        if task_id_for(job_id) in present:
            continue
        send_job(job_id, kind)
        with session_scope() as s:
            job = s.get(Job, job_id)
            if job is not None:
                job.enqueued_at = utcnow()
                s.add(JobEvent(job_id=job_id, kind="status", message="re-enqueued: its queue message was lost"))
        resent.append(job_id)
    return resent


def sweep() -> dict[str, list[int]]:
    client = redis.Redis.from_url(get_settings().effective_redis_url, socket_timeout=5)
    result = {"requeued_stale": requeue_stale_running(), "resent_lost": resend_lost_messages(client)}
    if any(result.values()):
        logger.warning("job sweep: %s", result)
    return result
