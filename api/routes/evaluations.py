"""Evaluation jobs, their metrics, stored predictions, leaderboard and error-analysis report."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select

from api.deps import DbSession, Owner
from api.enqueue import submit_job
from api.routes.models import find_model
from api.schemas import JobPublic
from csra.settings import get_settings
from csra.specs import EvaluateSpec
from db.models import Dataset, DatasetExample, DatasetStatus, Evaluation, EvaluationExample, Model

router = APIRouter(tags=["evaluation"])

PATTERNS = ("too_verbose", "asks_needless_details", "repetitive", "off_tone", "unfinished",
            "placeholders_invented", "placeholders_broken")
FILE_RE = re.compile(r"^[a-z_]+\.(png|md|html)$")


class EvaluationPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    job_id: int | None
    dataset_id: int | None
    split: str
    status: str
    params: dict[str, Any]
    metrics: dict[str, Any] | None
    sample: dict[str, Any] | None = None
    created_at: datetime


class EvaluationsPublic(BaseModel):
    data: list[EvaluationPublic]
    count: int


@router.post("/jobs/evaluate", status_code=202, response_model=JobPublic, tags=["jobs"])
def create_evaluate_job(spec: EvaluateSpec, db: DbSession, owner: Owner) -> Any:
    """Evaluate one or more models on a dataset's held-out split (queue ``train``)."""
    ds = db.get(Dataset, spec.dataset_id)
    if ds is None:
        raise HTTPException(status_code=422, detail=f"dataset {spec.dataset_id} does not exist")
    if ds.status != DatasetStatus.READY:
        raise HTTPException(status_code=422, detail=f"dataset {spec.dataset_id} is {ds.status}, not ready")
    n = db.scalar(select(func.count(DatasetExample.id)).where(DatasetExample.dataset_id == ds.id,
                                                               DatasetExample.split == spec.split))
    if not n:
        raise HTTPException(status_code=422, detail=f"the {spec.split} split of dataset {ds.id} is empty")
    names = []
    for ref in spec.model_ids:
        model = find_model(db, ref)
        if model is None and ref != get_settings().baseline_name:
            raise HTTPException(status_code=422, detail=f"unknown model {ref!r}: GET /models lists the models")
        names.append(model.name if model else ref)
    if len(set(names)) != len(names):
        raise HTTPException(status_code=422, detail=f"model_ids name the same model twice: {names}")
    params = {**spec.model_dump(mode="json"), "model_ids": names}
    return submit_job(db, "evaluate", params, owner=owner, dataset_id=spec.dataset_id)


def get_evaluation_or_404(db: DbSession, evaluation_id: int) -> Evaluation:
    ev = db.get(Evaluation, evaluation_id)
    if ev is None:
        raise HTTPException(status_code=404, detail=f"evaluation {evaluation_id} not found")
    return ev


@router.get("/evaluations", response_model=EvaluationsPublic)
def list_evaluations(db: DbSession, owner: Owner, dataset_id: int | None = None,
                     limit: int = Query(50, ge=1, le=500)) -> EvaluationsPublic:
    q = select(Evaluation)
    if dataset_id is not None:
        q = q.where(Evaluation.dataset_id == dataset_id)
    rows = db.scalars(q.order_by(Evaluation.id.desc()).limit(limit)).all()
    return EvaluationsPublic(data=[EvaluationPublic.model_validate(r) for r in rows], count=len(rows))


@router.get("/evaluations/{evaluation_id}", response_model=EvaluationPublic)
def read_evaluation(evaluation_id: int, db: DbSession, owner: Owner) -> Evaluation:
    return get_evaluation_or_404(db, evaluation_id)


