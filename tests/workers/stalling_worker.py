"""A real csra Celery worker (the app ``csra worker`` runs, with its bootsteps) whose consumer is made to
stall once, the way Celery's Redis consumer can go quiet: its channel reports no room for a message
although the worker holds none, so it stops asking Redis for more (``tests/workers/test_watchdog.py``).

Run: ``python -m tests.workers.stalling_worker`` with ``CSRA_REDIS_URL`` set; the test task ``tests.mark``
sets a Redis key.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

from csra.redis_conn import get_redis
from workers.tasks import app

MARK_TASK = "tests.mark"


@app.task(name=MARK_TASK)
def mark(key: str) -> None:
    get_redis().set(key, "done")


class StallOnce(bootsteps.StartStopStep):
    """On the consumer's first start only: its channel says it cannot take a message, for good."""

    requires = {"celery.worker.consumer.tasks:Tasks"}
    done = False

    def start(self, c: Any) -> None:
        if StallOnce.done:
            return
        StallOnce.done = True
        c.task_consumer.channel.qos.can_consume = lambda: False
        get_redis().set("stalling-worker:stalled", "1")


app.steps["consumer"].add(StallOnce)

if __name__ == "__main__":
    app.worker_main(["worker", "-Q", "default", "-c", "1", "-n", "stalling@%h", "--without-gossip",
                     "--without-mingle", "--loglevel", "INFO"])
