"""Evaluation jobs end to end: batched generation, metrics, stored predictions, leaderboard, report."""

from __future__ import annotations

import json

import pytest

from tests.integration.helpers import bitext_sample, wait_job

METRICS = ("rouge_l", "bleu", "chrf", "semantic_similarity", "heuristic_quality", "too_verbose",
           "asks_needless_details", "repetitive", "off_tone", "unfinished", "latency_ms_mean", "tokens_per_second")


@pytest.fixture(scope="module")
def dataset(api_module, stack, bitext_path) -> int:
    source = bitext_sample(stack.root / "imports", bitext_path, per_intent=30)  # 810 rows, 27 intents
    r = api_module.post("/datasets", json={"name": "eval", "source": str(source)})
    assert wait_job(api_module, r.json()["job"]["id"])["status"] == "succeeded"
    return r.json()["dataset"]["id"]


@pytest.fixture(scope="module")
def finetuned(api_module, dataset) -> str:
    r = api_module.post("/jobs/train", json={"dataset_id": dataset, "max_train_samples": 32, "epochs": 1,
                                        "output_name": "tiny-eval-ft", "learning_rate": 1e-3})
    assert wait_job(api_module, r.json()["id"], timeout=240)["status"] == "succeeded"
    return "tiny-eval-ft"