@router.get("/evaluations/{evaluation_id}/examples")
def evaluation_examples(
    evaluation_id: int, db: DbSession, owner: Owner, model: str | None = None,
    sort: Literal["worst", "best", "id"] = "worst",
    pattern: str | None = Query(None, description=f"only examples showing an error pattern: {', '.join(PATTERNS)}"),
    intent: str | None = None, limit: int = Query(20, ge=1, le=500), offset: int = Query(0, ge=0),
) -> dict[str, Any]:
    """Stored predictions with per-example scores; ``sort=worst`` orders by ROUGE-L ascending."""
    get_evaluation_or_404(db, evaluation_id)
    if pattern is not None and pattern not in PATTERNS:
        raise HTTPException(status_code=422, detail=f"unknown pattern {pattern!r}; choose from {', '.join(PATTERNS)}")
    q = select(EvaluationExample).where(EvaluationExample.evaluation_id == evaluation_id)
    if model:
        q = q.where(EvaluationExample.model_name == model)
    if intent:
        q = q.where(EvaluationExample.intent == intent)
    rows = list(db.scalars(q.order_by(EvaluationExample.id)))
    if pattern:
        rows = [r for r in rows if (r.scores or {}).get(pattern)]
    if sort != "id":
        rows.sort(key=lambda r: (r.scores or {}).get("rouge_l") or 0.0, reverse=sort == "best")
    page = rows[offset:offset + limit]
    return {"count": len(rows), "data": [
        {"id": r.id, "model": r.model_name, "example_id": r.example_id, "intent": r.intent, "category": r.category,
         "prompt": r.prompt, "reference": r.reference, "prediction": r.prediction, "scores": r.scores,
         "latency_ms": r.latency_ms} for r in page]}


@router.get("/leaderboard")
def leaderboard(db: DbSession, owner: Owner, dataset_id: int,
                metric: str = Query("rouge_l", description="the overall metric to rank by")) -> dict[str, Any]:
    """Every model evaluated on this dataset (its latest evaluation), best first, with its training config."""
    latest: dict[str, dict[str, Any]] = {}
    for ev in db.scalars(select(Evaluation).where(Evaluation.dataset_id == dataset_id).order_by(Evaluation.id)):
        for name, agg in (ev.metrics or {}).items():
            if "overall" in agg:
                latest[name] = {"model": name, "evaluation_id": ev.id, "split": ev.split, "sample": ev.sample,
                                "metrics": agg["overall"]}
    models = {m.name: m for m in db.scalars(select(Model).where(Model.name.in_(list(latest))))}
    rows = []
    for name, row in latest.items():
        m = models.get(name)
        rows.append({**row, "model_id": m.id if m else None, "kind": m.kind if m else None,
                     "training_config": m.training_config if m else None,
                     "training_metrics": m.metrics if m else None})
    rows.sort(key=lambda r: -(r["metrics"].get(metric) or 0.0))
    return {"data": rows, "count": len(rows), "metric": metric}


def _report_dir(evaluation_id: int) -> Path:
    return get_settings().data_dir / "evaluations" / str(evaluation_id)


@router.get("/evaluations/{evaluation_id}/report")
def evaluation_report(evaluation_id: int, db: DbSession, owner: Owner,
                      format: Literal["md", "html"] = "html") -> RedirectResponse:
    get_evaluation_or_404(db, evaluation_id)
    return RedirectResponse(f"/evaluations/{evaluation_id}/report.{format}", status_code=307)


@router.get("/evaluations/{evaluation_id}/{filename}")
def evaluation_file(evaluation_id: int, filename: str, db: DbSession, owner: Owner) -> FileResponse:
    """The report (``report.md``, ``report.html``) and its plots, from the data dir."""
    ev = get_evaluation_or_404(db, evaluation_id)
    if not FILE_RE.match(filename):
        raise HTTPException(status_code=404, detail=f"no file {filename!r} in evaluation {evaluation_id}")
    path = _report_dir(evaluation_id) / filename
    if not path.is_file():
        detail = (f"evaluation {evaluation_id} is {ev.status}; its report is written when it finishes"
                  if ev.status == "running" else f"no file {filename!r} in evaluation {evaluation_id}")
        raise HTTPException(status_code=404, detail=detail)
    return FileResponse(path)
