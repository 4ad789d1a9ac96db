"""Training, sweep and evaluation requests (the stored job parameters are ``csra.specs``' models)."""

from __future__ import annotations

import itertools
import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from csra.specs import REPLY_TOKENS, EvaluateSpec, MaxNewTokens, TrainSpec

MAX_SWEEP = 32  # configs in one sweep
MAX_GRID_KEYS = 16
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
    configs: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_SWEEP)
    grid: dict[str, Annotated[list[Any], Field(min_length=1, max_length=MAX_SWEEP)]] = Field(
        default_factory=dict, max_length=MAX_GRID_KEYS,
        description=f"e.g. {{'learning_rate': [5e-5, 1e-4]}}; configs x grid points: at most {MAX_SWEEP}",
    )
    evaluate: bool = Field(True, description="evaluate every resulting model and the baseline at the end")
    eval_max_samples: int = Field(300, ge=1)
    eval_max_new_tokens: MaxNewTokens = Field(
        REPLY_TOKENS, description="longest generated reply in that evaluation (its `max_new_tokens`); a grounded "
        "reply held to a longer approved answer may run to that answer's end"
    )
    dry_run: bool = Field(False, description=DRY_RUN)

    @model_validator(mode="after")
    def _some(self) -> SweepCreate:
        if not self.configs and not self.grid:
            raise ValueError("give 'configs' (a list of training configs) or a 'grid'")
        if self.size() > MAX_SWEEP:  # from the list lengths: nothing is built for a sweep that is refused
            shape = " x ".join(str(n) for n in [len(self.configs)] * bool(self.configs)
                               + [len(v) for v in self.grid.values()])
            raise ValueError(f"a sweep has at most {MAX_SWEEP} configs; this one has {self.size()} ({shape})")
        return self

    def size(self) -> int:
        """How many configs ``expand`` makes: configs times grid points, computed without building them."""
        return max(len(self.configs), 1) * math.prod(len(v) for v in self.grid.values())

    def expand(self) -> list[dict[str, Any]]:
        """Every config crossed with every grid point, over the shared ``base`` settings."""
        base = {**self.base, "dataset_id": self.dataset_id, "base_model": self.base_model}
        points = [dict(zip(self.grid, v, strict=True)) for v in itertools.product(*self.grid.values())]
        return [{**base, **cfg, **point} for cfg in (self.configs or [{}]) for point in (points or [{}])]