def test_evaluate_baseline_and_finetuned(api_module, dataset, finetuned):
    r = api_module.post("/jobs/evaluate", json={"model_ids": ["baseline", finetuned], "dataset_id": dataset,
                                           "max_samples": 30, "max_new_tokens": 16, "batch_size": 8})
    assert r.status_code == 202, r.text
    job = wait_job(api_module, r.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    ev_id = job["result"]["evaluation_id"]
    ev = api_module.get(f"/evaluations/{ev_id}").json()
    assert ev["status"] == "succeeded" and set(ev["metrics"]) == {"baseline", finetuned}
    assert ev["sample"]["examples"] == 30 and ev["sample"]["intents"] == ev["sample"]["split_intents"] == 27
    assert job["result"]["intents"] == 27
    for name in ("baseline", finetuned):
        overall = ev["metrics"][name]["overall"]
        assert overall["n"] == 30 and all(k in overall for k in METRICS), overall.keys()
        assert len(ev["metrics"][name]["per_intent"]) == 27  # stratified sample covers every intent
        assert ev["metrics"][name]["per_category"]
    ex = api_module.get(f"/evaluations/{ev_id}/examples",
                        params={"model": finetuned, "sort": "worst", "limit": 5}).json()
    assert ex["count"] == 30 and len(ex["data"]) == 5
    rl = [e["scores"]["rouge_l"] for e in ex["data"]]
    assert rl == sorted(rl) and all(e["reference"] and e["prompt"] for e in ex["data"])
    patt = api_module.get(f"/evaluations/{ev_id}/examples", params={"pattern": "unfinished"}).json()
    assert all(e["scores"]["unfinished"] for e in patt["data"])
    assert api_module.get(f"/evaluations/{ev_id}/examples", params={"pattern": "bogus"}).status_code == 422
    board = api_module.get("/leaderboard", params={"dataset_id": dataset}).json()["data"]
    names = [row["model"] for row in board]
    assert {"baseline", finetuned} <= set(names)
    ft_row = next(row for row in board if row["model"] == finetuned)
    assert ft_row["training_config"]["max_train_samples"] == 32
    assert ft_row["training_metrics"]["train_rows"] == 32
    assert ft_row["training_metrics"]["train_intents"] == 27  # drawn, not sliced
    assert ft_row["sample"]["intents"] == 27
    html = api_module.get(f"/evaluations/{ev_id}/report", params={"format": "html"}, follow_redirects=True)
    assert html.status_code == 200 and "<table" in html.text and "metrics.png" in html.text
    md = api_module.get(f"/evaluations/{ev_id}/report.md")
    assert md.status_code == 200 and finetuned in md.text and "27 of 27 intents" in md.text
    png = api_module.get(f"/evaluations/{ev_id}/metrics.png")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    assert api_module.get(f"/evaluations/{ev_id}/loss_curves.png").status_code == 200
    assert api_module.get(f"/evaluations/{ev_id}/..%2Fcsra.db").status_code == 404


@pytest.mark.parametrize(
    ("body", "needle"),
    [({"model_ids": ["ghost"]}, "unknown model"), ({"max_samples": 0}, "max_samples"),
     ({"dataset_id": 987654}, "does not exist"), ({"model_ids": []}, "model_ids")],
)
def test_bad_evaluation_requests(api_module, dataset, body, needle):
    r = api_module.post("/jobs/evaluate", json={"model_ids": ["baseline"], "dataset_id": dataset, **body})
    assert r.status_code == 422 and needle in json.dumps(r.json()["detail"]), r.text


def test_empty_split_is_422(api_module):
    rows = "\n".join(f"message number {i} about my order,reply number {i} about your order; thanks!" for i in range(20))
    r = api_module.post("/datasets", files={"file": ("nt.csv", f"customer,agent\n{rows}".encode())},
                   data={"options": json.dumps({"column_mapping": {"input": "customer", "output": "agent"},
                                                "train_fraction": 0.8, "validation_fraction": 0.2,
                                                "test_fraction": 0})})
    assert wait_job(api_module, r.json()["job"]["id"])["status"] == "succeeded"
    bad = api_module.post("/jobs/evaluate", json={"model_ids": ["baseline"], "dataset_id": r.json()["dataset"]["id"]})
    assert bad.status_code == 422 and "empty" in bad.json()["detail"]


def test_one_broken_model_keeps_the_others_results(api_module, dataset, stack):
    r = api_module.post("/jobs/train", json={"dataset_id": dataset, "max_train_samples": 8, "epochs": 1,
                                        "output_name": "tiny-corrupt"})
    assert wait_job(api_module, r.json()["id"], timeout=240)["status"] == "succeeded"
    weights = stack.root / "data" / "models" / "tiny-corrupt" / "model.safetensors"
    weights.write_bytes(b"this is not a safetensors file")
    r = api_module.post("/jobs/evaluate", json={"model_ids": ["baseline", "tiny-corrupt"], "dataset_id": dataset,
                                           "max_samples": 10, "max_new_tokens": 8})
    job = wait_job(api_module, r.json()["id"], timeout=300)
    assert job["status"] == "succeeded" and "tiny-corrupt" in job["result"]["errors"]
    ev = api_module.get(f"/evaluations/{job['result']['evaluation_id']}").json()
    assert ev["status"] == "partial" and ev["metrics"]["baseline"]["overall"]["n"] == 10


def test_sweep_evaluates_its_models_against_the_baseline(api_module, dataset):
    r = api_module.post("/jobs/sweep", json={
        "dataset_id": dataset, "configs": [{"learning_rate": 1e-3}, {"learning_rate": 5e-4, "batch_size": 4}],
        "base": {"max_train_samples": 16, "max_eval_samples": 8, "epochs": 1},
        "evaluate": True, "eval_max_samples": 27, "eval_max_new_tokens": 12})
    assert r.status_code == 202, r.text
    done = wait_job(api_module, r.json()["id"], timeout=400)
    assert done["status"] == "succeeded", done["error"]
    board = done["result"]["leaderboard"]
    assert len(board) == 3 and board[-1]["model_name"] == "baseline"
    assert all(row["metrics"] and "rouge_l" in row["metrics"] for row in board)
    assert done["result"]["evaluation_status"] == "succeeded"
    evaluation = api_module.get(f"/jobs/{done['result']['evaluate_job_id']}").json()
    assert evaluation["params"]["max_new_tokens"] == 12  # the sweep's evaluation settings reach its evaluation


def test_cli_eval_prints_the_leaderboard(stack, dataset, finetuned):
    import subprocess
    import sys

    env = {**stack.env, "COLUMNS": "100"}
    done = subprocess.run([sys.executable, "-m", "csra.cli", "eval", "--models", f"baseline,{finetuned}",
                           "--dataset", str(dataset), "--max-samples", "6", "--max-new-tokens", "4"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "succeeded" in done.stderr and "/report.html" in done.stderr  # progress and notes on stderr
    for label in ("ROUGE-L", "heuristic (0-3)", "slots invented", f"{finetuned} (n=", "baseline (n="):
        assert label in done.stdout, done.stdout
    assert "6 of " in done.stdout and "intents" in done.stdout  # the sample's make-up beside the numbers
    from pathlib import Path

    evaluations = Path(stack.env["CSRA_DATA_DIR"]) / "evaluations"
    assert list(evaluations.glob("*/report.html")) and not list(evaluations.glob("*/*.partial.jsonl"))
    unknown = subprocess.run([sys.executable, "-m", "csra.cli", "eval", "--models", "ghost",
                              "--dataset", str(dataset)], env=env, capture_output=True, text=True, timeout=60)
    assert unknown.returncode != 0 and "ghost" in unknown.stdout + unknown.stderr
