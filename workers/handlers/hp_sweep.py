"""Hyper-parameter sweeps (job kind ``sweep``): one training job per config, then one evaluation of
every resulting model and the baseline, then the leaderboard the original design made by hand.

The sweep never holds a worker while its children run: each phase starts child jobs and raises
``WaitForChildren``; the sweep then waits (status ``waiting``) and is queued again when its last
child ends. Every phase is idempotent: a re-run finds the children it already made.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select

from csra.jobctx import JobContext, WaitForChildren
from csra.queue import send_job
from csra.settings import get_settings
from db import jobs
from db.models import Evaluation, Job
from db.session import session_scope

logger = logging.getLogger(__name__)


def _children(parent_id: int, kind: str) -> list[Job]:
    with session_scope() as s:
        found = list(s.scalars(select(Job).where(Job.parent_id == parent_id, Job.kind == kind).order_by(Job.id)))
        s.expunge_all()
    return found


def _start(parent_id: int, kind: str, configs: list[dict[str, Any]], dataset_id: int) -> list[int]:
    """Create the child jobs in one transaction, then publish them (a lost publish is re-sent by the reaper)."""
    with session_scope() as s:
        owner = s.get(Job, parent_id).owner  # type: ignore[union-attr]
        ids = [jobs.new_job(s, kind, cfg, owner=owner, dataset_id=dataset_id, parent_id=parent_id).id
               for cfg in configs]
    for child in ids:
        try:
            send_job(child, kind)
        except Exception:  # noqa: BLE001 - the row is committed; the reaper re-sends its message
            logger.warning("could not enqueue child job %s; the reaper will", child, exc_info=True)
    return ids


def _wait_unless_done(children: list[Job]) -> None:
    unfinished = [j.id for j in children if j.status not in jobs.TERMINAL]
    if unfinished:
        raise WaitForChildren(unfinished)


def leaderboard_row(job: Job) -> dict[str, Any]:
    p, r = job.params or {}, job.result or {}
    return {
        "job_id": job.id, "status": job.status, "error": job.error, "epochs": p.get("epochs"),
        "learning_rate": p.get("learning_rate"), "batch_size": p.get("batch_size"), "method": p.get("method"),
        "model_id": r.get("model_id"), "model_name": r.get("model_name"),
        "best_val_loss": r.get("best_val_loss"), "final_val_loss": r.get("final_val_loss"),
        "tokens_per_second": r.get("tokens_per_second"), "wall_seconds": r.get("wall_seconds"),
    }


def _attach_metrics(rows: list[dict[str, Any]], evaluation_id: int | None) -> None:
    """Put each model's overall evaluation metrics on its leaderboard row (and add the baseline's)."""
    if evaluation_id is None:
        return
    with session_scope() as s:
        ev = s.get(Evaluation, evaluation_id)
        metrics = dict(ev.metrics or {}) if ev else {}
    for row in rows:
        row["metrics"] = (metrics.get(row.get("model_name") or "") or {}).get("overall")
    baseline = get_settings().baseline_name
    base = metrics.get(baseline, {}).get("overall")
    if base:
        rows.append({"job_id": None, "status": "baseline", "model_name": baseline, "epochs": 0,
                     "learning_rate": 0.0, "batch_size": None, "best_val_loss": None, "metrics": base})


def _evaluation_phase(job_id: int, params: dict[str, Any], models: list[int]) -> dict[str, Any]:
    """Evaluate every resulting model and the baseline (one child job), waiting for it."""
    evaluations = _children(job_id, jobs.JobKind.EVALUATE)
    if not evaluations:
        config = {"model_ids": [get_settings().baseline_name, *map(str, models)],
                  "dataset_id": params["dataset_id"], "split": "test",
                  "max_samples": params.get("eval_max_samples", 300)}
        if "eval_max_new_tokens" in params:  # a sweep queued before the setting existed: the evaluation's default
            config["max_new_tokens"] = params["eval_max_new_tokens"]
        raise WaitForChildren(_start(job_id, jobs.JobKind.EVALUATE, [config], params["dataset_id"]))
    _wait_unless_done(evaluations)
    ev = evaluations[0]
    return {"evaluate_job_id": ev.id, "evaluation_id": (ev.result or {}).get("evaluation_id"),
            "evaluation_status": ev.status}


def handle_hp_sweep(job_id: int, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    trainings = _children(job_id, jobs.JobKind.TRAIN)
    if not trainings:
        ids = _start(job_id, jobs.JobKind.TRAIN, params["configs"], params["dataset_id"])
        ctx.event("log", f"started {len(ids)} training jobs: {ids}")
        raise WaitForChildren(ids)
    _wait_unless_done(trainings)
    rows = [leaderboard_row(j) for j in trainings]
    result: dict[str, Any] = {"train_job_ids": [j.id for j in trainings], "leaderboard": rows}
    models = [r["model_id"] for r in rows if r["model_id"] is not None]
    if params.get("evaluate") and models:
        result.update(_evaluation_phase(job_id, params, models))
        _attach_metrics(rows, result.get("evaluation_id"))
    rows.sort(key=lambda r: (r["best_val_loss"] is None, r["best_val_loss"] or 0.0))
    return result
