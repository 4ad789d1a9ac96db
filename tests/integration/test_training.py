"""Training jobs over HTTP with real workers, on the tiny model registered as the baseline."""

from __future__ import annotations

import os
import signal

import pytest

from tests.integration.helpers import import_path, wait_job
from tests.stack import wait_until


@pytest.fixture(scope="module")
def dataset_id(api_module, bitext_path) -> int:
    created = import_path(api_module, str(bitext_path))
    assert wait_job(api_module, created["job"]["id"])["status"] == "succeeded"
    return created["dataset"]["id"]


def _train(api, **params) -> dict:
    r = api.post("/jobs/train", json=params)
    assert r.status_code == 202, r.text
    return r.json()


def test_train_registers_a_model_with_its_loss_curve(api, dataset_id, stack):
    job = _train(api, dataset_id=dataset_id, epochs=1, batch_size=8, max_train_samples=48, eval_every=3,
                 max_eval_samples=16, logging_steps=1, learning_rate=1e-3, output_name="tiny-ft")
    assert job["queue"] == "train" and job["params"]["base_model"] == "baseline"
    done = wait_job(api, job["id"], timeout=300)
    assert done["status"] == "succeeded", done["error"]
    r = done["result"]
    assert r["model_name"] == "tiny-ft" and r["steps"] == 6 and r["tokens_seen"] > 0
    assert r["best_val_loss"] is not None and r["tokens_per_second"] > 0
    model = api.get("/models/tiny-ft").json()
    assert model["kind"] == "fine-tuned" and model["train_job_id"] == job["id"]
    assert model["training_config"]["learning_rate"] == 1e-3 and model["parameter_count"] > 0
    assert model["content_hash"] and model["size_bytes"] > 0 and model["base_model"] == "baseline"
    events = api.get(f"/jobs/{job['id']}/events", params={"kind": "metric"}).json()["data"]
    losses = [e["data"]["loss"] for e in events if "loss" in e["data"]]
    evals = [e["data"]["eval_loss"] for e in events if "eval_loss" in e["data"]]
    assert len(losses) == 6 and len(evals) >= 2
    # the same output name again is refused before anything runs
    again = api.post("/jobs/train", json={"dataset_id": dataset_id, "output_name": "tiny-ft"})
    assert again.status_code == 409 and "already exists" in again.json()["detail"]
    # delete: gone from the store and the disk
    path = model["id"]
    assert api.delete(f"/models/{path}").status_code == 204
    assert api.get("/models/tiny-ft").status_code == 404
    assert not (stack.root / "data" / "models" / "tiny-ft").exists()


@pytest.mark.parametrize(
    ("params", "needle"),
    [({"learning_rate": 0}, "learning_rate"), ({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"),
     ({"output_name": "../../etc"}, "output_name"), ({"max_input_length": 600, "max_target_length": 600}, "context"),
     ({"base_model": "no-such-model"}, "unknown base_model"), ({"dataset_id": 99999}, "does not exist")],
)
def test_bad_training_requests_are_422(api, dataset_id, params, needle):
    r = api.post("/jobs/train", json={"dataset_id": dataset_id, **params})
    assert r.status_code == 422, r.text
    assert needle in str(r.json()["detail"])


def test_bad_training_jobs_fail_with_a_readable_error(api, dataset_id, stack):
    job = _train(api, dataset_id=dataset_id, method="lora", lora_target_modules=["not_a_module"],
                 max_train_samples=8, epochs=1)
    done = wait_job(api, job["id"], timeout=120)
    assert done["status"] == "failed" and "not_a_module" in done["error"]
    empty = stack.root / "imports" / "empty-model"
    empty.mkdir(exist_ok=True)
    (empty / "config.json").write_text('{"model_type": "llama"}')
    job = _train(api, dataset_id=dataset_id, base_model=str(empty), max_train_samples=8, epochs=1)
    done = wait_job(api, job["id"], timeout=120)
    assert done["status"] == "failed" and "no weights" in done["error"]
    assert api.get("/models").json()["count"] == sum(1 for m in api.get("/models").json()["data"])


def test_cancel_training_registers_nothing(api, dataset_id):
    models_before = api.get("/models").json()["count"]
    job = _train(api, dataset_id=dataset_id, epochs=50, batch_size=4, max_train_samples=64, eval_every=1000)
    wait_until(lambda: api.get(f"/jobs/{job['id']}").json()["progress"] > 0.02, 120, 0.2, "training to start")
    api.post(f"/jobs/{job['id']}/cancel")
    done = wait_job(api, job["id"], timeout=60)
    assert done["status"] == "cancelled"
    assert api.get("/models").json()["count"] == models_before


def test_killed_training_resumes_from_its_last_checkpoint(api, dataset_id):
    job = _train(api, dataset_id=dataset_id, epochs=12, batch_size=4, max_train_samples=32, eval_every=20,
                 max_eval_samples=8, logging_steps=10, output_name="tiny-resumed")
    job_id = job["id"]

    def checkpointed() -> bool:
        events = api.get(f"/jobs/{job_id}/events", params={"kind": "metric"}).json()["data"]
        return sum("eval_loss" in e["data"] for e in events) >= 2

    wait_until(checkpointed, 180, 0.2, "two checkpoints")
    running = api.get(f"/jobs/{job_id}").json()
    os.kill(int(running["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    done = wait_job(api, job_id, timeout=300)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2 and done["result"]["resumed_from_step"] >= 40
    assert done["result"]["steps"] == 96  # killed just after step 40: most of the run is after the restart
    logs = [e["message"] for e in api.get(f"/jobs/{job_id}/events", params={"kind": "log"}).json()["data"]]
    assert any("resumed from step" in m for m in logs)


def test_sweep_runs_one_training_job_per_config(api, dataset_id):
    r = api.post("/jobs/sweep", json={
        "dataset_id": dataset_id, "base": {"max_train_samples": 16, "max_eval_samples": 8, "batch_size": 8},
        "grid": {"learning_rate": [5e-5, 1e-4]}, "evaluate": False})
    assert r.status_code == 202, r.text
    done = wait_job(api, r.json()["id"], timeout=300)
    assert done["status"] == "succeeded", done["error"]
    board = done["result"]["leaderboard"]
    assert [row["learning_rate"] for row in sorted(board, key=lambda x: x["job_id"])] == [5e-5, 1e-4]
    assert all(row["status"] == "succeeded" and row["model_id"] for row in board)
    children = api.get("/jobs", params={"parent_id": done["id"]}).json()
    assert children["count"] == 2
