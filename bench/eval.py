"""Evaluation speed: batched generation vs one example at a time, same model and examples, one run.

    python bench/eval.py [--examples 32 --batch 8 16 --max-new-tokens 64 --model baseline|tiny]

Goal (issue): at least 4x the examples/s at batch 8 or more on CPU, with the same texts (greedy).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from csra.specs import DEFAULT_INSTRUCTION  # noqa: E402
from ml.inference.batches import generate_batch, generate_many  # noqa: E402
from ml.inference.types import GenerationRequest  # noqa: E402
from ml.prompting import example_prompt  # noqa: E402
from models_store.loading import build_tiny_causal, ensure_baseline, load_model_and_tokenizer  # noqa: E402


def model_path(kind: str, store: Path) -> Path:
    data_store = Path(os.environ.get("CSRA_DATA_DIR", REPO / "var")) / "models"
    if kind == "tiny":
        return build_tiny_causal(store / "tiny")
    if (data_store / "baseline" / "config.json").is_file():
        return data_store / "baseline"
    return ensure_baseline(store, "baseline")


def messages(data: Path, n: int, seed: int) -> list[str]:
    df = pd.read_csv(data)
    return df.groupby("intent").sample(n=1 + n // 27, random_state=seed)["instruction"].head(n).tolist()


def run(label: str, fn, n: int) -> tuple[float, list[str]]:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    texts = fn()
    wall = time.perf_counter() - t0
    print(f"{label:<28} {wall:8.1f} s   {n / wall:6.2f} examples/s", flush=True)
    return n / wall, texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--batch", type=int, nargs="+", default=[8, 16])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--model", choices=["baseline", "tiny"], default="baseline")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/data/bitext/bitext_customer_support.csv")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model_and_tokenizer(model_path(args.model, Path(tmp)))
        prompts = [example_prompt(loaded.tokenizer, DEFAULT_INSTRUCTION, m)
                   for m in messages(args.data, args.examples, 0)]
        reqs = [GenerationRequest(prompt=q, max_new_tokens=args.max_new_tokens) for q in prompts]
        print(f"model {args.model}, {len(reqs)} Bitext test messages, greedy, max_new_tokens "
              f"{args.max_new_tokens}, torch threads {torch.get_num_threads()}")
        one_rate, one_texts = run("one at a time", lambda: [generate_batch(loaded, [r])[0].text for r in reqs],
                                  len(reqs))
        for b in args.batch:
            rate, texts = run(f"batched (batch {b}, sorted)", lambda b=b: [r.text for r in generate_many(
                loaded, reqs, batch_size=b)], len(reqs))
            same = sum(a == c for a, c in zip(one_texts, texts, strict=True))
            ok = "meets" if rate / one_rate >= 4 else "MISSES"
            print(f"  -> {rate / one_rate:.2f}x one-at-a-time ({ok} the 4x goal); identical texts {same}/{len(reqs)}")


if __name__ == "__main__":
    main()
