"""Training throughput measurements: recorded by every finished run, or by a short calibration.

Not a job: a calibration is asked for by a training estimate (``dry_run``) that found no
measurement for its base model and method, runs on the train queue (the device that would train),
and leaves one ``throughput_measurements`` row the estimate then reads.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from csra.settings import get_settings
from csra.specs import TrainSpec
from db.models import ThroughputMeasurement
from db.session import session_scope

logger = logging.getLogger(__name__)


def record_throughput(base_model: str, method: str, precision: str, device: str, tokens_per_second: float,
                      source: str, job_id: int | None = None, step_seconds: float = 0.0) -> None:
    if tokens_per_second <= 0:
        return
    with session_scope() as s:
        s.add(ThroughputMeasurement(base_model=base_model, method=method, precision=precision, device=device,
                                    tokens_per_second=tokens_per_second, step_seconds=step_seconds,
                                    source=source, job_id=job_id, worker=socket.gethostname()))


def calibrate(params: dict[str, Any]) -> dict[str, Any]:
    """Measure ``params`` (a TrainSpec) on a few rows of its dataset's train split; record the result."""
    from ml.training.calibrate import measure_throughput
    from models_store.registry import resolve_base
    from workers.handlers.training import load_split

    spec = TrainSpec.model_validate(params)
    rows = load_split(spec.dataset_id, "train")
    source, base_name = resolve_base(spec.base_model)
    found = measure_throughput(spec, rows, source, num_threads=get_settings().torch_thread_count)
    record_throughput(base_name, spec.method, found.precision, found.device, found.tokens_per_second,
                      "calibration", step_seconds=found.step_seconds)
    logger.info("calibrated %s (%s, %s on %s): %.0f tokens/s and %.2f s per optimizer update, over %d tokens",
                base_name, spec.method, found.precision, found.device, found.tokens_per_second, found.step_seconds,
                found.tokens)
    return {"base_model": base_name, "tokens_per_second": found.tokens_per_second}
