"""OpenAI-compatible surface: models, chat completions (plain and streamed) and fine-tuning jobs,
mapped onto csra's own models and jobs, so the official ``openai`` client works against csra."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from api.deps import Admin, Agent, DbSession
from api.errors import unprocessable
from api.params import Limit
from api.roles import RoleRoute
from api.schemas.openai import ChatCompletionRequest, FineTuneCreate
from api.services import jobs
from api.services.access import Caller, owned
from api.services.generation import submit_generation, token_events
from api.services.training import submit_training
from csra.specs import REPLY_TOKENS, GenerateRequest, TrainSpec
from db.ids import parse_id
from db.models import Job, JobEvent, Model
from db.session import get_sessionmaker

router = APIRouter(route_class=RoleRoute, prefix="/v1", tags=["openai-compatible"])

DEFAULT_LR = 5e-5  # learning_rate_multiplier 1.0 = csra's default learning rate


def _text(content: str | list[dict[str, Any]] | None, where: str) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts (csra reads no
    images, audio or files: such a part is a 422 naming it, not silently dropped)."""
    if not isinstance(content, list):
        return content or ""
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind != "text":
            raise HTTPException(status_code=422, detail=f"{where}.content[{i}]: content part type {str(kind)[:40]!r} "
                                                        "is not supported; csra reads only 'text' parts")
        if not isinstance(part.get("text"), str):
            raise HTTPException(status_code=422, detail=f"{where}.content[{i}]: 'text' must be a string")
        texts.append(part["text"])
    return "".join(texts)


def _request(body: ChatCompletionRequest) -> GenerateRequest:
    msgs = [{"role": "assistant" if m.role == "assistant" else "user", "content": _text(m.content, f"messages[{i}]")}
            for i, m in enumerate(body.messages) if m.role not in ("system", "developer")]
    if not msgs or msgs[-1]["role"] != "user":
        raise HTTPException(status_code=422, detail="messages must end with a user message")
    try:
        return GenerateRequest(model_id=body.model, messages=msgs, temperature=body.temperature or 0.0,
                               top_p=body.top_p or 1.0,
                               max_new_tokens=body.max_completion_tokens or body.max_tokens or REPLY_TOKENS,
                               seed=body.seed,
                               tone=body.tone, ask_details_only_if_relevant=body.ask_details_only_if_relevant)
    except ValidationError as e:  # e.g. a blank message: a 422 naming it, never a 500
        raise unprocessable(e, "invalid chat completion request") from None


@router.get("/models")
def list_models(db: DbSession, caller: Agent) -> dict[str, Any]:
    rows = db.scalars(select(Model).order_by(Model.id)).all()
    return {"object": "list", "data": [{"id": m.name, "object": "model", "created": int(m.created_at.timestamp()),
                                        "owned_by": "csra"} for m in rows]}


def _completion(job: dict[str, Any], model: str, cid: str) -> dict[str, Any]:
    if job["status"] != "succeeded":
        raise HTTPException(status_code=502 if job["status"] == "failed" else 409,
                            detail=f"generation {job['status']}: {job.get('error') or ''}".strip())
    r = job["result"]
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                     "finish_reason": _finish(r.get("finish_reason")), "logprobs": None}],
        "usage": {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                  "total_tokens": r["prompt_tokens"] + r["completion_tokens"]},
        "system_fingerprint": f"csra-job-{job['id']}",
    }


def _finish(reason: str | None) -> str:
    """OpenAI's finish reasons: a retrieved answer (finish_reason "retrieval" in csra) is a full stop."""
    return "length" if reason == "length" else "stop"


def _chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None = None) -> str:
    return json.dumps({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})


async def _stream(job_id: int, model: str, cid: str) -> AsyncIterator[dict[str, str]]:
    yield {"data": _chunk(cid, model, {"role": "assistant", "content": ""})}
    finish = "stop"
    async for ev in token_events(job_id):
        if ev["event"] == "token":
            yield {"data": _chunk(cid, model, {"content": json.loads(ev["data"])["text"]})}
        else:
            job = json.loads(ev["data"])
            finish = _finish((job.get("result") or {}).get("finish_reason")) if job["status"] == "succeeded" else "stop"
    yield {"data": _chunk(cid, model, {}, finish)}
    yield {"data": "[DONE]"}


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, caller: Agent) -> Any:
    request = _request(body)

    def submit() -> int:
        with get_sessionmaker()() as db:
            return submit_generation(db, request, caller).id

    job_id = await run_in_threadpool(submit)
    cid = f"chatcmpl-{job_id}-{uuid.uuid4().hex[:8]}"
    if body.stream:
        return EventSourceResponse(_stream(job_id, body.model, cid), ping=15)
    final: dict[str, Any] = {}
    async for ev in token_events(job_id):
        if ev["event"] == "done":
            final = json.loads(ev["data"])
    return _completion(final, body.model, cid)


# ----------------------------------------------------------------------------- fine-tuning

STATUS = {"queued": "queued", "running": "running", "succeeded": "succeeded", "failed": "failed",
          "cancelled": "cancelled"}


def _dataset_id(ref: str) -> int:
    dataset_id = parse_id(ref.removeprefix("ds-").removeprefix("file-"))
    if dataset_id is None:
        raise HTTPException(status_code=422, detail=f"training_file {ref[:80]!r} must be a csra dataset id such as "
                                                    "'ds-3' (import the file with POST /datasets first)")
    return dataset_id


