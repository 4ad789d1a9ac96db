"""Generation jobs: check and submit one, and relay its token stream (Redis) as server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import redis
import redis.asyncio as aredis
from fastapi import HTTPException
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.schemas.jobs import JobPublic
from api.services import jobs
from api.services.access import Caller
from api.services.models import resolve_model_name
from csra.settings import get_settings
from csra.specs import GenerateRequest, GenerateSpec, ReplyTo
from csra.streams import decode_entry, stream_key
from db.jobs import TERMINAL, JobKind
from db.models import Job
from db.session import get_sessionmaker


def check_message(text: str) -> None:
    limit = get_settings().max_message_chars
    if not text.strip():
        raise HTTPException(status_code=422, detail="the message is empty")
    if len(text) > limit:
        raise HTTPException(status_code=422, detail=f"the message is {len(text)} characters; the limit is "
                                                    f"{limit} (CSRA_MAX_MESSAGE_CHARS)")


def job_params(db: Session, request: GenerateRequest, reply_to: ReplyTo | None = None) -> dict[str, Any]:
    """The stored job parameters (a ``GenerateSpec``): what the client sent, the model resolved once
    (to its name), and the chat turn it answers. The worker renders ``spec.conversation()`` as is."""
    for turn in request.conversation():
        check_message(turn["content"])
    fields = request.model_dump(exclude={"model_id"})
    spec = GenerateSpec(**fields, model_id=resolve_model_name(db, request.model_id), reply_to=reply_to)
    return spec.model_dump(mode="json")


def submit_generation(db: Session, request: GenerateRequest, caller: Caller) -> Job:
    return jobs.submit(db, JobKind.GENERATE, job_params(db, request), caller=caller)


def _job_snapshot(job_id: int) -> dict[str, Any]:
    with get_sessionmaker()() as s:
        job = s.get(Job, job_id)
        return JobPublic.model_validate(job).model_dump(mode="json") if job else {}


async def _exists(client: aredis.Redis, key: str) -> bool:
    try:
        return bool(await client.exists(key))
    except (redis.RedisError, OSError):
        return False


async def token_events(job_id: int, start: str = "0") -> AsyncIterator[dict[str, str]]:
    """SSE events ``token`` ({"text"}) as the worker writes them, then ``done`` (the finished job).

    ``reset`` ({"attempt"}) means the worker running the job died and a new attempt streams the
    reply again from its start: drop the text received so far. The job's outcome is committed
    before its stream's end marker is written, so ``done`` reads the row once; the row is also read
    after a second without tokens (a job that ended without an end marker, e.g. Redis was down).
    """
    client = aredis.Redis.from_url(get_settings().effective_redis_url)
    key, last, relayed = stream_key(job_id), start, False
    try:
        snap = await run_in_threadpool(_job_snapshot, job_id)
        if snap.get("status") in TERMINAL and (snap.get("kind") != JobKind.GENERATE or not await _exists(client, key)):
            yield {"event": "done", "data": json.dumps(snap)}  # ended, and its tokens expired (or never came)
            return
        while True:
            try:
                entries = cast(list[Any], await client.xread({key: last}, block=1000, count=100))
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
                        yield {"event": "done", "data": json.dumps(await run_in_threadpool(_job_snapshot, job_id))}
                        return
            if not entries:
                snap = await run_in_threadpool(_job_snapshot, job_id)
                if snap.get("status") in TERMINAL:
                    yield {"event": "done", "data": json.dumps(snap)}
                    return
    finally:
        await client.aclose()
