"""Liveness of the database, Redis and the workers behind each queue."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from csra.presence import SUPERVISOR_KEY, invariance_reports, live_workers, report_parts, worker_devices
from csra.queue import QUEUES
from csra.redis_conn import get_redis, redis_ok
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
        return live_workers(get_redis(), QUEUES)
    except Exception:
        logger.warning("reading worker presence failed", exc_info=True)
        return {q: [] for q in QUEUES}


def _devices() -> dict[str, dict[str, Any]]:
    """The torch device of each live train/generate worker (``CSRA_DEVICE``: a GPU when present)."""
    try:
        return worker_devices(get_redis())
    except Exception:
        logger.warning("reading worker devices failed", exc_info=True)
        return {}


def _invariance() -> tuple[dict[str, Any], list[str]]:
    """Each loaded model's batch-invariance self-check per worker, and a warning for every failed one."""
    try:
        reports = invariance_reports(get_redis())
    except Exception:
        logger.warning("reading batch-invariance reports failed", exc_info=True)
        return {}, []
    summary = {key: {k: r.get(k) for k in ("batch_invariant", "linear_plan", "attention", "cpu", "detail")}
               for key, r in sorted(reports.items())}
    warnings = []
    for key, r in sorted(reports.items()):
        if not r.get("batch_invariant"):
            worker, model = report_parts(key)
            warnings.append(f"batch invariance is OFF for model {model} on worker {worker}: greedy replies may "
                            f"differ between a request alone and in a batch ({r.get('detail')})")
    return summary, warnings


def _supervisor() -> dict[str, Any] | None:
    """``csra up``'s parts with their restart counts (None when the stack runs without ``csra up``)."""
    try:
        raw = get_redis().get(SUPERVISOR_KEY)
    except Exception:
        logger.warning("reading the supervisor state failed", exc_info=True)
        return None
    return json.loads(raw) if raw else None


def _check() -> dict[str, Any]:
    db, rds = _db_ok(), redis_ok()
    workers = _workers() if rds else {q: [] for q in QUEUES}
    invariance, warnings = _invariance() if rds else ({}, [])
    supervisor = _supervisor() if rds else None
    for name, part in ((supervisor or {}).get("parts") or {}).items():
        if part.get("restarts"):
            warnings.append(f"{name} was restarted {part['restarts']} time(s) (last exit code "
                            f"{part.get('last_exit_code')}); see the csra up log")
    return {
        "status": "ok" if db and rds else "degraded",
        "database": "ok" if db else "unreachable",
        "redis": "ok" if rds else "unreachable",
        "workers": workers,
        "devices": _devices() if rds else {},
        "batch_invariance": invariance,
        "supervisor": supervisor,
        "warnings": warnings,
    }


@router.get("/health", responses={503: {"description": "the database, Redis or a queue's workers are not ok "
                                                      "(the body says which)"}})
async def health() -> JSONResponse:
    body = await run_in_threadpool(_check)
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)
