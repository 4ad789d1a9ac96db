"""Create a job row, commit, then publish its message (Celery docs, "Database transactions").

If Redis is unreachable the request answers 503 and the rows it created are removed again,
so no orphan job is left behind (README, "When Redis is down").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import redis
from fastapi import HTTPException
from sqlalchemy.orm import Session

from csra.queue import send_job
from csra.settings import get_settings
from db.base import utcnow
from db.jobs import new_job
from db.models import Job

logger = logging.getLogger(__name__)

REDIS_DOWN = (
    "the job queue (Redis at {url}) is unreachable, so the job was not created; "
    "reads keep working. Start Redis (or check CSRA_REDIS_URL) and submit again."
)


@lru_cache(maxsize=1)
def redis_client() -> redis.Redis:
    url = get_settings().effective_redis_url
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)


def redis_ok() -> bool:
    try:
        return bool(redis_client().ping())
    except (redis.RedisError, OSError):
        return False


def _unavailable() -> HTTPException:
    return HTTPException(status_code=503, detail=REDIS_DOWN.format(url=_safe_url()))


def _safe_url() -> str:
    url = get_settings().effective_redis_url
    if "@" in url:  # never echo a password
        scheme, _, rest = url.partition("://")
        url = f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def submit_job(
    db: Session,
    kind: str,
    params: dict[str, Any],
    *,
    owner: str | None = None,
    dataset_id: int | None = None,
    parent_id: int | None = None,
    on_rollback: Callable[[Session], None] | None = None,
) -> Job:
    """Create the job row, commit, enqueue; 503 if Redis is down (``on_rollback`` undoes related rows)."""
    if not redis_ok():
        raise _unavailable()
    job = new_job(db, kind, params, owner=owner, dataset_id=dataset_id, parent_id=parent_id)
    db.commit()
    try:
        send_job(job.id, kind)
    except Exception:
        logger.exception("could not enqueue job %s", job.id)
        db.delete(job)
        if on_rollback:
            on_rollback(db)
        db.commit()
        raise _unavailable() from None
    job.enqueued_at = utcnow()
    db.commit()
    return job
