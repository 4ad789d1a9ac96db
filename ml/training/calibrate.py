"""A short calibration: training tokens per second of a run's settings on this machine.

What a training estimate divides by when no run of that base model and method has been measured on
this deployment yet. It runs the real training step (``TrainingRun.train_step``: the same model
loading, LoRA, precision and fused optimizer) on a few real rows: one warm-up step, then timed ones.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from csra.jobctx import LocalContext
from csra.specs import TrainSpec
from ml.training.run import TrainingRun, _load_base

CALIBRATION_BATCH = 4  # rows per timed step: long enough to time, short enough for a request to wait on


@dataclass(frozen=True)
class Throughput:
    tokens_per_second: float
    precision: str
    device: str
    tokens: int
    seconds: float


def measure_throughput(spec: TrainSpec, rows: list[dict[str, Any]], model_source: str | Path, steps: int = 2,
                       num_threads: int | None = None) -> Throughput:
    """Time ``steps`` training steps (after one warm-up step) of ``spec`` on rows drawn from ``rows``."""
    batch = min(spec.batch_size, CALIBRATION_BATCH)
    small = spec.model_copy(update={"batch_size": batch, "gradient_accumulation": 1, "grounding": None,
                                    "max_train_samples": batch * (steps + 1), "max_eval_samples": 1})
    previous = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        with tempfile.TemporaryDirectory(prefix="csra-calibrate-") as tmp:
            run = TrainingRun(small, _load_base(model_source, small, rows), rows, [], Path(tmp),
                              LocalContext(Path(tmp)))
            timed = range(1, min(steps + 1, run.total_steps))
            if timed:  # warm-up: first-call allocations and kernel choices
                run.train_step(run.step_batches(0))
            started, tokens = time.perf_counter(), 0
            for step in timed or range(1):  # a split too small for a warm-up: time its only step
                tokens += run.train_step(run.step_batches(step))[1]
            seconds = time.perf_counter() - started
            return Throughput(tokens / max(seconds, 1e-9), run.precision, run.device.type, tokens, seconds)
    finally:
        if num_threads:
            torch.set_num_threads(previous)