def _job_id(ref: str) -> int:
    job_id = parse_id(ref.removeprefix("ftjob-"))
    if job_id is None:
        raise HTTPException(status_code=404, detail=f"fine-tuning job {ref[:80]!r} not found")
    return job_id


def _after(after: str | None, prefix: str) -> int | None:
    """A list's ``after`` cursor (``<prefix><id>``) as an id; 422 when it is not one."""
    if after is None:
        return None
    value = parse_id(after.removeprefix(prefix))
    if value is None:
        raise HTTPException(status_code=422, detail=f"'after' must be an id such as '{prefix}12' "
                                                    "(the last one of the previous page)")
    return value


def _ts(dt: Any) -> int | None:
    return int(dt.timestamp()) if dt is not None else None


def fine_tuning_job(job: Job) -> dict[str, Any]:
    p, r = job.params or {}, job.result or {}
    return {
        "id": f"ftjob-{job.id}", "object": "fine_tuning.job", "created_at": _ts(job.created_at),
        "finished_at": _ts(job.finished_at), "model": p.get("base_model", "baseline"),
        "fine_tuned_model": r.get("model_name"), "organization_id": "csra", "result_files": [],
        "status": STATUS[job.status], "training_file": f"ds-{p.get('dataset_id')}", "validation_file": None,
        "hyperparameters": {"n_epochs": p.get("epochs"), "batch_size": p.get("batch_size"),
                            "learning_rate_multiplier": (p.get("learning_rate") or DEFAULT_LR) / DEFAULT_LR},
        "trained_tokens": r.get("tokens_seen"), "seed": p.get("seed", 42), "estimated_finish": None,
        "error": {"code": "job_failed", "message": job.error, "param": None} if job.status == "failed" else None,
        "integrations": None, "metadata": None,
    }


def _train_job(db: Session, ref: str, caller: Caller) -> Job:
    job = jobs.get_job_or_404(db, _job_id(ref), caller)
    if job.kind != "train":
        raise HTTPException(status_code=404, detail=f"fine-tuning job {ref!r} not found")
    return job


@router.post("/fine_tuning/jobs")
def create_fine_tuning_job(body: FineTuneCreate, db: DbSession, caller: Admin) -> dict[str, Any]:
    hp = body.hyperparameters
    cfg: dict[str, Any] = {"dataset_id": _dataset_id(body.training_file), "base_model": body.model}
    if hp.n_epochs != "auto":
        cfg["epochs"] = hp.n_epochs
    if hp.batch_size != "auto":
        cfg["batch_size"] = hp.batch_size
    if hp.learning_rate_multiplier != "auto":
        cfg["learning_rate"] = DEFAULT_LR * hp.learning_rate_multiplier
    if body.seed is not None:
        cfg["seed"] = body.seed
    if body.suffix:
        cfg["output_name"] = f"ft-{body.suffix}"
    try:
        spec = TrainSpec.model_validate(cfg)
    except ValueError as e:
        raise HTTPException(status_code=422, detail=str(e)) from None
    return fine_tuning_job(submit_training(db, spec, caller))


@router.get("/fine_tuning/jobs")
def list_fine_tuning_jobs(db: DbSession, caller: Admin, limit: Limit = 20,
                          after: Annotated[str | None, Query(pattern=r"^(ftjob-)?[0-9]{1,18}$")] = None
                          ) -> dict[str, Any]:
    q = select(Job).where(Job.kind == "train")
    q = owned(q, Job.owner, caller)
    after_id = _after(after, "ftjob-")
    if after_id is not None:
        q = q.where(Job.id < after_id)
    rows = db.scalars(q.order_by(Job.id.desc()).limit(limit + 1)).all()
    return {"object": "list", "data": [fine_tuning_job(j) for j in rows[:limit]], "has_more": len(rows) > limit}


@router.get("/fine_tuning/jobs/{ref}")
def read_fine_tuning_job(ref: str, db: DbSession, caller: Admin) -> dict[str, Any]:
    return fine_tuning_job(_train_job(db, ref, caller))


@router.post("/fine_tuning/jobs/{ref}/cancel")
def cancel_fine_tuning_job(ref: str, db: DbSession, caller: Admin) -> dict[str, Any]:
    job = _train_job(db, ref, caller)
    return fine_tuning_job(jobs.cancel(db, job.id, caller))


@router.get("/fine_tuning/jobs/{ref}/events")
def fine_tuning_events(ref: str, db: DbSession, caller: Admin, limit: Limit = 20,
                       after: Annotated[str | None, Query(pattern=r"^(ftevent-)?[0-9]{1,18}$")] = None
                       ) -> dict[str, Any]:
    job = _train_job(db, ref, caller)
    q = select(JobEvent).where(JobEvent.job_id == job.id)
    after_id = _after(after, "ftevent-")
    if after_id is not None:
        q = q.where(JobEvent.id < after_id)
    rows = db.scalars(q.order_by(JobEvent.id.desc()).limit(limit + 1)).all()
    data = [{"id": f"ftevent-{e.id}", "object": "fine_tuning.job.event", "created_at": _ts(e.ts),
             "level": "error" if e.message.startswith("failed") else "info",
             "message": e.message or _metric_message(e.data), "data": e.data or {},
             "type": "metrics" if e.kind == "metric" else "message"} for e in rows[:limit]]
    return {"object": "list", "data": data, "has_more": len(rows) > limit}


def _metric_message(data: dict[str, Any] | None) -> str:
    data = data or {}
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in data.items())
