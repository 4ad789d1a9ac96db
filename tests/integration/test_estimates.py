"""Dry runs against the real stack: token counts from the import, a calibration on the train worker,
an estimate that a real run's own ETA and wall time agree with, and what happens without a worker."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.integration.helpers import import_path, wait_job
from tests.stack import wait_until

# a run of the tiny model long enough (seconds) to report an ETA several times
RUN = {"method": "lora", "precision": "fp32", "epochs": 1, "batch_size": 8, "max_train_samples": 800,
       "max_eval_samples": 16, "logging_steps": 5, "lora_r": 4}


@pytest.fixture(scope="module")
def dataset(api_module, bitext_path) -> dict:
    created = import_path(api_module, str(bitext_path))
    assert wait_job(api_module, created["job"]["id"])["status"] == "succeeded"
    return api_module.get(f"/datasets/{created['dataset']['id']}").json()


def _count_jobs(api) -> int:
    return api.get("/jobs").json()["count"]


def test_the_import_counts_tokens_per_split(dataset):
    tokens = dataset["stats"]["tokens"]
    assert tokens["tokenizer"] == "baseline"
    splits = tokens["splits"]
    assert set(splits) == {"train", "validation", "test"}
    assert sum(s["rows"] for s in splits.values()) == dataset["row_count"]
    for s in splits.values():  # a Bitext prompt is the instruction + a message: dozens of tokens a row
        assert s["prompt_tokens"] > 30 * s["rows"] and s["reply_tokens"] > 30 * s["rows"]


@pytest.mark.parametrize(("params", "needle"), [({"epochs": 0}, "epochs"), ({"base_model": "no-such"}, "base_model"),
                                                ({"dataset_id": 99999}, "does not exist")])
def test_a_bad_dry_run_is_the_same_422(api, dataset, params, needle):
    body = {"dataset_id": dataset["id"], **params}
    for dry in (True, False):
        r = api.post("/jobs/train", json={**body, "dry_run": dry})
        assert r.status_code == 422 and needle in str(r.json()["detail"]), r.text


def test_estimate_calibrates_then_matches_the_run(api_module, dataset):
    api = api_module
    before = _count_jobs(api)
    r = api.post("/jobs/train", json={"dataset_id": dataset["id"], **RUN, "dry_run": True})
    assert r.status_code == 200, r.text
    est = r.json()
    assert _count_jobs(api) == before  # nothing was created
    assert est["throughput"]["source"] == "calibration", est  # nothing measured lora/fp32 here before
    assert est["throughput"]["device"] == "cpu" and est["throughput"]["precision"] == "fp32"
    train = est["splits"]["train"]
    assert train["rows_used"] == 800 and train["rows"] == dataset["stats"]["tokens"]["splits"]["train"]["rows"]
    assert est["steps"] == 100 and est["steps_per_epoch"] == 100 and est["evaluations"] == 1
    assert est["estimated_seconds"] > 0 and not est["confirm"] and "100 steps" in est["summary"]

    job = api.post("/jobs/train", json={"dataset_id": dataset["id"], **RUN}).json()
    running = wait_until(lambda: (j := api.get(f"/jobs/{job['id']}").json())["eta_seconds"] and j, 120, 0.05,
                         "an ETA")
    done = wait_job(api, job["id"], timeout=300)
    assert done["status"] == "succeeded", done
    wall = done["result"]["wall_seconds"]
    predicted_end = running["eta_seconds"] + running["progress"] * wall  # the ETA when first reported
    # the same order of magnitude: the estimate, the run's own ETA and its real training time
    for value in (est["estimated_seconds"], predicted_end):
        assert wall / 10 < value < wall * 10, (value, wall, est)

    again = api.post("/jobs/train", json={"dataset_id": dataset["id"], **RUN, "dry_run": True}).json()
    assert again["throughput"]["source"] == f"job {job['id']}"  # the finished run is the newest measurement


def test_sweep_and_evaluation_dry_runs(api, dataset):
    before = _count_jobs(api)
    sweep = api.post("/jobs/sweep", json={"dataset_id": dataset["id"], "base": {**RUN, "max_train_samples": 80},
                                          "grid": {"learning_rate": [1e-4, 1e-3]}, "dry_run": True})
    assert sweep.status_code == 200, sweep.text
    body = sweep.json()
    assert len(body["configs"]) == 2 and body["estimated_seconds"] is not None
    assert body["estimated_seconds"] == pytest.approx(sum(c["estimated_seconds"] for c in body["configs"]))
    ev = api.post("/jobs/evaluate", json={"dataset_id": dataset["id"], "model_ids": ["baseline", "retrieval"],
                                          "max_samples": 40, "dry_run": True})
    assert ev.status_code == 200, ev.text
    est = ev.json()
    assert est["rows_used"] == 40 and [m["model"] for m in est["models"]] == ["baseline", "retrieval"]
    assert _count_jobs(api) == before
    bad = api.post("/jobs/evaluate", json={"dataset_id": dataset["id"], "model_ids": ["nope"], "dry_run": True})
    assert bad.status_code == 422 and "unknown model" in bad.json()["detail"]


def test_cli_train_prints_the_estimate_and_asks_above_the_threshold(stack, api, dataset):
    base = [sys.executable, "-m", "csra.cli", "train", "--dataset", str(dataset["id"]), "--method", "lora",
            "--set", "precision=\"fp32\"", "--set", "lora_r=4", "--max-train-samples", "800", "--batch-size", "8"]
    before = _count_jobs(api)
    long = subprocess.run([*base, "--epochs", "100000"], env=stack.env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert long.returncode == 1, long.stderr
    said = " ".join(long.stderr.split())  # rich wraps lines to the terminal width
    assert "estimate: 800 rows" in said and "pass --yes" in said and "Traceback" not in said
    assert _count_jobs(api) == before  # not started
    short = subprocess.run([*base, "--epochs", "1", "--set", "max_eval_samples=8", "--yes"], env=stack.env,
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert short.returncode == 0, short.stderr
    assert "estimate: 800 rows" in " ".join(short.stderr.split()) and "succeeded" in short.stderr


def test_without_a_train_worker_the_estimate_says_so(stack, api, dataset):
    stack.stop_proc("worker-train")
    try:
        wait_until(lambda: not stack.health().get("workers", {}).get("train"), 30, 0.5, "the train worker to go")
        r = api.post("/jobs/train", json={"dataset_id": dataset["id"], "method": "full", "precision": "fp16",
                                          "dry_run": True})  # never measured: needs a worker
        est = r.json()
        assert r.status_code == 200 and est["estimated_seconds"] is None and est["confirm"], est
        assert "no train worker is alive" in est["note"] and "csra worker --queue train" in est["summary"]
        assert est["steps"] > 0 and est["splits"]["train"]["prompt_tokens"] > 0  # the rest still answers
    finally:
        stack.start_worker("train")
        stack.wait_ready(("train",))
    time.sleep(0.1)


def test_a_failed_calibration_is_said_at_once(stack, api, dataset):
    empty = stack.root / "empty-model"  # a folder with no model in it: the train worker cannot load it
    empty.mkdir(exist_ok=True)
    body = {"dataset_id": dataset["id"], "base_model": str(empty), "dry_run": True}
    for _ in range(2):  # the second answer comes from the stored error, without loading anything again
        started = time.monotonic()
        est = api.post("/jobs/train", json=body, timeout=120).json()
        assert est["estimated_seconds"] is None and est["confirm"], est
        assert "could not calibrate" in est["note"], est
        assert time.monotonic() - started < 25  # not the whole CSRA_ESTIMATE_WAIT_SECONDS (30)
