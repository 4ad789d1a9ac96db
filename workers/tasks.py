"""Celery tasks: thin wrappers that take a job id and hand it to the runner.

Every task has an explicit name (``csra.queue.TASK_NAMES``) and runs the shared lifecycle in
``workers.runner.execute``; the work itself lives in ``workers.handlers``.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import TimeLimitExceeded
from celery.signals import worker_process_init

from csra.queue import CALIBRATE_TASK, CALIBRATION_ERROR, REAPER_TASK, TASK_NAMES, get_celery, time_limits
from csra.settings import get_settings
from db.jobs import JobKind
from workers import runner
from workers.handlers.imports import handle_import  # preloaded before the pool forks (pandas is slow to import)
from workers.presence import Presence
from workers.watchdog import ConsumerWatchdog

app = get_celery()
app.steps["worker"].add(Presence)
app.steps["consumer"].add(ConsumerWatchdog)


# each job kind's handler (module, function), imported when a job of that kind runs: see runner.imported
HANDLERS: dict[str, tuple[str, str]] = {
    JobKind.TRAIN: ("workers.handlers.training", "handle_train"),
    JobKind.SWEEP: ("workers.handlers.hp_sweep", "handle_hp_sweep"),
    JobKind.GENERATE: ("workers.handlers.generation", "handle_generation"),
    JobKind.EVALUATE: ("workers.handlers.evaluation", "handle_evaluate"),
    JobKind.MEMORY: ("workers.handlers.memory", "handle_memory_rebuild"),
    JobKind.EXPORT: ("workers.handlers.export", "handle_export"),
}


class JobTask(Task):
    """A task that runs one job row. A job Celery killed at its hard time limit is failed, naming the limit.

    Celery calls ``on_failure`` in the worker's main process when it kills a pool process at the
    hard limit (the runner inside it can no longer write anything).
    """

    kind = ""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if isinstance(exc, TimeLimitExceeded) and args:
            runner.fail_past_hard_limit(int(args[0]), self.kind, time_limits(self.kind)[1])


@app.task(name=TASK_NAMES[JobKind.IMPORT], base=JobTask, kind=JobKind.IMPORT)
def run_import(job_id: int) -> None:
    runner.execute(job_id, JobKind.IMPORT, handle_import)


@app.task(name=TASK_NAMES[JobKind.TRAIN], base=JobTask, kind=JobKind.TRAIN)
def run_training(job_id: int) -> None:
    runner.execute(job_id, JobKind.TRAIN, runner.imported(*HANDLERS[JobKind.TRAIN]))


@app.task(name=TASK_NAMES[JobKind.SWEEP], base=JobTask, kind=JobKind.SWEEP)
def run_hp_sweep(job_id: int) -> None:
    runner.execute(job_id, JobKind.SWEEP, runner.imported(*HANDLERS[JobKind.SWEEP]))


@app.task(name=TASK_NAMES[JobKind.GENERATE], base=JobTask, kind=JobKind.GENERATE)
def run_generation(job_id: int) -> None:
    runner.execute(job_id, JobKind.GENERATE, runner.imported(*HANDLERS[JobKind.GENERATE]))


@app.task(name=TASK_NAMES[JobKind.EVALUATE], base=JobTask, kind=JobKind.EVALUATE)
def run_evaluation(job_id: int) -> None:
    runner.execute(job_id, JobKind.EVALUATE, runner.imported(*HANDLERS[JobKind.EVALUATE]))


@app.task(name=TASK_NAMES[JobKind.MEMORY], base=JobTask, kind=JobKind.MEMORY)
def run_memory_rebuild(job_id: int) -> None:
    runner.execute(job_id, JobKind.MEMORY, runner.imported(*HANDLERS[JobKind.MEMORY]))


@app.task(name=TASK_NAMES[JobKind.EXPORT], base=JobTask, kind=JobKind.EXPORT)
def run_export(job_id: int) -> None:
    runner.execute(job_id, JobKind.EXPORT, runner.imported(*HANDLERS[JobKind.EXPORT]))


@app.task(name=REAPER_TASK)
def reap_stale_jobs() -> dict[str, Any]:
    from workers.reaper import reap_stale_jobs as reap

    return reap()


@app.task(name=CALIBRATE_TASK, acks_late=False)
def calibrate_training(params: dict[str, Any], pending_key: str = "") -> dict[str, Any]:
    from csra.redis_conn import get_redis
    from workers.handlers.calibration import calibrate

    try:
        return calibrate(params)
    except Exception as exc:  # the estimate waiting on it says why at once (and for a minute, not again)
        if pending_key:
            get_redis().set(pending_key + CALIBRATION_ERROR, str(exc)[:300] or type(exc).__name__, ex=60)
        raise
    finally:
        if pending_key:
            get_redis().delete(pending_key)


@worker_process_init.connect
def _init_process(**_: object) -> None:
    """Per worker process: honour CSRA_TORCH_THREADS (torch is imported only if asked)."""
    threads = get_settings().torch_threads
    if threads:
        import torch

        torch.set_num_threads(threads)
