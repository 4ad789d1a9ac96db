"""The evaluation metrics of one model served each way (torch, llama.cpp f16 / bf16 / q8_0 / q4_k_m / q4_0) on
the same test rows, through the running stack: exports made first where missing, one evaluation job per backend;
and, on the board beside them, retrieval (each test message answered with the approved answer of the
most similar training message, no model: the bar a suggestion has to beat).

    python bench/eval_backends.py --model estimate-check --dataset 2 [--url ...] [--samples 300]

Prints each backend's ROUGE-L, BLEU, chrF, semantic similarity and generation time, the ROUGE-L cost of
each quantization against torch (the goal: at most 0.01), and the sample's make-up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from csra.client import Client  # noqa: E402

BACKENDS = ["torch", "llamacpp:f16", "llamacpp:bf16", "llamacpp:q8_0", "llamacpp:q4_k_m", "llamacpp:q4_0"]
RETRIEVAL = "retrieval"  # csra.specs.RETRIEVAL: the registered retrieval responder


def finished(c: Client, job_id: int) -> dict[str, Any]:
    while not (job := c.job(job_id))["finished"]:
        time.sleep(2)
    if job["status"] != "succeeded":
        raise SystemExit(f"job {job_id} {job['status']}: {job['error']}")
    return job


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", type=int, required=True)
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--backends", default=",".join([RETRIEVAL, *BACKENDS]),
                   help=f"comma-separated, from {RETRIEVAL},{','.join(BACKENDS)}")
    args = p.parse_args()
    with Client(base_url=args.url) as c:
        have = {f["name"] for f in c.get(f"/models/{args.model}/files")["data"]}
        for backend in args.backends.split(","):
            quant = backend.partition(":")[2]
            if backend != RETRIEVAL and quant and f"{args.model}-{quant}.gguf" not in have:
                finished(c, c.export_model(args.model, {"quantization": quant})["id"])
        rows = {}
        for backend in args.backends.split(","):
            model, how = (RETRIEVAL, "torch") if backend == RETRIEVAL else (args.model, backend)
            job = c.evaluate({"model_ids": [model], "dataset_id": args.dataset, "max_samples": args.samples,
                              "backend": how})
            ev = c.evaluation(finished(c, job["id"])["result"]["evaluation_id"])
            rows[backend] = (ev["metrics"][model], ev["sample"])
    sample = next(iter(rows.values()))[1]
    print(f"{args.model} on dataset {args.dataset}: {sample['examples']} test rows, {sample['intents']} of "
          f"{sample['split_intents']} intents (stratified, seed 42), greedy")
    print(f"{'backend':<17}{'ROUGE-L':>9}{'BLEU':>7}{'chrF':>7}{'semantic':>10}{'gen s':>8}{'ROUGE-L vs torch':>18}")
    ref = rows.get("torch", next(iter(rows.values())))[0]["overall"]["rouge_l"]
    for backend, (m, _) in rows.items():
        o = m["overall"]
        print(f"{backend:<17}{o['rouge_l']:>9.3f}{o['bleu']:>7.1f}{o['chrf']:>7.1f}{o['semantic_similarity']:>10.3f}"
              f"{o['n'] / o['examples_per_second']:>8.0f}{o['rouge_l'] - ref:>+18.3f}")


if __name__ == "__main__":
    main()
