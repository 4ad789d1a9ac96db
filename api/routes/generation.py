"""Generation jobs (``POST /jobs/generate``) and their token stream (``GET /jobs/{id}/stream``)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from sse_starlette.sse import EventSourceResponse

from api.deps import Agent, DbSession
from api.params import IdPath
from api.roles import RoleRoute
from api.schemas.jobs import JobPublic
from api.services.generation import submit_generation, token_events
from api.services.jobs import get_job_or_404
from csra.specs import GenerateRequest
from db.jobs import JobKind
from db.models import Job

router = APIRouter(route_class=RoleRoute, prefix="/jobs", tags=["generation"])


@router.post("/generate", status_code=202, response_model=JobPublic)
def create_generate_job(request: GenerateRequest, db: DbSession, caller: Agent) -> Job:
    """One reply from one model (queue ``generate``); poll ``GET /jobs/{id}`` or stream it."""
    return submit_generation(db, request, caller)


@router.get("/{job_id}/stream")
def stream_job(job_id: IdPath, db: DbSession, caller: Agent) -> EventSourceResponse:
    """Server-sent events: each generated piece of text as ``token``, then ``done`` with the job
    (``reset`` when a retried attempt starts the reply over)."""
    job = get_job_or_404(db, job_id, caller)
    if job.kind != JobKind.GENERATE:
        raise HTTPException(status_code=422, detail=f"job {job_id} is a {job.kind} job; only generation jobs stream "
                                                    "tokens (use GET /jobs/{id}/events)")
    return EventSourceResponse(token_events(job_id), ping=15)
