"""Training and sweep jobs (``POST /jobs/train``, ``POST /jobs/sweep``)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import select

from api.deps import DbSession, Owner
from api.enqueue import submit_job
from api.errors import unprocessable
from api.routes.models import find_model
from api.schemas import JobPublic
from csra.settings import get_settings
from csra.specs import TrainSpec
from db.models import Dataset, DatasetExample, DatasetStatus, Model
from models_store.naming import validate_model_name

router = APIRouter(prefix="/jobs", tags=["training"])

MAX_SWEEP = 32


class SweepCreate(BaseModel):
    """A sweep: ``configs`` (each a partial training config) and/or a ``grid`` of values."""

    model_config = ConfigDict(extra="forbid")
    dataset_id: int
    base_model: str = "baseline"
    base: dict[str, Any] = Field(default_factory=dict, description="settings shared by every config")
    configs: list[dict[str, Any]] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="e.g. {'learning_rate': [5e-5, 1e-4]}")
    evaluate: bool = Field(True, description="evaluate every resulting model and the baseline at the end")
    eval_max_samples: int = Field(300, ge=1)

    @model_validator(mode="after")
    def _some(self) -> SweepCreate:
        if not self.configs and not self.grid:
            raise ValueError("give 'configs' (a list of training configs) or a 'grid'")
        return self

    def expand(self) -> list[dict[str, Any]]:
        """Every config crossed with every grid point, over the shared ``base`` settings."""
        base = {**self.base, "dataset_id": self.dataset_id, "base_model": self.base_model}
        points = [dict(zip(self.grid, v, strict=True)) for v in itertools.product(*self.grid.values())]
        return [{**base, **cfg, **point} for cfg in (self.configs or [{}]) for point in (points or [{}])]


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


def validate_train_spec(db: DbSession, spec: TrainSpec) -> None:
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


@router.post("/train", status_code=202, response_model=JobPublic)
def create_train_job(spec: TrainSpec, db: DbSession, owner: Owner) -> Any:
    """Fine-tune a base model on a dataset's train split (queue ``train``)."""
    validate_train_spec(db, spec)
    return submit_job(db, "train", spec.model_dump(mode="json"), owner=owner, dataset_id=spec.dataset_id)


@router.post("/sweep", status_code=202, response_model=JobPublic)
def create_sweep_job(body: SweepCreate, db: DbSession, owner: Owner) -> Any:
    """One child training job per config (run one after another on ``train``), then a leaderboard."""
    configs = body.expand()
    if len(configs) > MAX_SWEEP:
        raise HTTPException(status_code=422, detail=f"a sweep has at most {MAX_SWEEP} configs, got {len(configs)}")
    specs = []
    for i, cfg in enumerate(configs):
        try:
            spec = TrainSpec.model_validate(cfg)
        except ValidationError as e:
            raise unprocessable(e, f"config {i}") from None
        if spec.output_name and any(s.output_name == spec.output_name for s in specs):
            raise HTTPException(status_code=422, detail=f"config {i}: output_name {spec.output_name!r} repeats")
        validate_train_spec(db, spec)
        specs.append(spec)
    params = {
        "dataset_id": body.dataset_id,
        "base_model": body.base_model,
        "configs": [s.model_dump(mode="json") for s in specs],
        "evaluate": body.evaluate,
        "eval_max_samples": body.eval_max_samples,
    }
    return submit_job(db, "sweep", params, owner=owner, dataset_id=body.dataset_id)
