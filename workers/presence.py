"""A worker bootstep that keeps this worker's presence key alive (see ``csra.presence``)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from typing import Any

import redis
from celery import bootsteps

from csra.presence import INTERVAL, announce, report_invariance, withdraw
from csra.redis_conn import get_redis
from csra.settings import get_settings

logger = logging.getLogger(__name__)

TORCH_QUEUES = {"train", "generate"}  # the workers that run torch: they report their device
_DESCRIBE = "import json; from ml.device import describe; print(json.dumps(describe()))"


def probe_device(timeout: float = 180.0) -> dict[str, Any] | None:
    """``ml.device.describe()`` in a child process: asking CUDA in this (pre-fork) process would
    initialise it here and break CUDA in the forked pool processes."""
    try:
        done = subprocess.run([sys.executable, "-c", _DESCRIBE], capture_output=True, text=True, timeout=timeout,
                              check=True)
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        logger.warning("could not determine this worker's torch device", exc_info=True)
        return None


class Presence(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.tref: Any = None
        self.client: redis.Redis | None = None
        self.hostname = ""
        self.queues: list[str] = []
        self.device: dict[str, Any] | None = None
        self.stopped = threading.Event()

    def start(self, worker: Any) -> None:
        self.client = redis.Redis.from_url(get_settings().effective_redis_url, socket_timeout=2)
        self.hostname = worker.hostname
        self.queues = sorted(worker.app.amqp.queues.consume_from or worker.app.amqp.queues)
        self._beat()
        if TORCH_QUEUES & set(self.queues):
            threading.Thread(target=self._probe, name="csra-device-probe", daemon=True).start()
        if get_settings().model_store_url:
            threading.Thread(target=self._prune, name="csra-model-prune", daemon=True).start()
        self.tref = worker.timer.call_repeatedly(INTERVAL, self._beat, priority=10)

    def _prune(self) -> None:
        """Copies of models deleted on another host leave this host's cache within about a minute."""
        from models_store.cache import PRUNE_EVERY_SECONDS
        from models_store.registry import prune_model_copies

        while not self.stopped.wait(PRUNE_EVERY_SECONDS):
            prune_model_copies()

    def _probe(self) -> None:
        if self.queues == ["generate"]:  # a thread pool (``csra worker``): no fork, ask in this process
            from ml.device import describe

            self.device = describe()
        else:
            self.device = probe_device()
        self._beat()

    def _beat(self) -> None:
        try:
            assert self.client is not None
            announce(self.client, self.hostname, self.queues, self.device)
        except (redis.RedisError, OSError):  # Redis restarting: the next beat re-registers
            logger.debug("presence beat failed", exc_info=True)

    def stop(self, worker: Any) -> None:
        self.stopped.set()
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
