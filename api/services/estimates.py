"""Dry runs: what a training run, sweep or evaluation would do and roughly how long it would take.

Tokens come from the counts the import stored on every example (the default base model's tokenizer,
before truncation: each run's limits are applied here in SQL). Time divides a run's tokens by the
throughput this deployment's train worker measured: the latest finished run of the same base model
and method, else a short calibration the train worker runs now (``workers.handlers.calibration``),
waited for up to ``CSRA_ESTIMATE_WAIT_SECONDS``. Without a live train worker, or while it is busy,
the estimate says so and gives no time rather than a guess.
"""

from __future__ import annotations

import math
import time
from typing import Any

import redis
from kombu.exceptions import KombuError
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import QueryableAttribute, Session

from api.schemas.estimates import (
    EvaluateEstimate,
    ModelEstimate,
    SplitTokens,
    SweepEstimate,
    Throughput,
    TrainEstimate,
)
from csra.presence import live_workers
from csra.queue import CALIBRATION_ERROR, QUEUES, calibration_key, send_calibration
from csra.redis_conn import get_redis
from csra.settings import get_settings
from csra.specs import RETRIEVAL, EvaluateSpec, TrainSpec
from db.jobs import JobStatus
from db.models import Dataset, DatasetExample, Evaluation, Job, ThroughputMeasurement
from models_store.registry import find_model

EVAL_COST = 1 / 3  # a validation token is a forward pass only: about a third of a training token
POLL_SECONDS = 0.5


def duration(seconds: float) -> str:
    """'about 45 s', 'about 12 min', 'about 6 h 10 min'."""
    if seconds < 90:
        return f"about {max(round(seconds), 1)} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"about {minutes} min"
    return f"about {minutes // 60} h {minutes % 60} min"


def _capped(col: ColumnElement[Any] | QueryableAttribute[Any], cap: int) -> ColumnElement[Any]:
    return case((col > cap, cap), else_=col)


def _split(db: Session, dataset_id: int, split: str, used: int | None, max_prompt: int, max_reply: int,
           extra_prompt: int = 0) -> SplitTokens:
    """A split's rows and the tokens of the rows a run uses (scaled from the split's when it draws fewer)."""
    ex = DatasetExample
    rows, counted, prompt, reply = db.execute(
        select(func.count(ex.id), func.count(ex.prompt_tokens), func.sum(_capped(ex.prompt_tokens + extra_prompt,
                                                                                   max_prompt)),
               func.sum(_capped(ex.reply_tokens, max_reply)))
        .where(ex.dataset_id == dataset_id, ex.split == split)
    ).one()
    n_used = rows if used is None else min(rows, used)
    if not rows or counted < rows:
        return SplitTokens(rows=rows, rows_used=n_used, prompt_tokens=None if rows else 0,
                           reply_tokens=None if rows else 0)
    share = n_used / rows
    return SplitTokens(rows=rows, rows_used=n_used, prompt_tokens=round(prompt * share),
                       reply_tokens=round(reply * share))


def _base_name(db: Session, ref: str) -> str:
    model = find_model(db, ref)
    return model.name if model is not None else ref


