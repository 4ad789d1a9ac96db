"""A short calibration: training tokens per second of a run's settings on this machine.

What a training estimate divides by when no run of that base model and method has been measured on
this deployment yet. It runs the real training step (``TrainingRun.train_step``: the same model
loading, LoRA, precision and fused optimizer) on a few real rows: one warm-up step, then timed ones.
The optimizer update is timed apart from the forward/backward passes: it costs the same per step
whatever the batch, so the small calibration batches would otherwise overstate it per token (a full
fine-tune of SmolLM2 updates 135M parameters a step).
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

CALIBRATION_BATCH = 4  # rows per timed step at most: long enough to time, short enough to wait for


@dataclass(frozen=True)
class Throughput:
    tokens_per_second: float  # forward and backward passes
    step_seconds: float  # the optimizer update, once a step
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
            tokens, passes, updates = 0, 0.0, 0.0
            steps_timed = timed or range(1)  # a split too small for a warm-up: time its only step
            for step in steps_timed:
                batches = run.step_batches(step)
                started = time.perf_counter()
                tokens += run.train_step(batches)[1]
                passes += time.perf_counter() - started - run.optimizer_seconds
                updates += run.optimizer_seconds
            return Throughput(tokens / max(passes, 1e-9), updates / len(steps_timed), run.precision,
                              run.device.type, tokens, passes + updates)
    finally:
        if num_threads:
            torch.set_num_threads(previous)
