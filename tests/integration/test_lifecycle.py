"""The job lifecycle against real processes: cancel, a killed worker, Redis down, a lost message."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import redis
from celery import Celery

from tests.integration.helpers import bitext_sample, import_path, wait_job
from tests.stack import wait_until

# on PostgreSQL too (tests/conftest.py), all but the long ones: a killed import retried to its end is
# covered there by tests/integration/test_job_claims.py, a Redis restart does not touch the database
both_databases = pytest.mark.databases("sqlite", "postgresql")


@pytest.fixture(scope="module")
def big_csv(stack, bitext_path) -> Path:
    """~42k distinct rows: an import that runs long enough (seconds) to be cancelled, killed or outlast a
    Redis restart, and short enough to run to its end twice in a test (a retry starts it again)."""
    src = pd.read_csv(bitext_path)
    reps = 4
    big = pd.concat([src.assign(instruction=src["instruction"] + f" (case {i})") for i in range(reps)])
    path = stack.root / "imports" / "big.csv"
    big.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def small_csv(stack, bitext_path) -> Path:
    """270 rows of every intent: an import that finishes in a second or two, to show a stack takes work."""
    return bitext_sample(stack.root / "imports", bitext_path, per_intent=10)


def _consumer_control(stack, command: str, worker: str) -> bool:
    """cancel_consumer / add_consumer on one worker; False (retry) on no reply or a dropped connection."""
    try:
        app = Celery(broker=stack.redis.url)
        reply = getattr(app.control, command)("default", destination=[worker], reply=True, timeout=2)
    except (redis.RedisError, OSError):  # a pooled control connection may predate a Redis restart
        return False
    return bool(reply) and "ok" in reply[0].get(worker, {})


def _pause_default(stack, api) -> str:
    name = api.get("/health").json()["workers"]["default"][0]
    wait_until(lambda: _consumer_control(stack, "cancel_consumer", name), 30, 0.5, "the worker to pause")
    time.sleep(2.5)  # a BRPOP already in flight (kombu polls with a 1 s timeout) may still take one message
    return name


def _resume_default(stack, name: str) -> None:
    wait_until(lambda: _consumer_control(stack, "add_consumer", name), 30, 0.5, "the worker to resume")


@both_databases
def test_cancel_a_queued_job_never_starts(stack, api, bitext_path):
    name = _pause_default(stack, api)
    try:
        created = import_path(api, str(bitext_path))
        job_id = created["job"]["id"]
        r = api.post(f"/jobs/{job_id}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
    finally:
        _resume_default(stack, name)
    time.sleep(2)  # the message is delivered now; the worker must see the cancel and not run it
    job = api.get(f"/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["started_at"] is None and job["attempts"] == 0
    assert api.post(f"/jobs/{job_id}/cancel").status_code == 409
    assert api.post("/jobs/999999/cancel").status_code == 404


@both_databases
def test_cancel_a_running_job_stops_it(api, big_csv):
    created = import_path(api, str(big_csv))
    job_id = created["job"]["id"]
    wait_job(api, job_id, until={"running", "succeeded", "failed"})
    api.post(f"/jobs/{job_id}/cancel")
    job = wait_job(api, job_id)
    assert job["status"] == "cancelled", job
    ds = api.get(f"/datasets/{created['dataset']['id']}").json()
    assert ds["status"] == "failed" and ds["row_count"] == 0  # no half-written dataset
    assert api.get(f"/datasets/{ds['id']}/examples").status_code == 409


def _kill_runner(api, job_id: int) -> int:
    job = wait_job(api, job_id, until={"running"}, timeout=60)
    pid = int(job["worker"].rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    return job["attempts"]


def test_killed_worker_job_is_retried_and_finishes(api, big_csv):
    created = import_path(api, str(big_csv))
    job_id = created["job"]["id"]
    assert _kill_runner(api, job_id) == 1
    job = wait_job(api, job_id, timeout=180)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    messages = [e["message"] for e in api.get(f"/jobs/{job_id}/events").json()["data"]]
    # re-run either by the sweep (heartbeat went stale) or by Celery's redelivery of the unacked message
    assert any(m.startswith("running (attempt 2)") for m in messages), messages
    ds = api.get(f"/datasets/{created['dataset']['id']}").json()
    assert ds["status"] == "ready" and ds["row_count"] > 40_000


@both_databases
def test_killed_twice_fails_with_a_clear_error(api, big_csv):
    created = import_path(api, str(big_csv))
    job_id = created["job"]["id"]
    assert _kill_runner(api, job_id) == 1
    wait_until(lambda: api.get(f"/jobs/{job_id}").json()["attempts"] == 2, 60, 0.1, "second attempt")
    assert _kill_runner(api, job_id) == 2
    job = wait_job(api, job_id, timeout=60)
    assert job["status"] == "failed" and job["attempts"] == 2
    assert "Gave up after 2 attempt(s)" in job["error"] and "CSRA_MAX_ATTEMPTS=2" in job["error"]


@both_databases
def test_redis_down_answers_503_and_creates_nothing(stack, api, bitext_path, small_csv):
    jobs_before = api.get("/jobs").json()["count"]
    datasets_before = api.get("/datasets").json()["count"]
    stack.redis.stop()
    try:
        r = api.post("/datasets", json={"name": "x", "source": str(bitext_path)})
        assert r.status_code == 503 and "Redis" in r.json()["detail"] and "not created" in r.json()["detail"]
        assert api.get("/jobs").json()["count"] == jobs_before  # reads keep working
        assert api.get("/datasets").json()["count"] == datasets_before
        h = api.get("/health")
        assert h.status_code == 503 and h.json()["redis"] == "unreachable"
    finally:
        stack.redis.start()
    stack.wait_ready(("default", "train"))
    created = import_path(api, str(small_csv))
    assert wait_job(api, created["job"]["id"])["status"] == "succeeded"


def test_redis_restart_while_a_job_runs_keeps_worker_and_job(stack, api, big_csv, small_csv):
    """A Redis restart mid-job: the worker reconnects (it does not die) and the running job finishes once."""
    created = import_path(api, str(big_csv))
    job_id = created["job"]["id"]
    wait_job(api, job_id, until={"running"}, timeout=60)
    worker = stack.procs["worker-default"]
    stack.redis.stop()
    time.sleep(2)
    stack.redis.start()
    job = wait_job(api, job_id, timeout=180)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    assert worker.poll() is None, stack.logs()  # the same worker process, still alive
    stack.wait_ready(("default", "train"))
    again = import_path(api, str(small_csv))  # and it still takes new work
    assert wait_job(api, again["job"]["id"])["status"] == "succeeded"


@both_databases
def test_message_lost_in_a_redis_restart_is_re_enqueued(stack, api, small_csv):
    name = _pause_default(stack, api)
    created = import_path(api, str(small_csv))
    job_id = created["job"]["id"]
    client = redis.Redis.from_url(stack.redis.url)
    assert client.llen("default") == 1
    stack.redis.stop()  # Redis restarts without its data: the queued message is gone
    stack.redis.wipe()
    stack.redis.start()
    client = redis.Redis.from_url(stack.redis.url)
    assert client.llen("default") == 0
    stack.wait_ready(("default", "train"))
    _resume_default(stack, name)
    job = wait_job(api, job_id, timeout=90)
    assert job["status"] == "succeeded", job
    messages = [e["message"] for e in api.get(f"/jobs/{job_id}/events").json()["data"]]
    assert "re-enqueued: its queue message was lost" in messages
