"""Training and sweep jobs: data from the database in, a registered model out."""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import select

from csra.jobctx import JobCancelled, JobContext, JobError, JobTimeLimit
from csra.queue import send_job
from csra.settings import get_settings
from csra.specs import TrainSpec
from db.base import utcnow
from db.jobs import new_job
from db.models import TERMINAL, Dataset, DatasetExample, DatasetStatus, Job, JobStatus, Model
from db.session import session_scope
from ml.cpu_share import CpuYielder, InteractiveSignal
from workers.handlers.models import register_model, resolve_base

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


def background_yielder() -> CpuYielder | None:
    """Pauses a training or evaluation job while the generate worker on this machine answers chats."""
    settings = get_settings()
    if not settings.train_yields_to_chat:
        return None
    return CpuYielder(InteractiveSignal(settings.interactive_signal_path), settings.train_yield_max_seconds)


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
    result = run_training(spec, train_rows, val_rows, source, ctx.work_dir, ctx,
                          num_threads=settings.torch_thread_count, yield_cpu=background_yielder())
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
    out = {**result, "model_id": model["id"], "model_name": name, "history_points": len(history)}
    out.pop("model_dir", None)
    if cancelled:
        out["_cancelled"] = True
    return out


# ----------------------------------------------------------------------------- sweeps


def _start_children(parent_id: int, configs: list[dict[str, Any]], owner: str | None) -> list[int]:
    """Create (once) and enqueue one training job per config; a retried sweep reuses its children."""
    with session_scope() as s:
        existing = s.scalars(select(Job).where(Job.parent_id == parent_id, Job.kind == "train")
                             .order_by(Job.id)).all()
        if existing:
            return [j.id for j in existing]
        ids = []
        for cfg in configs:
            job = new_job(s, "train", cfg, owner=owner, dataset_id=cfg.get("dataset_id"), parent_id=parent_id)
            ids.append(job.id)
    for child in ids:
        send_job(child, "train")
        with session_scope() as s:
            s.get(Job, child).enqueued_at = utcnow()  # type: ignore[union-attr]
    return ids


def _cancel_children(parent_id: int) -> None:
    with session_scope() as s:
        for child in s.scalars(select(Job).where(Job.parent_id == parent_id, Job.status.not_in(TERMINAL))):
            child.cancel_requested = True
            if child.status == JobStatus.QUEUED:
                child.status = JobStatus.CANCELLED.value
                child.finished_at = utcnow()


def _wait_children(parent_id: int, ids: list[int], ctx: JobContext, label: str) -> list[Job]:
    while True:
        try:
            ctx.check_cancelled()
        except (JobCancelled, JobTimeLimit):  # the children stop with their parent
            _cancel_children(parent_id)
            raise
        with session_scope() as s:
            jobs = [s.get(Job, i) for i in ids]
            s.expunge_all()
        finished = sum(j is not None and j.status in TERMINAL for j in jobs)
        running = [j for j in jobs if j is not None and j.status == JobStatus.RUNNING]
        extra = f", job {running[0].id}: {running[0].stage}" if running else ""
        ctx.progress(finished / max(1, len(ids)), f"{label}: {finished}/{len(ids)} finished{extra}")
        if finished == len(ids):
            return [j for j in jobs if j is not None]
        time.sleep(2.0)


def leaderboard_row(job: Job) -> dict[str, Any]:
    p, r = job.params or {}, job.result or {}
    return {
        "job_id": job.id, "status": job.status, "error": job.error, "epochs": p.get("epochs"),
        "learning_rate": p.get("learning_rate"), "batch_size": p.get("batch_size"), "method": p.get("method"),
        "model_id": r.get("model_id"), "model_name": r.get("model_name"),
        "best_val_loss": r.get("best_val_loss"), "final_val_loss": r.get("final_val_loss"),
        "tokens_per_second": r.get("tokens_per_second"), "wall_seconds": r.get("wall_seconds"),
    }


def handle_sweep(job_id: int, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    with session_scope() as s:
        owner = s.get(Job, job_id).owner  # type: ignore[union-attr]
    ids = _start_children(job_id, params["configs"], owner)
    ctx.event("log", f"started {len(ids)} training jobs: {ids}")
    children = _wait_children(job_id, ids, ctx, "training")
    rows = [leaderboard_row(j) for j in children]
    result: dict[str, Any] = {"train_job_ids": ids, "leaderboard": rows}
    models = [r["model_id"] for r in rows if r["model_id"] is not None]
    if params.get("evaluate") and models:
        result.update(_evaluate_children(job_id, params, models, ctx, owner))
        _attach_metrics(rows, result.get("evaluation_id"))
    rows.sort(key=lambda r: (r["best_val_loss"] is None, r["best_val_loss"] or 0.0))
    return result


def _attach_metrics(rows: list[dict[str, Any]], evaluation_id: int | None) -> None:
    """Put each model's overall evaluation metrics on its leaderboard row (and add the baseline's)."""
    from db.models import Evaluation

    if evaluation_id is None:
        return
    with session_scope() as s:
        ev = s.get(Evaluation, evaluation_id)
        metrics = dict(ev.metrics or {}) if ev else {}
    for row in rows:
        row["metrics"] = (metrics.get(row.get("model_name") or "") or {}).get("overall")
    base = metrics.get(get_settings().baseline_name, {}).get("overall")
    if base:
        rows.append({"job_id": None, "status": "baseline", "model_name": get_settings().baseline_name,
                     "epochs": 0, "learning_rate": 0.0, "batch_size": None, "best_val_loss": None,
                     "metrics": base})


def _evaluate_children(job_id: int, params: dict[str, Any], models: list[int], ctx: JobContext,
                       owner: str | None) -> dict[str, Any]:
    """Evaluate every resulting model and the baseline; attach their metrics to the leaderboard."""
    eval_params = {"model_ids": [get_settings().baseline_name, *map(str, models)],
                   "dataset_id": params["dataset_id"], "split": "test",
                   "max_samples": params.get("eval_max_samples", 300)}
    with session_scope() as s:
        existing = s.scalar(select(Job).where(Job.parent_id == job_id, Job.kind == "evaluate"))
        eval_id = existing.id if existing else new_job(s, "evaluate", eval_params, owner=owner,
                                                       dataset_id=params["dataset_id"], parent_id=job_id).id
    if existing is None:
        send_job(eval_id, "evaluate")
    (job,) = _wait_children(job_id, [eval_id], ctx, "evaluation")
    return {"evaluate_job_id": eval_id, "evaluation_id": (job.result or {}).get("evaluation_id"),
            "evaluation_status": job.status}
