"""Generation jobs (``POST /jobs/generate``) and their token stream (``GET /jobs/{id}/stream``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis
import redis.asyncio as aredis
from fastapi import APIRouter, HTTPException
from sqlalchemy.orm import Session
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from api.deps import DbSession, Owner
from api.enqueue import submit_job
from api.routes.jobs import get_job_or_404
from api.routes.models import find_model
from api.schemas import JobPublic
from csra.settings import get_settings
from csra.specs import GenerateSpec
from csra.streams import decode_entry, stream_key
from db.models import TERMINAL, Job
from db.session import get_sessionmaker

router = APIRouter(prefix="/jobs", tags=["generation"])


def check_message(text: str) -> None:
    limit = get_settings().max_message_chars
    if not text.strip():
        raise HTTPException(status_code=422, detail="the message is empty")
    if len(text) > limit:
        raise HTTPException(status_code=422, detail=f"the message is {len(text)} characters; the limit is "
                                                    f"{limit} (CSRA_MAX_MESSAGE_CHARS)")


def resolve_model_ref(db: Session, ref: str) -> str:
    """A model name for the job params; 422 for a model that is not in the store."""
    model = find_model(db, ref)
    if model is None:
        raise HTTPException(status_code=422, detail=f"unknown model {ref!r}: GET /models lists the models")
    return model.name


def submit_generation(
    db: Session, spec: GenerateSpec, owner: str | None,
    on_rollback: Callable[[Session], None] | None = None, **extra: Any,
) -> Job:
    texts = [spec.message] if spec.message is not None else [m["content"] for m in spec.messages or []]
    for text in texts:
        check_message(text)
    params = spec.model_dump(mode="json")
    params["model_id"] = resolve_model_ref(db, spec.model_id)
    params.update(extra)
    return submit_job(db, "generate", params, owner=owner, on_rollback=on_rollback)


@router.post("/generate", status_code=202, response_model=JobPublic)
def create_generate_job(spec: GenerateSpec, db: DbSession, owner: Owner) -> Any:
    """One reply from one model (queue ``generate``); poll ``GET /jobs/{id}`` or stream it."""
    return submit_generation(db, spec, owner)


def _job_snapshot(job_id: int) -> dict[str, Any]:
    with get_sessionmaker()() as s:
        job = s.get(Job, job_id)
        return JobPublic.model_validate(job).model_dump(mode="json") if job else {}


async def _final_snapshot(job_id: int, timeout: float = 10.0) -> dict[str, Any]:
    """The job once the runner has recorded its outcome (a moment after the stream's end marker)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        snap = await run_in_threadpool(_job_snapshot, job_id)
        if snap.get("status") in TERMINAL or asyncio.get_running_loop().time() > deadline:
            return snap
        await asyncio.sleep(0.02)


async def _exists(client: aredis.Redis, key: str) -> bool:
    try:
        return bool(await client.exists(key))
    except (redis.RedisError, OSError):
        return False


async def token_events(job_id: int, start: str = "0") -> AsyncIterator[dict[str, str]]:
    """SSE events ``token`` ({"text"}) as the worker writes them, then ``done`` (the job).

    ``reset`` ({"attempt"}) means the worker running the job died and a new attempt streams the
    reply again from its start: drop the text received so far.

    The database is read at the start and after a second without tokens (a job that ended
    without an end marker), not per token: a stream costs the API only the Redis reads.
    """
    client = aredis.Redis.from_url(get_settings().effective_redis_url)
    key = stream_key(job_id)
    last = start
    relayed = False
    try:
        snap = await run_in_threadpool(_job_snapshot, job_id)
        if snap.get("status") in TERMINAL and (snap.get("kind") != "generate" or not await _exists(client, key)):
            yield {"event": "done", "data": json.dumps(snap)}  # ended, and its tokens expired (or never came)
            return
        while True:
            try:
                entries = await client.xread({key: last}, block=1000, count=100)
            except (redis.RedisError, OSError):
                entries = []
                await asyncio.sleep(0.2)
            for _key, items in entries:
                for entry_id, fields in items:
                    last = entry_id.decode()
                    item = decode_entry(fields)
                    if item["type"] == "token":
                        relayed = True
                        yield {"event": "token", "data": json.dumps({"text": item["text"]})}
                    elif item["type"] == "start":  # a retried attempt streams its reply from the start
                        if relayed:
                            relayed = False
                            yield {"event": "reset", "data": json.dumps({"attempt": int(item["attempt"])})}
                    else:
                        yield {"event": "done", "data": json.dumps(await _final_snapshot(job_id))}
                        return
            if not entries:
                snap = await run_in_threadpool(_job_snapshot, job_id)
                if snap.get("status") in TERMINAL:
                    yield {"event": "done", "data": json.dumps(snap)}
                    return
    finally:
        await client.aclose()


@router.get("/{job_id}/stream")
def stream_job(job_id: int, db: DbSession, owner: Owner) -> EventSourceResponse:
    """Server-sent events: each generated piece of text as ``token``, then ``done`` with the job."""
    job = get_job_or_404(db, job_id, owner)
    if job.kind != "generate":
        raise HTTPException(status_code=422, detail=f"job {job_id} is a {job.kind} job; only generation jobs stream "
                                                    "tokens (use GET /jobs/{id}/events)")
    return EventSourceResponse(token_events(job_id), ping=15)
