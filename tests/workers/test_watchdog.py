"""The consumer watchdog: its rule on its own, then a real worker whose consumer stalls (real Redis)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.stack import RedisServer, wait_until
from workers.watchdog import StallClock

REPO = Path(__file__).resolve().parents[2]


def test_a_stall_is_messages_waiting_with_room_and_none_received_for_the_whole_period():
    clock = StallClock(stall_seconds=30)
    assert clock.observe(0, waiting=3, room=True) is None  # starts counting
    assert clock.observe(29, waiting=3, room=True) is None
    assert clock.observe(31, waiting=3, room=True) == 31  # stalled: reconnect
    assert clock.observe(32, waiting=3, room=True) is None  # and the count starts again
    assert clock.observe(61, waiting=3, room=True) is None
    assert clock.observe(62, waiting=3, room=True) == 30


@pytest.mark.parametrize("interruption", ["received", "empty", "busy"])
def test_a_message_received_an_empty_queue_or_a_full_worker_is_no_stall(interruption: str):
    clock = StallClock(stall_seconds=30)
    clock.observe(0, waiting=1, room=True)
    if interruption == "received":
        clock.received(10)  # it took one: the rest may simply be next
    else:
        clock.observe(10, waiting=0 if interruption == "empty" else 1, room=interruption != "busy")
    assert clock.observe(35, waiting=1, room=True) is None
    assert clock.observe(64, waiting=1, room=True) is None
    assert clock.observe(66, waiting=1, room=True) == 31


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_worker_whose_consumer_stalls_reconnects_and_takes_the_waiting_job(tmp_path: Path,
                                                                             redis_server: RedisServer):
    from celery import Celery

    env = {**os.environ, "CSRA_REDIS_URL": redis_server.url, "CSRA_DATA_DIR": str(tmp_path / "data"),
           "CSRA_CONSUMER_STALL_SECONDS": "4", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tests.workers.stalling_worker"], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    client = redis.Redis.from_url(redis_server.url)
    try:
        wait_until(lambda: client.get("stalling-worker:stalled"), 120, 0.2, "the worker's consumer to start")
        time.sleep(1)  # its event loop is running
        Celery(broker=redis_server.url).send_task("tests.mark", args=["job-done"], queue="default",
                                                  routing_key="default")
        time.sleep(2)
        assert client.get("job-done") is None and client.llen("default") == 1  # stalled: the job waits
        wait_until(lambda: client.get("job-done"), 60, 0.2, "the waiting job to run")
        assert proc.poll() is None  # the same process: it reconnected, it did not die
    finally:
        proc.terminate()
        proc.wait(30)
    text = log.read_text()
    assert "took none of the 1 message(s) waiting in default" in text and "reconnecting its consumer" in text, text
