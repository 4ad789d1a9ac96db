"""Training jobs: a dataset split from the database in, a registered model out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sqlalchemy import select

from csra.jobctx import JobCancelled, JobContext, JobError
from csra.settings import get_settings
from csra.specs import Grounding, TrainSpec
from db.models import Dataset, DatasetExample, DatasetStatus, Model
from db.session import session_scope
from ml.cpu_share import CpuYielder, InteractiveSignal
from ml.memory.grounding import answers_needed, grounding_exemplars, training_grounding
from models_store.registry import register_model, resolve_base
from workers.context import LostClaim
from workers.handlers.calibration import record_throughput

logger = logging.getLogger(__name__)

ROW_FIELDS = ("instruction", "input", "output", "intent", "category")


def load_split(dataset_id: int, split: str) -> list[dict[str, Any]]:
    with session_scope() as s:
        ds = s.get(Dataset, dataset_id)
        if ds is None:
            raise JobError(f"dataset {dataset_id} does not exist")
        if ds.status != DatasetStatus.READY:
            raise JobError(f"dataset {dataset_id} is {ds.status}, not ready")
        rows = s.execute(
            select(DatasetExample.id, *(getattr(DatasetExample, f) for f in ROW_FIELDS))
            .where(DatasetExample.dataset_id == dataset_id, DatasetExample.split == split)
            .order_by(DatasetExample.id)
        ).all()
    return [r._asdict() for r in rows]


def background_yielder(ctx: JobContext) -> CpuYielder | None:
    """Pauses a training or evaluation job while the generate worker on this machine answers chats; a
    cancel reaches a paused job within a second (it stops pausing, and its own check then ends it)."""
    settings = get_settings()
    if not settings.train_yields_to_chat:
        return None

    def ending() -> bool:
        try:
            ctx.check_cancelled()
        except (JobCancelled, JobError, LostClaim):  # raised again by the job's own check
            return True
        return False

    return CpuYielder(InteractiveSignal(settings.interactive_signal_path), settings.train_yield_max_seconds, ending)


def grounder(dataset_id: int, train_rows: list[dict[str, Any]], grounding: Grounding, ctx: JobContext
             ) -> Callable[[Sequence[dict[str, Any]]], list[list[str]]]:
    """Exemplars for grounded training: the answers to each row's ``k`` nearest training messages
    (``training_grounding``: not the consensus ones chat and evaluation choose), from the train split only
    and never from the row's own leakage group (the same message, any copy of it)."""
    from csra.memory import embedder
    from workers.handlers.memory import ensure_embedder
    from workers.neighbours import nearest, split_memory

    grounding = training_grounding(grounding)
    ctx.progress(0.0, "finding each example's nearest approved answers")
    ensure_embedder()
    memory, vectors = split_memory(dataset_id, train_rows, ctx)
    known = {r["id"]: v for r, v in zip(train_rows, vectors, strict=True)}  # not embedded twice

    def ground(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
        messages = [r["input"] for r in rows]
        missing = [i for i, r in enumerate(rows) if r["id"] not in known]  # validation rows
        fresh = dict(zip(missing, embedder().embed([messages[i] for i in missing]), strict=True)) if missing else {}
        stacked = np.stack([fresh[i] if i in fresh else known[r["id"]] for i, r in enumerate(rows)])
        hits = nearest(memory, stacked, messages, answers_needed(grounding))
        return [[h.entry.reply for h in grounding_exemplars(grounding, found)] for found in hits]

    return ground


def _already_registered(job_id: int) -> dict[str, Any] | None:
    """A retried job whose model was registered before the worker died: report it, don't retrain."""
    with session_scope() as s:
        row = s.scalar(select(Model).where(Model.train_job_id == job_id))
        if row is None:
            return None
        return {"model_id": row.id, "model_name": row.name, **(row.metrics or {})}


def handle_train(job_id: int, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    from ml.training.run import run_training

    spec = TrainSpec.model_validate(params)
    done = _already_registered(job_id)
    if done is not None:
        return done
    ctx.progress(0.0, "loading data")
    train_rows = load_split(spec.dataset_id, "train")
    val_rows = load_split(spec.dataset_id, "validation")
    ctx.progress(0.0, "loading base model")
    source, base_name = resolve_base(spec.base_model)
    settings = get_settings()
    ground = grounder(spec.dataset_id, train_rows, spec.grounding, ctx) if spec.grounding else None
    result = run_training(spec, train_rows, val_rows, source, ctx.work_dir, ctx,
                          num_threads=settings.torch_thread_count, yield_cpu=background_yielder(ctx), ground=ground,
                          checkpoint_seconds=settings.checkpoint_minutes * 60 or None)
    cancelled = bool(result.pop("cancelled", False))
    history = result.pop("history", [])
    name = spec.output_name or f"ft-{job_id}"
    metrics = {k: result.get(k) for k in ("best_val_loss", "final_val_loss", "final_train_loss", "tokens_seen",
                                          "steps", "tokens_per_second", "precision", "train_rows", "train_intents")}
    model = register_model(
        name, ctx.work_dir / "model", kind="fine-tuned", base_model=base_name, train_job_id=job_id,
        dataset_id=spec.dataset_id, training_config=spec.model_dump(mode="json"), metrics=metrics,
    )
    ctx.event("log", f"registered model {name!r} (id {model['id']})")
    record_throughput(base_name, spec.method, str(result.get("precision")), str(result.get("device", "cpu")),
                      float(result.get("tokens_per_second") or 0.0), "job", job_id=job_id)
    out = {**result, "model_id": model["id"], "model_name": name, "history_points": len(history)}
    out.pop("model_dir", None)
    if cancelled:
        out["_cancelled"] = True
    return out