def _measured(db: Session, base: str, spec: TrainSpec) -> Throughput | None:
    m = ThroughputMeasurement
    q = select(m).where(m.base_model == base, m.method == spec.method)
    if spec.precision != "auto":
        q = q.where(m.precision == spec.precision)
    newest = (m.measured_at.desc(), m.id.desc())
    row = None
    if spec.precision == "auto":  # auto runs in bf16 wherever bf16 was ever measured: prefer that speed
        row = db.scalar(q.where(m.precision != "fp32").order_by(*newest).limit(1))
    row = row or db.scalar(q.order_by(*newest).limit(1))
    if row is None:
        return None
    source = f"job {row.job_id}" if row.source == "job" and row.job_id else row.source
    return Throughput(tokens_per_second=row.tokens_per_second, step_seconds=row.step_seconds, source=source,
                      device=row.device,
                      precision=row.precision, worker=row.worker, measured_at=row.measured_at)


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _calibrate(db: Session, base: str, spec: TrainSpec) -> tuple[Throughput | None, str | None]:
    """Ask the train worker for a measurement and wait for it; (None, why) when it cannot come now."""
    try:
        client = get_redis()
        if not live_workers(client, QUEUES).get("train"):
            return None, ("no train worker is alive, so no time estimate: start one (`csra worker --queue train`, "
                          "or `csra up`)")
        key = calibration_key(base, spec.method, spec.precision)
        wait = get_settings().estimate_wait_seconds
        failed = client.get(key + CALIBRATION_ERROR)
        if failed is not None:  # tried moments ago and failed: say why rather than load the model again
            return None, f"the train worker could not calibrate {base} ({spec.method}): {_text(failed)}"
        if client.set(key, "1", nx=True, ex=600):  # the worker deletes it when done; 600 s: the task's expiry
            try:
                send_calibration(spec.model_dump(mode="json"), key)
            except Exception:  # kombu's errors share no base class with redis-py's; no stale key either way
                client.delete(key)
                raise
    except (redis.RedisError, OSError, KombuError):
        return None, "Redis is unreachable, so the train worker cannot be asked for a time estimate"
    deadline = time.monotonic() + wait
    while True:
        db.rollback()  # a fresh snapshot: the worker commits the measurement in another connection
        found = _measured(db, base, spec)
        failed = None if found is not None else client.get(key + CALIBRATION_ERROR)
        if found is not None or failed is not None or time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    if found is not None:
        return found, None
    if failed is not None:
        return None, f"the train worker could not calibrate {base} ({spec.method}): {_text(failed)}"
    busy = db.scalar(select(Job.id).where(Job.queue == "train", Job.status == JobStatus.RUNNING).limit(1))
    behind = f" (it is busy with job {busy})" if busy else ""
    return None, (f"{base} ({spec.method}) has never been measured on this deployment and the train worker's "
                  f"calibration has not finished{behind}: ask again in a minute for a time estimate")


def _evaluations(steps: int, steps_per_epoch: int, every: int | str) -> int:
    period = steps_per_epoch if every == "epoch" else int(every)
    return steps // period + (1 if steps % period else 0)


def estimate_training(db: Session, spec: TrainSpec, calibrate: bool = True) -> TrainEstimate:
    """The estimate of a validated ``spec`` (``api.services.training.validate_train_spec``)."""
    base = _base_name(db, spec.base_model)
    extra = 0
    if spec.grounding is not None:  # exemplars at their token budget, plus the template's words (~40)
        extra = spec.grounding.k * (spec.grounding.max_exemplar_tokens + 4) + 40
    cap_in, cap_out = spec.max_input_length, spec.max_target_length
    splits = {
        "train": _split(db, spec.dataset_id, "train", spec.max_train_samples, cap_in, cap_out, extra),
        "validation": _split(db, spec.dataset_id, "validation", spec.max_eval_samples, cap_in, cap_out, extra),
        "test": _split(db, spec.dataset_id, "test", 0, cap_in, cap_out),
    }
    train, val = splits["train"], splits["validation"]
    steps_per_epoch = math.ceil(math.ceil(train.rows_used / spec.batch_size) / spec.gradient_accumulation)
    steps = math.ceil(spec.epochs * steps_per_epoch)
    evaluations = _evaluations(steps, steps_per_epoch, spec.eval_every) if val.rows_used else 0
    tokens: int | None = None
    if train.prompt_tokens is not None and val.prompt_tokens is not None:
        per_epoch = train.prompt_tokens + (train.reply_tokens or 0)
        val_pass = val.prompt_tokens + (val.reply_tokens or 0)
        tokens = round(per_epoch * steps / max(steps_per_epoch, 1) + evaluations * val_pass * EVAL_COST)
    throughput, note = _measured(db, base, spec), None
    if throughput is None and calibrate and tokens is not None:  # no tokens: no time, whatever the speed
        throughput, note = _calibrate(db, base, spec)
    if tokens is None:
        note = (f"dataset {spec.dataset_id} has no token counts (imported before csra counted them, or without the "
                "default base model): import it again for an estimate")
    seconds = None
    if tokens is not None and throughput is not None:
        seconds = tokens / throughput.tokens_per_second + steps * throughput.step_seconds
    ds = db.get(Dataset, spec.dataset_id)
    tokenizer = ((ds.stats or {}).get("tokens") or {}).get("tokenizer") if ds is not None else None
    summary = f"{train.rows_used:,} rows"
    if tokens is not None:
        summary += f" ({train.prompt_tokens:,} prompt + {train.reply_tokens:,} reply tokens an epoch)"
    summary += f", {steps:,} steps"
    if seconds is not None and throughput is not None:
        summary += (f": {duration(seconds)} on {throughput.device}, {throughput.precision} "
                    f"({throughput.tokens_per_second:,.0f} tokens/s measured by {throughput.source})")
    elif note:
        summary += f"; no time estimate: {note}"
    confirm = seconds is None or seconds > get_settings().confirm_train_above_seconds
    return TrainEstimate(base_model=base, method=spec.method, tokenizer=tokenizer, splits=splits, steps=steps,
                         steps_per_epoch=steps_per_epoch, evaluations=evaluations, tokens_to_process=tokens,
                         throughput=throughput, estimated_seconds=seconds, summary=summary, confirm=confirm,
                         note=note)


