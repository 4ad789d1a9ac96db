"""Job claiming and the stale-job reaper under concurrency, on SQLite and on PostgreSQL.

Several worker processes offer every job to ``workers.runner.execute`` over and over (each offer is a
message delivered again), some die in the middle of a job (``os._exit``: the heartbeat stops with
them), and two reaper processes run the stale-job reaper and the lost-message sweep at the same time.
Each job must run to its end exactly once and be recorded as succeeded by the run that ended it. (A
run whose heartbeat went stale on a stalled machine may be taken over; like every handler it stops at
its next ``check_cancelled`` and writes nothing, so "its end" is past that check.)

Real processes, a real database and a real Redis; no Celery consumer (the runner is what claims).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.stack import RedisServer

JOBS = 18
WORKERS = 4
REAPERS = 2
HANDLER_SECONDS = 0.15
DIES_EVERY = 3  # jobs 0, 3, 6, ...: the first run's process dies in the middle of the job


def _env(url: str, redis_url: str, data_dir: Path) -> dict[str, str]:
    return {"CSRA_DATABASE_URL": url, "CSRA_REDIS_URL": redis_url, "CSRA_DATA_DIR": str(data_dir),
            "CSRA_HEARTBEAT_SECONDS": "0.2", "CSRA_STALE_AFTER_SECONDS": "5", "CSRA_MAX_ATTEMPTS": "5",
            "CSRA_LOST_MESSAGE_AFTER_SECONDS": "0.5"}


def _handler(marks: Path):  # type: ignore[no-untyped-def]
    def run(job_id: int, params: dict, ctx) -> dict:  # type: ignore[no-untyped-def]
        mark = marks / str(job_id)
        with mark.open("a") as f:
            f.write(f"start {ctx.attempt} {os.getpid()}\n")
        if params.get("die") and ctx.attempt == 1:
            time.sleep(HANDLER_SECONDS / 2)
            os._exit(3)  # a worker lost mid-job: no outcome, its heartbeat stops
        time.sleep(HANDLER_SECONDS)
        ctx.check_cancelled()  # as every handler does: a run whose job was taken over stops here (LostClaim)
        with mark.open("a") as f:
            f.write(f"end {ctx.attempt} {os.getpid()}\n")
        return {"pid": os.getpid(), "attempt": ctx.attempt}
    return run


def _worker(env: dict[str, str], ids: list[int], marks: Path, until: float) -> None:
    os.environ.update(env)
    from sqlalchemy import select

    from db.jobs import TERMINAL
    from db.models import Job
    from db.session import session_scope
    from workers.runner import execute

    handler = _handler(marks)
    rng = random.Random(os.getpid())
    while time.time() < until:
        with session_scope() as s:
            open_ids = list(s.scalars(select(Job.id).where(Job.id.in_(ids), Job.status.not_in(TERMINAL))))
        if not open_ids:
            return
        rng.shuffle(open_ids)
        for job_id in open_ids:
            execute(job_id, "import", handler)  # the same job offered again and again: duplicate deliveries


def _reaper(env: dict[str, str], until: float) -> None:
    os.environ.update(env)
    from csra.redis_conn import get_redis
    from workers.reaper import requeue_stale_running, resend_lost_messages

    while time.time() < until:
        requeue_stale_running()
        resend_lost_messages(get_redis())
        time.sleep(0.1)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'claims.db'}"
    return str(request.getfixturevalue("postgres").create_database(f"claims_{os.getpid()}_{time.monotonic_ns()}"))


def test_two_reapers_and_several_workers_run_every_job_exactly_once(database: str, tmp_path: Path) -> None:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from db import migrate
    from db.jobs import new_job
    from db.models import Job, JobEvent
    from db.session import make_engine

    redis = RedisServer(tmp_path / "redis")
    redis.start(persist=False)
    marks = tmp_path / "marks"
    marks.mkdir()
    env = _env(database, redis.url, tmp_path / "data")
    migrate.upgrade(database)
    engine = make_engine(database)
    with Session(engine) as s:
        ids = [new_job(s, "import", {"die": i % DIES_EVERY == 0}).id for i in range(JOBS)]
        s.commit()
    ctx = mp.get_context("spawn")  # fresh interpreters: no engine or settings cached from this one
    until = time.time() + 90
    reapers = [ctx.Process(target=_reaper, args=(env, until)) for _ in range(REAPERS)]
    workers = [ctx.Process(target=_worker, args=(env, ids, marks, until)) for _ in range(WORKERS)]
    try:
        for p in reapers + workers:
            p.start()
        deaths = 0
        while any(w.is_alive() for w in workers) and time.time() < until:
            for i, w in enumerate(workers):
                if not w.is_alive() and w.exitcode == 3:  # died mid-job: a new worker takes its place
                    deaths += 1
                    workers[i] = ctx.Process(target=_worker, args=(env, ids, marks, until))
                    workers[i].start()
            time.sleep(0.1)
    finally:
        for p in workers + reapers:
            if p.is_alive():
                p.terminate()
            p.join(10)
        redis.stop()

    with Session(engine) as s:
        rows = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids)))}
        requeued = s.scalars(select(JobEvent.job_id).where(JobEvent.message.like("re-queued%"))).all()
    engine.dispose()
    ends: Counter[int] = Counter()
    for job_id in ids:
        lines = (marks / str(job_id)).read_text().splitlines()
        ends[job_id] = sum(line.startswith("end ") for line in lines)
        job = rows[job_id]
        assert job.status == "succeeded", (job_id, job.status, job.error, lines)
        assert ends[job_id] == 1, (job_id, lines)  # ran to its end exactly once
        end_attempt, end_pid = next(line for line in lines if line.startswith("end ")).split()[1:]
        assert job.result == {"pid": int(end_pid), "attempt": int(end_attempt),
                              "wall_seconds": job.result["wall_seconds"]}  # recorded by the run that ended it
        assert job.attempts == int(end_attempt)
        if job.params["die"]:
            assert sum(line.startswith("start ") for line in lines) >= 2, lines  # retried after its death
    assert deaths >= JOBS // DIES_EVERY
    logging.getLogger(__name__).info("%s: %d jobs, %d worker deaths, %d re-queued by a reaper",
                                     database.split(":")[0], JOBS, deaths, len(requeued))
