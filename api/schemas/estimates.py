"""What a dry run answers (``"dry_run": true`` on train, sweep and evaluate): the run, without the job."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class SplitTokens(BaseModel):
    rows: int = Field(description="rows in the split")
    rows_used: int = Field(description="rows the run would use (drawn by intent when fewer)")
    prompt_tokens: int | None = Field(description="prompt tokens of the rows used, after truncation; "
                                                  "None: the dataset was imported without token counts")
    reply_tokens: int | None


class Throughput(BaseModel):
    tokens_per_second: float
    step_seconds: float = Field(description="per optimizer step on top of the tokens (a calibration times the "
                                            "update apart; a finished run's tokens/s already includes it: 0)")
    source: str = Field(description="'job N' (a finished run here) or 'calibration' (a short measured run)")
    device: str
    precision: str
    worker: str | None
    measured_at: datetime


class TrainEstimate(BaseModel):
    dry_run: Literal[True] = True
    kind: Literal["train"] = "train"
    base_model: str
    method: str
    tokenizer: str | None = Field(description="whose tokenizer counted the tokens (the default base model's)")
    splits: dict[str, SplitTokens]
    steps: int
    steps_per_epoch: int
    evaluations: int = Field(description="validation passes (each epoch or every eval_every steps, and at the end)")
    tokens_to_process: int | None = Field(description="training tokens over all epochs, plus validation passes "
                                                      "counted at a third (forward only)")
    throughput: Throughput | None
    estimated_seconds: float | None
    summary: str
    confirm: bool = Field(description="ask before starting: longer than CSRA_CONFIRM_TRAIN_ABOVE_SECONDS, "
                                      "or no time estimate could be made")
    note: str | None = None


class SweepEstimate(BaseModel):
    dry_run: Literal[True] = True
    kind: Literal["sweep"] = "sweep"
    configs: list[TrainEstimate]
    estimated_seconds: float | None = Field(description="the configs one after another (evaluation not included)")
    summary: str
    confirm: bool
    note: str | None = None


class ModelEstimate(BaseModel):
    model: str
    estimated_seconds: float | None
    source: str | None = Field(description="the evaluation whose speed it assumes")


class EvaluateEstimate(BaseModel):
    dry_run: Literal[True] = True
    kind: Literal["evaluate"] = "evaluate"
    split: str
    rows: int
    rows_used: int
    prompt_tokens: int | None
    max_new_tokens: int
    models: list[ModelEstimate]
    estimated_seconds: float | None
    summary: str
    confirm: bool
    note: str | None = None