def estimate_sweep(db: Session, specs: list[TrainSpec]) -> SweepEstimate:
    """Each config's estimate; a calibration is asked for (and waited on) once per base model, method and
    precision, not once per config."""
    asked: set[tuple[str, str, str]] = set()
    configs = []
    for s in specs:
        setting = (_base_name(db, s.base_model), s.method, s.precision)
        configs.append(estimate_training(db, s, calibrate=setting not in asked))
        asked.add(setting)
    known = [c.estimated_seconds for c in configs]
    total = sum(s for s in known if s is not None) if all(s is not None for s in known) else None
    summary = f"{len(configs)} training runs, {sum(c.steps for c in configs):,} steps"
    summary += f": {duration(total)} one after another" if total is not None else "; no time estimate for all runs"
    note = next((c.note for c in configs if c.note), None)
    confirm = total is None or total > get_settings().confirm_train_above_seconds
    return SweepEstimate(configs=configs, estimated_seconds=total, summary=summary, confirm=confirm, note=note)


def _examples_per_second(db: Session, name: str, spec: EvaluateSpec) -> tuple[float, int] | None:
    """The speed (examples/s) and id of ``name``'s latest evaluation here with the same generation settings
    (reply length limit and beams decide the time far more than the rows)."""
    for ev in db.scalars(select(Evaluation).where(Evaluation.status == "succeeded")
                         .order_by(Evaluation.id.desc()).limit(50)):
        same = all((ev.params or {}).get(k) == getattr(spec, k) for k in ("max_new_tokens", "num_beams"))
        eps = ((ev.metrics or {}).get(name) or {}).get("overall", {}).get("examples_per_second") if same else None
        if eps:
            return float(eps), ev.id
    return None


def estimate_evaluation(db: Session, spec: EvaluateSpec, names: list[str]) -> EvaluateEstimate:
    """The estimate of a validated evaluation (``names``: the resolved model names)."""
    split = _split(db, spec.dataset_id, spec.split, spec.max_samples, 10**9, 10**9)
    models: list[ModelEstimate] = []
    for name in names:
        model = find_model(db, name)
        if model is not None and model.kind == RETRIEVAL:
            models.append(ModelEstimate(model=name, estimated_seconds=0.0, source="no generation (retrieval)"))
            continue
        speed = _examples_per_second(db, name, spec)
        models.append(ModelEstimate(model=name, estimated_seconds=split.rows_used / speed[0] if speed else None,
                                    source=f"evaluation {speed[1]}" if speed else None))
    unknown = [m.model for m in models if m.estimated_seconds is None]
    total = None if unknown else sum(m.estimated_seconds or 0.0 for m in models)
    note = (f"no evaluation of {', '.join(unknown)} with max_new_tokens={spec.max_new_tokens} and "
            f"num_beams={spec.num_beams} has finished on this deployment yet, so no time estimate for "
            "it" if unknown else None)
    summary = f"{split.rows_used:,} of {split.rows:,} {spec.split} rows x {len(names)} model(s)"
    summary += f": {duration(total)}" if total is not None else f"; {note}"
    # asked only above the threshold: no estimate is the rule for a model never evaluated here (every new
    # fine-tune), and asking then would stop every script
    confirm = total is not None and total > get_settings().confirm_train_above_seconds
    return EvaluateEstimate(split=spec.split, rows=split.rows, rows_used=split.rows_used,
                            prompt_tokens=split.prompt_tokens, max_new_tokens=spec.max_new_tokens, models=models,
                            estimated_seconds=total, summary=summary, confirm=confirm, note=note)
