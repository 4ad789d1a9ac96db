"""Celery tasks: thin wrappers that take a job id and hand it to the runner.

Every task has an explicit name (csra.queue.TASKS) and runs the shared lifecycle in
``workers.runner.execute``; the work itself lives in ``workers.handlers``.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init
from celery.utils.log import get_task_logger

from csra.queue import SWEEP_TASK, TASKS, get_celery
from csra.settings import get_settings
from workers import runner
from workers.handlers.imports import handle_import  # preloaded before the pool forks (pandas is slow to import)
from workers.presence import Presence

logger = get_task_logger(__name__)
app = get_celery()
app.steps["worker"].add(Presence)


@app.task(name=TASKS["import"][0])
def import_dataset(job_id: int) -> None:
    runner.execute(job_id, handle_import)


@app.task(name=TASKS["train"][0])
def train(job_id: int) -> None:
    from workers.handlers.training import handle_train

    runner.execute(job_id, handle_train)


@app.task(name=TASKS["sweep"][0])
def sweep(job_id: int) -> None:
    from workers.handlers.training import handle_sweep

    runner.execute(job_id, handle_sweep)


@app.task(name=TASKS["generate"][0])
def generate(job_id: int) -> None:
    from workers.handlers.generation import handle_generate

    runner.execute(job_id, handle_generate)


@app.task(name=TASKS["evaluate"][0])
def evaluate(job_id: int) -> None:
    from workers.handlers.evaluation import handle_evaluate

    runner.execute(job_id, handle_evaluate)


@app.task(name=SWEEP_TASK)
def sweep_jobs() -> dict[str, Any]:
    from workers.maintenance import sweep as do_sweep

    return do_sweep()


@worker_process_init.connect
def _init_process(**_: object) -> None:
    """Per worker process: honour CSRA_TORCH_THREADS (torch is imported only if asked)."""
    threads = get_settings().torch_threads
    if threads:
        import torch

        torch.set_num_threads(threads)
