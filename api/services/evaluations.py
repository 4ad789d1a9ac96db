"""Evaluations: the checks before an evaluation job, stored predictions, the leaderboard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import HTTPException
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.schemas.estimates import EvaluateEstimate
from api.services import estimates, jobs
from api.services.access import Caller
from csra.settings import get_settings
from csra.specs import ERROR_PATTERNS, RETRIEVAL, EvaluateSpec
from db.jobs import JobKind
from db.models import Dataset, DatasetExample, DatasetStatus, Evaluation, EvaluationExample, Job, Model
from models_store.naming import preferred_gguf
from models_store.registry import find_model


def validate_evaluation(db: Session, spec: EvaluateSpec) -> list[str]:
    """The checks before an evaluation (422 naming the problem); the models' resolved names."""
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
        quant = spec.backend.partition(":")[2]
        if quant and model is not None and model.kind != RETRIEVAL \
                and preferred_gguf(Path(model.path), [quant]) is None:
            raise HTTPException(status_code=422, detail=(
                f"backend {spec.backend} needs a GGUF export of {model.name!r} at {quant}: POST "
                f'/models/{model.name}/export {{"quantization": "{quant}"}} makes one'))
    if len(set(names)) != len(names):
        raise HTTPException(status_code=422, detail=f"model_ids name the same model twice: {names}")
    return names


def estimate_evaluation(db: Session, spec: EvaluateSpec) -> EvaluateEstimate:
    return estimates.estimate_evaluation(db, spec, validate_evaluation(db, spec))


def submit_evaluation(db: Session, spec: EvaluateSpec, caller: Caller) -> Job:
    """Evaluate one or more models on a dataset's held-out split (queue ``train``)."""
    names = validate_evaluation(db, spec)
    params = {**spec.model_dump(mode="json"), "model_ids": names}
    return jobs.submit(db, JobKind.EVALUATE, params, caller=caller, dataset_id=spec.dataset_id)


def get_evaluation_or_404(db: Session, evaluation_id: int) -> Evaluation:
    ev = db.get(Evaluation, evaluation_id)
    if ev is None:
        raise HTTPException(status_code=404, detail=f"evaluation {evaluation_id} not found")
    return ev


def examples(db: Session, evaluation_id: int, model: str | None, sort: str, pattern: str | None,
             intent: str | None) -> list[EvaluationExample]:
    """Stored predictions with per-example scores; ``sort=worst`` orders by ROUGE-L ascending."""
    if pattern is not None and pattern not in ERROR_PATTERNS:
        raise HTTPException(status_code=422,
                            detail=f"unknown pattern {pattern!r}; choose from {', '.join(ERROR_PATTERNS)}")
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
    return rows


def leaderboard(db: Session, dataset_id: int, metric: str) -> dict[str, Any]:
    """Every model evaluated on this dataset (its latest evaluation), best first, with its training config."""
    latest: dict[str, dict[str, Any]] = {}
    for ev in db.scalars(select(Evaluation).where(Evaluation.dataset_id == dataset_id).order_by(Evaluation.id)):
        for name, agg in (ev.metrics or {}).items():
            if "overall" in agg:
                latest[name] = {"model": name, "evaluation_id": ev.id, "split": ev.split, "sample": ev.sample,
                                "metrics": agg["overall"], "backend": agg.get("backend"),
                                "grounding": agg.get("grounding")}  # as evaluated (a length floor may differ)
    models = {m.name: m for m in db.scalars(select(Model).where(Model.name.in_(list(latest))))}
    rows = []
    for name, row in latest.items():
        m = models.get(name)
        rows.append({**row, "model_id": m.id if m else None, "kind": m.kind if m else None,
                     "training_config": m.training_config if m else None,
                     "training_metrics": m.metrics if m else None})
    rows.sort(key=lambda r: -(r["metrics"].get(metric) or 0.0))
    return {"data": rows, "count": len(rows), "metric": metric}


