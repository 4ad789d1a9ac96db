"""The README's grounded-replies run, repeatable: against a running stack (`csra up --no-ui`), import
the Bitext copy, build the answer memory from its train split, fine-tune SmolLM2-135M grounded on
the same rows and steps as the README's ungrounded fine-tune, and evaluate it beside retrieval (and
any other models named) on the test split, stratified by intent.

    python bench/grounded.py --url http://127.0.0.1:8000 --models retrieval,smollm2-bitext-grounded \
        --samples 300 --samples all
    python bench/grounded.py --ungrounded --model smollm2-bitext --train-rows 1200 --models smollm2-bitext
    python bench/grounded.py --split validation --length-floor 0 --length-floor 0.8 --models smollm2-bitext-grounded
    python bench/grounded.py --split validation --copy-bias 1 --copy-bias 2.5 --copy-bias 5 --backend llamacpp:bf16
    python bench/grounded.py --split validation --consensus-pool 0 --consensus-pool 8 --no-repeat-ngram 0 \
        --no-repeat-ngram 16 --backend llamacpp:bf16


Each step is skipped when its result already exists (the dataset, the memory, the model), so a rerun
only evaluates. Everything the README quotes is printed, with the sample's make-up, and written to
bench/results/grounded-<time>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

# the README's fine-tune, plus grounding (its defaults: k=3 exemplars of at most 48 tokens)
TRAIN = {"epochs": 1, "batch_size": 8, "learning_rate": 1e-4, "warmup_ratio": 0.05, "max_train_samples": 2400,
         "eval_every": 100, "max_eval_samples": 100, "grounding": {}}
METRICS = ("rouge_l", "bleu", "chrf", "semantic_similarity", "intent_match", "slots_outside_contract", "too_verbose",
           "asks_needless_details", "repetitive", "unfinished", "placeholders_invented")


def wait(api: httpx.Client, job_id: int, what: str) -> dict[str, Any]:
    last = ""
    while True:
        job = api.get(f"/jobs/{job_id}").json()
        line = f"{what}: {job['status']} {job.get('progress') or 0:.0%} {job.get('message') or ''}"
        if line != last:
            print(line, flush=True)
            last = line
        if job["finished"]:
            if job["status"] != "succeeded":
                raise SystemExit(f"{what} {job['status']}: {job.get('error')}")
            return job
        time.sleep(5)


def minutes(job: dict[str, Any]) -> float:
    start, end = (datetime.fromisoformat(job[k]) for k in ("started_at", "finished_at"))
    return round((end - start).total_seconds() / 60, 1)


def dataset(api: httpx.Client, source: str) -> int:
    for ds in api.get("/datasets").json()["data"]:
        if ds["name"] == "bitext" and ds["status"] == "ready":
            return int(ds["id"])
    r = api.post("/datasets", json={"name": "bitext", "source": source})
    r.raise_for_status()
    wait(api, r.json()["job"]["id"], "import")
    return int(r.json()["dataset"]["id"])


def evaluate(api: httpx.Client, body: dict[str, Any], what: str) -> dict[str, Any]:
    """One evaluation job, waited for and printed with its sample's make-up: what the results file keeps."""
    job = api.post("/jobs/evaluate", json=body)
    job.raise_for_status()
    done = wait(api, job.json()["id"], f"evaluate {what}")
    ev = api.get(f"/evaluations/{done['result']['evaluation_id']}").json()
    table = {m: {k: ev["metrics"][m]["overall"].get(k) for k in METRICS} for m in body["model_ids"]}
    print(f"\nevaluation {ev['id']}: {ev['sample']['examples']} {body['split']} rows, {ev['sample']['intents']} of "
          f"{ev['sample']['split_intents']} intents, {minutes(done)} min, {what}")
    print("model".ljust(28) + "".join(k[:10].rjust(11) for k in METRICS))
    for m, row in table.items():
        print(m.ljust(28) + "".join(("-" if v is None else f"{v:.3f}").rjust(11) for v in row.values()))
    return {"evaluation": ev["id"], "minutes": minutes(done), "sample": ev["sample"], "metrics": table,
            "grounding": {m: ev["metrics"][m].get("grounding") for m in body["model_ids"]}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--source", default="../shared/data/bitext/bitext_customer_support.csv")
    p.add_argument("--model", default="smollm2-bitext-grounded", help="the grounded model's name")
    p.add_argument("--models", default="retrieval,smollm2-bitext-grounded", help="evaluated, comma-separated")
    p.add_argument("--samples", action="append", default=None, help="test rows per evaluation ('all': every one)")
    p.add_argument("--train-rows", type=int, default=TRAIN["max_train_samples"], help="stratified training rows")
    p.add_argument("--k", type=int, default=None, help="exemplars per prompt (default: the Grounding default)")
    p.add_argument("--exemplar-tokens", type=int, default=None, help="each exemplar cut to this many tokens")
    p.add_argument("--split", default="test", choices=("test", "validation"),
                   help="evaluated on (choose a length floor on validation, then measure it once on test)")
    p.add_argument("--length-floor", action="append", type=float, default=None,
                   help="evaluate grounded models with this length floor instead of their own (repeatable: one "
                        "evaluation per value)")
    p.add_argument("--copy-bias", action="append", type=float, default=None,
                   help="evaluate grounded models with this copy bias instead of their own (repeatable)")
    p.add_argument("--copy-exemplars", action="append", type=int, default=None,
                   help="the copy bias follows the first n exemplars only (repeatable; 0: all)")
    p.add_argument("--consensus-pool", action="append", type=int, default=None,
                   help="grounding exemplars chosen by consensus among this many nearest answers (repeatable; 0: "
                        "the nearest)")
    p.add_argument("--no-repeat-ngram", action="append", type=int, default=None,
                   help="the loop guard: no repeated run of this many tokens (repeatable; 0: off)")
    p.add_argument("--max-new-tokens", action="append", type=int, default=None,
                   help="the evaluation's reply cap (repeatable; default: the evaluation's own)")
    p.add_argument("--backend", default="torch", help="the evaluation's backend (llamacpp:bf16 ... needs an export)")
    p.add_argument("--ungrounded", action="store_true",
                   help="train --model WITHOUT grounding on the same rows and steps (the like-for-like comparison)")
    args = p.parse_args()
    api = httpx.Client(base_url=args.url, timeout=60)
    out: dict[str, Any] = {"started": datetime.now().isoformat(timespec="seconds")}
    ds = dataset(api, args.source)
    if ds not in api.get("/memory").json()["datasets"]:
        job = api.post("/memory/rebuild", json={"dataset_id": ds}).json()
        out["memory_minutes"] = minutes(wait(api, job["id"], "memory"))
    if api.get(f"/models/{args.model}").status_code == 404:
        grounding = {k: v for k, v in (("k", args.k), ("max_exemplar_tokens", args.exemplar_tokens)) if v is not None}
        spec = {**TRAIN, "max_train_samples": args.train_rows, "grounding": None if args.ungrounded else grounding}
        job = api.post("/jobs/train", json={"dataset_id": ds, **spec, "output_name": args.model})
        job.raise_for_status()
        done = wait(api, job.json()["id"], "train")
        out["train"] = {"minutes": minutes(done), **{k: done["result"].get(k) for k in
                        ("best_val_loss", "tokens_seen", "tokens_per_second", "steps", "precision")}}
        print("training:", json.dumps(out["train"]))
    # every combination of the decode settings asked for (None: the model's own)
    settings = {"length_floor": args.length_floor, "copy_bias": args.copy_bias, "copy_exemplars": args.copy_exemplars,
                "consensus_pool": args.consensus_pool, "no_repeat_ngram_size": args.no_repeat_ngram,
                "max_new_tokens": args.max_new_tokens}
    combos = [dict(zip(settings, values, strict=True))
              for values in itertools.product(*[v or [None] for v in settings.values()])]
    for n, overrides in itertools.product(args.samples or ["300"], combos):
        body = {"model_ids": args.models.split(","), "dataset_id": ds, "max_samples": None if n == "all" else int(n),
                "split": args.split, "backend": args.backend, **{k: v for k, v in overrides.items() if v is not None}}
        what = f"{args.split} {n} {args.backend}" + "".join(f" {k} {v}" for k, v in overrides.items() if v is not None)
        out[f"eval_{what}"] = evaluate(api, body, what)
    path = Path(__file__).parent / "results" / f"grounded-{int(time.time())}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print("written", path)


if __name__ == "__main__":
    main()
