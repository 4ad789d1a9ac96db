"""Evaluation jobs, their metrics, stored predictions, leaderboard and error-analysis report."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import FileResponse, RedirectResponse
from sqlalchemy import select

from api.deps import Admin, Agent, DbSession
from api.params import IdPath, IdQuery, Limit, Offset
from api.roles import RoleRoute
from api.schemas.estimates import EvaluateEstimate
from api.schemas.evaluations import EvaluationPublic, EvaluationsPublic
from api.schemas.jobs import JobPublic
from api.schemas.training import EvaluateRequest
from api.services import evaluations
from csra.settings import get_settings
from csra.specs import ERROR_PATTERNS
from db.models import Evaluation, Job

router = APIRouter(route_class=RoleRoute, tags=["evaluation"])
PATTERN_HELP = f"only examples showing an error pattern: {', '.join(ERROR_PATTERNS)}"

FILE_RE = re.compile(r"^[a-z_]+\.(png|md|html)$")


@router.post("/jobs/evaluate", status_code=202, response_model=JobPublic | EvaluateEstimate, tags=["jobs"],
             responses={200: {"model": EvaluateEstimate, "description": "dry_run: the estimate; no job was created"}})
def create_evaluate_job(body: EvaluateRequest, db: DbSession, caller: Admin, response: Response
                        ) -> Job | EvaluateEstimate:
    """Evaluate one or more models on a dataset's held-out split (queue ``train``); ``dry_run``: estimate it."""
    if body.dry_run:
        response.status_code = 200
        return evaluations.estimate_evaluation(db, body.spec())
    return evaluations.submit_evaluation(db, body.spec(), caller)


@router.get("/evaluations", response_model=EvaluationsPublic)
def list_evaluations(db: DbSession, caller: Agent, dataset_id: IdQuery | None = None,
                     limit: Limit = 50) -> EvaluationsPublic:
    q = select(Evaluation)
    if dataset_id is not None:
        q = q.where(Evaluation.dataset_id == dataset_id)
    rows = db.scalars(q.order_by(Evaluation.id.desc()).limit(limit)).all()
    return EvaluationsPublic(data=[EvaluationPublic.model_validate(r) for r in rows], count=len(rows))


@router.get("/evaluations/{evaluation_id}", response_model=EvaluationPublic)
def read_evaluation(evaluation_id: IdPath, db: DbSession, caller: Agent) -> Evaluation:
    return evaluations.get_evaluation_or_404(db, evaluation_id)


@router.get("/evaluations/{evaluation_id}/examples")
def evaluation_examples(
    evaluation_id: IdPath, db: DbSession, caller: Agent, model: str | None = None,
    sort: Literal["worst", "best", "id"] = "worst",
    pattern: str | None = Query(None, description=PATTERN_HELP),
    intent: str | None = None, limit: Limit = 20, offset: Offset = 0,
) -> dict[str, Any]:
    """Stored predictions with per-example scores; ``sort=worst`` orders by ROUGE-L ascending."""
    evaluations.get_evaluation_or_404(db, evaluation_id)
    rows = evaluations.examples(db, evaluation_id, model, sort, pattern, intent)
    page = rows[offset:offset + limit]
    return {"count": len(rows), "data": [
        {"id": r.id, "model": r.model_name, "example_id": r.example_id, "intent": r.intent, "category": r.category,
         "prompt": r.prompt, "reference": r.reference, "prediction": r.prediction, "scores": r.scores,
         "latency_ms": r.latency_ms} for r in page]}


@router.get("/leaderboard")
def leaderboard(db: DbSession, caller: Agent, dataset_id: IdQuery,
                metric: str = Query("rouge_l", description="the overall metric to rank by")) -> dict[str, Any]:
    """Every model evaluated on this dataset (its latest evaluation), best first, with its training config."""
    return evaluations.leaderboard(db, dataset_id, metric)


def _report_dir(evaluation_id: int) -> Path:
    return get_settings().data_dir / "evaluations" / str(evaluation_id)


@router.get("/evaluations/{evaluation_id}/report")
def evaluation_report(evaluation_id: IdPath, db: DbSession, caller: Agent,
                      format: Literal["md", "html"] = "html") -> RedirectResponse:
    evaluations.get_evaluation_or_404(db, evaluation_id)
    return RedirectResponse(f"/evaluations/{evaluation_id}/report.{format}", status_code=307)


@router.get("/evaluations/{evaluation_id}/{filename}")
def evaluation_file(evaluation_id: IdPath, filename: str, db: DbSession, caller: Agent) -> FileResponse:
    """The report (``report.md``, ``report.html``) and its plots, from the data dir."""
    ev = evaluations.get_evaluation_or_404(db, evaluation_id)
    if not FILE_RE.match(filename):
        raise HTTPException(status_code=404, detail=f"no file {filename!r} in evaluation {evaluation_id}")
    path = _report_dir(evaluation_id) / filename
    if not path.is_file():
        detail = (f"evaluation {evaluation_id} is {ev.status}; its report is written when it finishes"
                  if ev.status == "running" else f"no file {filename!r} in evaluation {evaluation_id}")
        raise HTTPException(status_code=404, detail=detail)
    return FileResponse(path)
