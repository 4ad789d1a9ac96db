"""The Celery application shared by the API (to enqueue) and the workers (to run).

Only configuration lives here: the API imports this module to publish messages by task
name and never imports ``workers`` (nor torch). Workers load ``workers.tasks`` through
``include``.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from kombu import Queue

from csra import broker
from csra.settings import get_settings
from db.jobs import QUEUE_OF, JobKind

QUEUES = ("default", "train", "generate", "maintenance")  # maintenance: the stale-job reaper only

# job kind -> the name of the task that runs it (its queue: db.jobs.QUEUE_OF). Explicit names; they
# are what queued messages carry, so they stay stable across releases.
TASK_NAMES: dict[str, str] = {
    JobKind.IMPORT: "csra.jobs.import_dataset",
    JobKind.TRAIN: "csra.jobs.train",
    JobKind.SWEEP: "csra.jobs.sweep",
    JobKind.EVALUATE: "csra.jobs.evaluate",
    JobKind.GENERATE: "csra.jobs.generate",
    JobKind.MEMORY: "csra.jobs.memory_rebuild",
    JobKind.EXPORT: "csra.jobs.export_model",
}
REAPER_TASK = "csra.maintenance.reap_stale_jobs"
# not a job: measures training throughput for an estimate (``dry_run``) on the train queue's device
CALIBRATE_TASK = "csra.maintenance.calibrate_training"


@lru_cache(maxsize=1)
def get_celery() -> Celery:
    settings = get_settings()
    app = Celery("csra", broker=settings.effective_redis_url, include=["workers.tasks"])
    if urlsplit(settings.effective_redis_url).scheme in broker.SCHEMES:
        app.conf.broker_transport = f"{broker.__name__}:Transport"  # survives a Redis restart mid-job
    app.conf.update(
        task_queues=[Queue(q, routing_key=q) for q in QUEUES],
        task_default_queue="default",
        task_create_missing_queues=False,
        task_ignore_result=True,  # the database is the source of truth, not a result backend
        task_acks_late=True,  # a message is acked only once its job ran (a killed worker never acked it)
        # A pool process that dies mid-job (SIGKILL, OOM) is handled by the job heartbeat: the reaper
        # re-queues the job once its beat is stale. Celery re-delivering the message at once would be
        # dropped by the claim anyway (the beat is still fresh), and the pending reject it schedules
        # crashed the worker when Redis restarted before it ran (kombu restores it on a collected
        # connection: AttributeError 'NoneType' object has no attribute 'hostname').
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a restarted Redis is reconnected to, however long it takes
        worker_cancel_long_running_tasks_on_connection_loss=False,  # running jobs keep running; rows hold state
        broker_transport_options={
            # A lost worker is detected by the job heartbeat sweep, not by Redis redelivery;
            # a long visibility timeout keeps long training runs from being delivered twice.
            "visibility_timeout": 12 * 3600,
            "socket_connect_timeout": 2,
            "socket_timeout": 5,
        },
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        beat_schedule={
            "reap-stale-jobs": {
                "task": REAPER_TASK,
                "schedule": settings.reap_interval_seconds,
                "options": {"queue": "maintenance", "expires": settings.reap_interval_seconds * 2},
            }
        },
        timezone="UTC",
        enable_utc=True,
    )
    return app


def time_limits(kind: str) -> tuple[float, float]:
    """Celery's (soft, hard) time limits of a job kind.

    The runner stops a job cooperatively at its limit (``CSRA_TIME_LIMIT_<KIND>``). Celery's soft
    limit, half the grace period later, interrupts a job that did not check; its hard limit, the
    whole grace period later, kills the worker process of a job that is stuck (prefork pools).
    """
    settings = get_settings()
    limit, _ = settings.time_limit(kind)
    grace = settings.time_limit_grace_seconds
    return limit + grace / 2, limit + grace


CALIBRATION_ERROR = ":error"  # suffix of the key a failed calibration leaves its error under, for a while


def calibration_key(base_model: str, method: str, precision: str) -> str:
    """The Redis key that marks a calibration as asked for (one at a time per base model, method, precision)."""
    return "csra:calibrating:" + hashlib.sha1(f"{base_model}|{method}|{precision}".encode()).hexdigest()


def send_calibration(params: dict[str, Any], pending_key: str) -> None:
    """Ask a train worker to measure ``params``' (a TrainSpec's) throughput; expires if nobody takes it soon.

    ``pending_key``: the Redis key that stops a second request from queueing the same calibration; the
    worker deletes it when it is done, whatever the outcome, so a failed calibration can be asked again.
    """
    get_celery().send_task(CALIBRATE_TASK, args=[params, pending_key], queue="train", routing_key="train",
                           expires=600)


def send_job(job_id: int, kind: str, countdown: float | None = None) -> None:
    """Publish the message that runs job ``job_id`` (in ``countdown`` seconds, else now); the Celery
    task id is ``job-<id>``."""
    soft, hard = time_limits(kind)
    get_celery().send_task(TASK_NAMES[kind], args=[job_id], queue=QUEUE_OF[kind], task_id=task_id_for(job_id),
                           soft_time_limit=soft, time_limit=hard, countdown=countdown)


def task_id_for(job_id: int) -> str:
    return f"job-{job_id}"
