"""Training and sweeps: the checks that need the database or the store, before a job is created."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import unprocessable
from api.schemas.estimates import SweepEstimate, TrainEstimate
from api.schemas.training import SweepCreate
from api.services import estimates, jobs
from api.services.access import Caller
from csra.settings import get_settings
from csra.specs import RETRIEVAL, TrainSpec
from db.jobs import JobKind
from db.models import Dataset, DatasetExample, DatasetStatus, Job, Model
from models_store.naming import validate_model_name
from models_store.registry import find_model


def _context_length(model: Model | None, ref: str) -> int | None:
    """The base model's context length from its config.json (no torch in the API)."""
    folder = Path(model.path) if model else Path(ref)
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    data = json.loads(cfg.read_text())
    if data.get("is_encoder_decoder"):
        return None  # T5-style relative positions: no fixed limit
    return data.get("max_position_embeddings") or data.get("n_positions")


def validate_train_spec(db: Session, spec: TrainSpec) -> None:
    """Checks that need the database or the store; 422 with a detail naming the problem."""
    ds = db.get(Dataset, spec.dataset_id)
    if ds is None:
        raise HTTPException(status_code=422, detail=f"dataset {spec.dataset_id} does not exist")
    if ds.status != DatasetStatus.READY:
        raise HTTPException(status_code=422, detail=f"dataset {spec.dataset_id} is {ds.status}, not ready for training")
    has_train = db.scalar(
        select(DatasetExample.id).where(DatasetExample.dataset_id == ds.id, DatasetExample.split == "train").limit(1)
    )
    if has_train is None:
        raise HTTPException(status_code=422, detail=f"dataset {spec.dataset_id} has no rows in its train split")
    model = find_model(db, spec.base_model)
    if model is not None and model.kind == RETRIEVAL:
        raise HTTPException(status_code=422, detail=f"{model.name!r} answers from the answer memory; it has no weights "
                                                    "to fine-tune: pick a model from GET /models")
    settings = get_settings()
    if model is None and spec.base_model != settings.baseline_name:
        local = Path(spec.base_model).expanduser()
        if local.is_absolute() or spec.base_model.startswith("."):
            if not local.is_dir():
                raise HTTPException(status_code=422, detail=f"base_model folder {local} does not exist")
        elif "/" not in spec.base_model:
            raise HTTPException(
                status_code=422,
                detail=f"unknown base_model {spec.base_model!r}: use a model name from GET /models, "
                "a Hugging Face id (org/name) or a local folder",
            )
    ctx = _context_length(model, spec.base_model)
    if ctx and spec.max_input_length + spec.max_target_length > ctx:
        raise HTTPException(
            status_code=422,
            detail=f"max_input_length + max_target_length = {spec.max_input_length + spec.max_target_length} "
            f"is beyond the model's context of {ctx} tokens",
        )
    if spec.output_name:
        try:
            validate_model_name(spec.output_name)
        except ValueError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        if db.scalar(select(Model.id).where(Model.name == spec.output_name)) is not None:
            raise HTTPException(status_code=409, detail=f"a model named {spec.output_name!r} already exists")


def estimate_training(db: Session, spec: TrainSpec) -> TrainEstimate:
    validate_train_spec(db, spec)  # the same 422s as a real submission
    return estimates.estimate_training(db, spec)


def estimate_sweep(db: Session, body: SweepCreate) -> SweepEstimate:
    return estimates.estimate_sweep(db, sweep_specs(db, body))


def submit_training(db: Session, spec: TrainSpec, caller: Caller) -> Job:
    validate_train_spec(db, spec)
    return jobs.submit(db, JobKind.TRAIN, spec.model_dump(mode="json"), caller=caller, dataset_id=spec.dataset_id)


def sweep_specs(db: Session, body: SweepCreate) -> list[TrainSpec]:
    """The sweep's configs as validated training specs (422 naming the config that is wrong)."""
    configs = body.expand()  # at most MAX_SWEEP: SweepCreate checked its size from the list lengths
    specs: list[TrainSpec] = []
    for i, cfg in enumerate(configs):
        try:
            spec = TrainSpec.model_validate(cfg)
        except ValidationError as e:
            raise unprocessable(e, f"config {i}") from None
        if spec.output_name and any(s.output_name == spec.output_name for s in specs):
            raise HTTPException(status_code=422, detail=f"config {i}: output_name {spec.output_name!r} repeats")
        validate_train_spec(db, spec)
        specs.append(spec)
    return specs


def submit_sweep(db: Session, body: SweepCreate, caller: Caller) -> Job:
    """One child training job per config (run one after another on ``train``), then a leaderboard."""
    specs = sweep_specs(db, body)
    params: dict[str, Any] = {
        "dataset_id": body.dataset_id, "base_model": body.base_model,
        "configs": [s.model_dump(mode="json") for s in specs],
        "evaluate": body.evaluate, "eval_max_samples": body.eval_max_samples,
        "eval_max_new_tokens": body.eval_max_new_tokens,
    }
    return jobs.submit(db, JobKind.SWEEP, params, caller=caller, dataset_id=body.dataset_id)
