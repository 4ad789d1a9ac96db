"""A worker bootstep that keeps this worker's presence key alive (see ``csra.presence``)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import redis
from celery import bootsteps

from csra.presence import INTERVAL, announce, forget_invariance_of_dead, report_invariance, withdraw
from csra.redis_conn import get_redis
from csra.settings import get_settings
from models_store.cache import PRUNE_EVERY_SECONDS
from models_store.registry import prune_model_copies

logger = logging.getLogger(__name__)

TORCH_QUEUES = {"train", "generate"}  # the workers that run torch: they report their device
_DESCRIBE = "import json; from ml.device import describe; print(json.dumps(describe()))"


FORGET_EVERY = 30.0  # seconds between two sweeps of this host's dead processes' invariance reports


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has this pid (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class DeviceProbe:
    """``ml.device.describe()`` in a child process, polled without waiting: asking CUDA in this (pre-fork)
    process would initialise it here and break CUDA in the forked pool processes; and a thread waiting
    on it here could hold a lock at the moment the pool forks (see ``Presence.start``)."""

    TIMEOUT = 180.0

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.process = subprocess.Popen([sys.executable, "-c", _DESCRIBE], stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)

    def result(self) -> tuple[bool, dict[str, Any] | None]:
        """(done, the device or None when it could not be told); never blocks."""
        if self.process.poll() is None:
            if time.monotonic() - self.started < self.TIMEOUT:
                return False, None
            self.process.kill()
            self.process.wait()
            logger.warning("could not determine this worker's torch device: no answer in %.0f s", self.TIMEOUT)
            return True, None
        out = self.process.stdout.read() if self.process.stdout else ""
        try:
            if self.process.returncode != 0:
                raise ValueError(f"exit code {self.process.returncode}")
            return True, dict(json.loads(out.strip().splitlines()[-1]))
        except (ValueError, IndexError) as exc:
            logger.warning("could not determine this worker's torch device: %s", exc)
            return True, None


class Presence(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.trefs: list[Any] = []
        self.client: redis.Redis | None = None
        self.hostname = ""
        self.queues: list[str] = []
        self.device: dict[str, Any] | None = None
        self.probe: DeviceProbe | None = None

    def start(self, worker: Any) -> None:
        # No thread of ours runs in a prefork worker's parent: a thread busy (importing, querying) at the
        # moment the pool forked left the pool process a lock that no thread of it would ever release;
        # its next import of that module hung for good (seen in CI). The timer runs in the main thread,
        # which is also the one that forks.
        self.client = redis.Redis.from_url(get_settings().effective_redis_url, socket_timeout=2)
        self.hostname = worker.hostname
        self.queues = sorted(worker.app.amqp.queues.consume_from or worker.app.amqp.queues)
        if self.queues == ["generate"]:  # a thread pool (``csra worker``): it never forks; ask in this process
            threading.Thread(target=self._describe, name="csra-device-probe", daemon=True).start()
        elif TORCH_QUEUES & set(self.queues):
            self.probe = DeviceProbe()
        self._beat()
        self.trefs.append(worker.timer.call_repeatedly(INTERVAL, self._beat, priority=10))
        self._forget_dead()  # a restarted worker clears what its dead predecessor reported
        self.trefs.append(worker.timer.call_repeatedly(FORGET_EVERY, self._forget_dead, priority=10))
        if get_settings().model_store_url:
            # copies of models deleted on another host leave this host's cache within about a minute
            # (twice a period: prune_model_copies runs at most once per PRUNE_EVERY_SECONDS itself)
            self.trefs.append(worker.timer.call_repeatedly(PRUNE_EVERY_SECONDS / 2, prune_model_copies,
                                                           priority=10))

    def _describe(self) -> None:
        from ml.device import describe

        self.device = describe()
        self._beat()

    def _beat(self) -> None:
        if self.probe is not None:
            done, self.device = self.probe.result()
            if done:
                self.probe = None
        try:
            assert self.client is not None
            announce(self.client, self.hostname, self.queues, self.device)
        except (redis.RedisError, OSError):  # Redis restarting: the next beat re-registers
            logger.debug("presence beat failed", exc_info=True)

    def _forget_dead(self) -> None:
        try:
            assert self.client is not None
            gone = forget_invariance_of_dead(self.client, socket.gethostname(), pid_alive)
        except (redis.RedisError, OSError):
            logger.debug("clearing dead processes' invariance reports failed", exc_info=True)
            return
        if gone:
            logger.info("cleared the batch-invariance reports of processes that are gone: %s", ", ".join(gone))

    def stop(self, worker: Any) -> None:
        for tref in self.trefs:
            tref.cancel()
        if self.probe is not None:
            self.probe.process.kill()
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
