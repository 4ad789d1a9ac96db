"""Drills under a real ``csra up``: parts are killed with SIGKILL, the stack heals, jobs finish.

``csra up`` (redis-server, three Celery workers, the API) runs on free ports over a tiny baseline
model. Each drill kills one part the way an OOM killer or a crash would and checks that the part
is restarted (counted in ``/health``), and that the affected jobs are retried, resumed or failed
with a clear error, with nothing stored lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.integration.helpers import wait_job
from tests.stack import free_port, tiny_baseline, wait_until


class Up:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port, self.redis_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CSRA_")}
        self.env.update(CSRA_DATA_DIR=str(root / "var"), CSRA_API_PORT=str(self.port),
                        CSRA_REDIS_PORT=str(self.redis_port), CSRA_TORCH_THREADS="1", CSRA_HEARTBEAT_SECONDS="0.5",
                        CSRA_STALE_AFTER_SECONDS="4", CSRA_REAP_INTERVAL_SECONDS="1",
                        CSRA_LOST_MESSAGE_AFTER_SECONDS="4", CSRA_MAX_ATTEMPTS="3", PYTHONUNBUFFERED="1")
        self.proc: subprocess.Popen[bytes] | None = None

    def csra(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "csra.cli", *args], env=self.env, check=True, capture_output=True)

    def start(self) -> None:
        self.csra("migrate")
        with tiny_baseline(self.env):  # made while `csra up` starts its parts
            log = (self.root / "up.log").open("wb")
            self.proc = subprocess.Popen([sys.executable, "-m", "csra.cli", "up", "--no-ui", "--skip-model-init"],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.ready, 120, 0.5, "csra up")

    def health(self) -> dict[str, Any]:
        try:
            return httpx.get(f"{self.url}/health", timeout=3).json()
        except (httpx.HTTPError, ValueError):
            return {}

    def ready(self) -> bool:
        h = self.health()
        return (h.get("status") == "ok" and all(h["workers"].get(q) for q in ("default", "train", "generate"))
                and bool(h.get("supervisor")))

    def part(self, name: str) -> dict[str, Any]:
        return self.health()["supervisor"]["parts"][name]

    def kill_part(self, name: str) -> int:
        pid = int(self.part(name)["pid"])
        os.kill(pid, signal.SIGKILL)
        return pid

    def restarted(self, name: str, old_pid: int, count: int) -> bool:
        h = self.health()
        part = ((h.get("supervisor") or {}).get("parts") or {}).get(name) or {}
        return part.get("restarts") == count and part.get("running") and part.get("pid") != old_pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def log(self) -> str:
        return (self.root / "up.log").read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    stack = Up(tmp_path_factory.mktemp("up"))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        print(stack.log())  # noqa: T201 - the log, for a failing run


@pytest.fixture(scope="module")
def api_up(up: Up) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=up.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def dataset(api_up: httpx.Client, bitext_path: Path) -> int:
    r = api_up.post("/datasets", json={"name": "bitext", "source": str(bitext_path)})
    assert wait_job(api_up, r.json()["job"]["id"])["status"] == "succeeded"
    return r.json()["dataset"]["id"]


def _stage_in(api: httpx.Client, job_id: int, stages: tuple[str, ...]) -> bool:
    job = api.get(f"/jobs/{job_id}").json()
    return job["status"] == "running" and job["stage"].startswith(stages)


def test_a_killed_generate_worker_is_restarted_and_the_chat_reply_retried(up, api_up):
    chat = api_up.post("/chats", json={"title": "drill"}).json()
    sent = api_up.post(f"/chats/{chat['id']}/messages", json={"content": "Where is my order?",
                                                              "max_new_tokens": 1500}).json()
    job_id = sent["job"]["id"]
    wait_until(lambda: _stage_in(api_up, job_id, ("waiting for a batch", "generating")), 60, 0.05, "decoding")
    old = up.kill_part("worker-generate")  # the thread-pool worker: the job runs inside this very process
    wait_until(lambda: up.restarted("worker-generate", old, 1), 60, 0.5, "the generate worker to restart")
    job = wait_job(api_up, job_id, timeout=180)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job  # retried once the heartbeat went stale
    messages = api_up.get(f"/chats/{chat['id']}").json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "Where is my order?" and messages[1]["status"] == "done"
    assert any("restarted 1 time" in w for w in up.health()["warnings"])


def test_redis_killed_during_training_is_restarted_and_the_jobs_finish(up, api_up, dataset):
    running = api_up.post("/jobs/train", json={"dataset_id": dataset, "epochs": 40, "max_train_samples": 32,
                                               "batch_size": 4, "eval_every": 1000, "output_name": "drill-redis"})
    queued = api_up.post("/jobs/train", json={"dataset_id": dataset, "epochs": 1, "max_train_samples": 16,
                                              "batch_size": 4, "output_name": "drill-redis-queued"})
    assert running.status_code == queued.status_code == 202
    wait_until(lambda: _stage_in(api_up, running.json()["id"], ("training",)), 120, 0.2, "training to start")
    old = up.kill_part("redis")
    wait_until(lambda: up.restarted("redis", old, 1), 60, 0.5, "Redis to restart")
    wait_until(up.ready, 60, 0.5, "every worker to reconnect")
    first = wait_job(api_up, running.json()["id"], timeout=300)
    second = wait_job(api_up, queued.json()["id"], timeout=300)
    assert first["status"] == "succeeded", first
    assert second["status"] == "succeeded", second  # its queue message survived the restart (AOF)
    names = {m["name"] for m in api_up.get("/models").json()["data"]}
    assert {"drill-redis", "drill-redis-queued"} <= names


def test_a_killed_training_process_resumes_from_its_checkpoint(up, api_up, dataset):
    r = api_up.post("/jobs/train", json={"dataset_id": dataset, "epochs": 20, "max_train_samples": 32,
                                         "batch_size": 4, "eval_every": 20, "max_eval_samples": 8,
                                         "output_name": "drill-resume"})
    job_id = r.json()["id"]

    def checkpointed() -> bool:
        events = api_up.get(f"/jobs/{job_id}/events", params={"kind": "metric"}).json()["data"]
        return any("eval_loss" in (e.get("data") or {}) for e in events)

    wait_until(checkpointed, 180, 0.2, "the first checkpoint")
    job = api_up.get(f"/jobs/{job_id}").json()
    pool_child = int(job["worker"].rsplit(":", 1)[1])
    assert pool_child != up.part("worker-train")["pid"]  # the prefork child, not the worker itself
    os.kill(pool_child, signal.SIGKILL)
    done = wait_job(api_up, job_id, timeout=300)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert done["result"]["resumed_from_step"] >= 20
    logs = [e["message"] for e in api_up.get(f"/jobs/{job_id}/events", params={"kind": "log"}).json()["data"]]
    assert any(m.startswith("resumed from step") for m in logs), logs
    assert psutil.pid_exists(up.part("worker-train")["pid"])  # the worker itself stayed up
