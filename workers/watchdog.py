"""A consumer step that notices a worker which stopped taking jobs it had room for, and reconnects it.

Celery's Redis consumer has a long record of going quiet after a broker reconnect: the process is
up, its event loop turns (its presence key stays fresh, so ``GET /health`` lists it), and the jobs
wait in its queue for good (celery #8030, #8091, #9054, #10205; #10302 still saw it on 5.6.3). Our
CI saw a worker that looked like it once on Celery 5.7: after its pool processes were killed twice
and Redis restarted, the default worker started nothing more for the rest of the run (its logs were
not kept; ``tests/conftest.py`` now attaches a stack's logs to a failing test). Nothing in Celery
notices; a person restarts the worker. This step notices instead, from inside the event loop, every
``CHECK_SECONDS``: when one of the queues this consumer consumes has held a message for
``consumer_stall_seconds`` while the worker had room for it (it held fewer messages than its
prefetch limit) and received none, the consumer is restarted through Celery's own lost-connection
path, as a Redis restart would: a connection error raised from a timer of the event loop propagates
out of it (``Hub.propagate_errors``), Celery closes the connection, reconnects and consumes again.
Jobs that are running keep running (``worker_cancel_long_running_tasks_on_connection_loss`` is off).

Written here, not taken from a library: the check needs Celery's consumer internals (its queues, its
prefetch limit, the requests it holds) and its event loop, which only a bootstep sees.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery import bootsteps
from celery.signals import task_received
from celery.worker.state import reserved_requests
from redis.exceptions import ConnectionError as RedisConnectionError

from csra.redis_conn import get_redis
from csra.settings import get_settings

logger = logging.getLogger(__name__)

CHECK_SECONDS = 5.0


class ConsumerStalled(RedisConnectionError):
    """Raised in the event loop to make Celery reconnect a consumer that stopped taking messages.

    A redis-py ``ConnectionError`` because that is one of the transport's connection errors: the ones
    the event loop lets out and the consumer answers by reconnecting."""


class StallClock:
    """When a consumer started to look stalled: messages waiting that it had room for, none received.

    Kept apart from Celery so the rule can be read (and tested) on its own."""

    def __init__(self, stall_seconds: float) -> None:
        self.stall_seconds = stall_seconds
        self.since: float | None = None  # first check that saw waiting messages and room, since the last receipt
        self.received_at: float | None = None

    def received(self, now: float) -> None:
        self.received_at = now

    def observe(self, now: float, waiting: int, room: bool) -> float | None:
        """How long the consumer has been stalled once that is ``stall_seconds`` or more, else None."""
        if waiting == 0 or not room:
            self.since = None
            return None
        took_one = self.received_at is not None and self.since is not None and self.received_at >= self.since
        if self.since is None or took_one:  # a new count, or the consumer took a message since
            self.since = now
            return None
        stalled = now - self.since
        if stalled < self.stall_seconds:
            return None
        self.since = None  # a reconnect starts the count again
        return stalled


class ConsumerWatchdog(bootsteps.StartStopStep):
    """A consumer bootstep (it starts again with the consumer after each reconnect)."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def include_if(self, c: Any) -> bool:
        # only where timers run in the event loop, which lets a connection error out; without one (no
        # asynchronous transport) a timer thread would only log it
        return getattr(c, "hub", None) is not None

    def __init__(self, c: Any, **kwargs: Any) -> None:
        self.tref: Any = None
        self.clock = StallClock(get_settings().consumer_stall_seconds)
        self.consumer: Any = None

    def start(self, c: Any) -> None:
        self.consumer = c
        self.clock.since = None
        task_received.connect(self._received, sender=c, weak=False)
        if self.tref is not None:
            self.tref.cancel()
        self.tref = c.timer.call_repeatedly(CHECK_SECONDS, self._check, priority=10)

    def stop(self, c: Any) -> None:
        task_received.disconnect(self._received, sender=c)
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def _received(self, sender: Any = None, **kwargs: Any) -> None:
        self.clock.received(time.monotonic())

    def _waiting(self) -> tuple[int, list[str]]:
        """Messages waiting in the queues this consumer consumes now (a queue paused with
        ``cancel_consumer`` is not one of them), and those queues' names."""
        c = self.consumer
        task_consumer = getattr(c, "task_consumer", None)
        if task_consumer is None:
            return 0, []
        names = [q.name for q in task_consumer.queues if task_consumer.consuming_from(q.name)]
        # kombu keeps a Redis queue's messages in a list named after it (messages sent with a priority
        # go to suffixed lists; csra sends none)
        client = get_redis()  # the process's client (csra.redis_conn): short timeouts, reconnects by itself
        return sum(int(client.llen(name)) for name in names), names

    def _check(self) -> None:
        c = self.consumer
        if c is None or c.connection is None:
            return
        try:
            waiting, names = self._waiting()
        except (redis.RedisError, OSError):  # Redis is away: the consumer is reconnecting on its own
            self.clock.since = None
            return
        limit = c.qos.value if getattr(c, "qos", None) is not None else 0
        room = not limit or len(reserved_requests) < limit
        stalled = self.clock.observe(time.monotonic(), waiting, room)
        if stalled is None:
            return
        logger.error("this worker took none of the %d message(s) waiting in %s for %.0f s although it had room "
                     "(it holds %d of %d); reconnecting its consumer to the broker", waiting, ", ".join(names),
                     stalled, len(reserved_requests), limit)
        raise ConsumerStalled(f"the consumer took no message for {stalled:.0f} s while {waiting} waited")
