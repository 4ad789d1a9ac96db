"""Training, sweep and evaluation requests (the stored job parameters are ``csra.specs``' models)."""

from __future__ import annotations

import itertools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from csra.specs import EvaluateSpec, TrainSpec

DRY_RUN = "answer 200 with what the run would do and an estimate of its time, without creating a job"


class TrainRequest(TrainSpec):
    """``POST /jobs/train``: a training run, or with ``dry_run`` its estimate."""

    dry_run: bool = Field(False, description=DRY_RUN)

    def spec(self) -> TrainSpec:
        return TrainSpec.model_validate(self.model_dump(exclude={"dry_run"}))


class EvaluateRequest(EvaluateSpec):
    """``POST /jobs/evaluate``: an evaluation, or with ``dry_run`` its estimate."""

    dry_run: bool = Field(False, description=DRY_RUN)

    def spec(self) -> EvaluateSpec:
        return EvaluateSpec.model_validate(self.model_dump(exclude={"dry_run"}))


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
    dry_run: bool = Field(False, description=DRY_RUN)

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
