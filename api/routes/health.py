"""Liveness of the database, Redis and the workers behind each queue."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from api.enqueue import redis_client, redis_ok
from csra.presence import live_workers
from csra.queue import QUEUES
from db.session import get_engine

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


def _db_ok() -> bool:
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        logger.warning("database check failed", exc_info=True)
        return False


def _workers() -> dict[str, list[str]]:
    """Live workers per queue (each worker keeps a short-lived presence key in Redis)."""
    try:
        return live_workers(redis_client(), QUEUES)
    except Exception:
        logger.warning("reading worker presence failed", exc_info=True)
        return {q: [] for q in QUEUES}


def _check() -> dict[str, Any]:
    db, rds = _db_ok(), redis_ok()
    workers = _workers() if rds else {q: [] for q in QUEUES}
    return {
        "status": "ok" if db and rds else "degraded",
        "database": "ok" if db else "unreachable",
        "redis": "ok" if rds else "unreachable",
        "workers": workers,
    }


@router.get("/health")
async def health() -> JSONResponse:
    body = await run_in_threadpool(_check)
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)
