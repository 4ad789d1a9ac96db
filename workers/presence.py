"""A worker bootstep that keeps this worker's presence key alive (see ``csra.presence``)."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import bootsteps

from csra.presence import INTERVAL, announce, report_invariance, withdraw
from csra.redis_conn import get_redis
from csra.settings import get_settings

logger = logging.getLogger(__name__)


class Presence(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.tref: Any = None
        self.client: redis.Redis | None = None
        self.hostname = ""
        self.queues: list[str] = []

    def start(self, worker: Any) -> None:
        self.client = redis.Redis.from_url(get_settings().effective_redis_url, socket_timeout=2)
        self.hostname = worker.hostname
        self.queues = sorted(worker.app.amqp.queues.consume_from or worker.app.amqp.queues)
        self._beat()
        self.tref = worker.timer.call_repeatedly(INTERVAL, self._beat, priority=10)

    def _beat(self) -> None:
        try:
            assert self.client is not None
            announce(self.client, self.hostname, self.queues)
        except (redis.RedisError, OSError):  # Redis restarting: the next beat re-registers
            logger.debug("presence beat failed", exc_info=True)

    def stop(self, worker: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
        try:
            if self.client is not None:
                withdraw(self.client, self.hostname)
        except (redis.RedisError, OSError):
            pass


def publish_invariance(model_name: str, report: dict[str, Any] | None) -> None:
    """Make a model's batch-invariance self-check visible in ``GET /health`` (best effort)."""
    from workers.context import worker_name

    if report is None:
        return
    try:
        report_invariance(get_redis(), worker_name(), model_name, report)
    except (redis.RedisError, OSError):
        logger.warning("could not publish the batch-invariance report of %s", model_name, exc_info=True)
