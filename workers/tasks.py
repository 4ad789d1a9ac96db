"""Celery tasks: thin wrappers that take a job id and hand it to the runner.

Every task has an explicit name (csra.queue.TASKS) and runs the shared lifecycle in
``workers.runner.execute``; the work itself lives in ``workers.handlers``.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import TimeLimitExceeded
from celery.signals import worker_process_init
from celery.utils.log import get_task_logger

from csra.queue import SWEEP_TASK, TASKS, get_celery, time_limits
from csra.settings import get_settings
from workers import runner
from workers.handlers.imports import handle_import  # preloaded before the pool forks (pandas is slow to import)
from workers.presence import Presence

logger = get_task_logger(__name__)
app = get_celery()
app.steps["worker"].add(Presence)


class JobTask(Task):  # type: ignore[misc]
    """A task that runs one job row. A job Celery killed at its hard time limit is failed, naming the limit.

    Celery calls ``on_failure`` in the worker's main process when it kills a pool process at the
    hard limit (the runner inside it can no longer write anything).
    """

    kind = ""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if isinstance(exc, TimeLimitExceeded) and args:
            runner.fail_past_hard_limit(int(args[0]), self.kind, time_limits(self.kind)[1])


@app.task(name=TASKS["import"][0], base=JobTask, kind="import")
def import_dataset(job_id: int) -> None:
    runner.execute(job_id, "import", handle_import)


@app.task(name=TASKS["train"][0], base=JobTask, kind="train")
def train(job_id: int) -> None:
    from workers.handlers.training import handle_train

    runner.execute(job_id, "train", handle_train)


@app.task(name=TASKS["sweep"][0], base=JobTask, kind="sweep")
def sweep(job_id: int) -> None:
    from workers.handlers.training import handle_sweep

    runner.execute(job_id, "sweep", handle_sweep)


@app.task(name=TASKS["generate"][0], base=JobTask, kind="generate")
def generate(job_id: int) -> None:
    from workers.handlers.generation import handle_generate

    runner.execute(job_id, "generate", handle_generate)


@app.task(name=TASKS["evaluate"][0], base=JobTask, kind="evaluate")
def evaluate(job_id: int) -> None:
    from workers.handlers.evaluation import handle_evaluate

    runner.execute(job_id, "evaluate", handle_evaluate)


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
