"""Generation throughput: one request at a time vs one batch vs generate_many, same prompts, greedy.

    python bench/generate_model.py [--n 16 --max-new-tokens 64 --many-batch-size 8 --model baseline|tiny
                                    --bf16 --threads N --hf]

The prompts are ``--n`` Bitext customer messages (spread over the file, so several intents and
lengths) rendered with ``ml.prompting`` and ``csra.specs.DEFAULT_INSTRUCTION``.

(a) sequential: ``generate_batch(loaded, [r])`` for each request, one after the other.
(b) batch: ``generate_batch(loaded, requests)`` (all ``--n`` at once).
(c) many: ``generate_many(loaded, requests, batch_size=--many-batch-size)`` (length-sorted batches).
Prints wall time, generated tokens/s, examples/s, the speed-up over (a) and whether every text is
identical to (a). ``--bf16`` repeats the three runs with the model in bfloat16 (and compares its
texts with float32's). ``--hf`` also runs ``model.generate`` (stock attention, one request at a
time) and counts how many texts match it. The machine load average is printed before and after:
the numbers mean little on a busy machine.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from csra.specs import DEFAULT_INSTRUCTION  # noqa: E402
from ml.inference.batches import generate_batch, generate_many  # noqa: E402
from ml.inference.tokens import encode_prompt, stop_tokens  # noqa: E402
from ml.inference.types import GenerationRequest, GenerationResult  # noqa: E402
from ml.prompting import example_prompt  # noqa: E402
from models_store.loading import (  # noqa: E402
    LoadedModel,
    build_tiny_causal,
    ensure_baseline,
    load_model_and_tokenizer,
)


@dataclass
class Run:
    name: str
    wall: float
    cpu: float
    results: list[GenerationResult]

    @property
    def tokens(self) -> int:
        return sum(r.completion_tokens for r in self.results)

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.results]


def load_messages(path: Path, n: int) -> list[str]:
    """``n`` customer messages spread evenly over the Bitext file (several intents)."""
    with open(path, newline="") as fh:
        rows = [r["instruction"] for r in csv.DictReader(fh)]
    step = max(len(rows) // n, 1)
    return [rows[i] for i in range(7, len(rows), step)][:n]


def model_folder(kind: str, store: Path) -> Path:
    if kind == "tiny":
        return build_tiny_causal(store / "tiny")
    return ensure_baseline(store)


def timed(name: str, fn: Callable[[], list[GenerationResult]]) -> Run:
    wall, cpu = time.perf_counter(), time.process_time()
    results = fn()
    return Run(name, time.perf_counter() - wall, time.process_time() - cpu, results)


def hf_generate(loaded: LoadedModel, requests: list[GenerationRequest]) -> list[str]:
    """Stock ``model.generate`` greedy, one request at a time (the reference implementation)."""
    stops = sorted(stop_tokens(loaded).every)
    texts = []
    with torch.inference_mode():
        for req in requests:
            ids = torch.tensor([encode_prompt(loaded, req.prompt)])
            out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=req.max_new_tokens, eos_token_id=stops,
                                        pad_token_id=loaded.tokenizer.pad_token_id)
            texts.append(loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return texts


def run_all(folder: Path, dtype: torch.dtype, prompts_of: Callable[[LoadedModel], list[str]],
            args: argparse.Namespace) -> list[Run]:
    loaded = load_model_and_tokenizer(folder, dtype=dtype)
    requests = [GenerationRequest(p, max_new_tokens=args.max_new_tokens) for p in prompts_of(loaded)]
    generate_batch(loaded, requests[:2])  # warm-up (first-call allocations, thread pools)
    runs = [
        timed("sequential", lambda: [generate_batch(loaded, [r])[0] for r in requests]),
        timed(f"batch {len(requests)}", lambda: generate_batch(loaded, requests)),
        timed(f"many (batch {args.many_batch_size})",
              lambda: generate_many(loaded, requests, batch_size=args.many_batch_size)),
    ]
    if args.hf:
        hf_loaded = load_model_and_tokenizer(folder, dtype=dtype)  # stock attention and Linear layers
        wall = time.perf_counter()
        texts = hf_generate(hf_loaded, requests)
        same = sum(a == b for a, b in zip(texts, runs[0].texts, strict=True))
        print(f"  model.generate (stock, one at a time): {time.perf_counter() - wall:.1f} s; "
              f"texts equal to csra sequential: {same}/{len(texts)}")
    return runs


def report(label: str, runs: list[Run], reference: list[str] | None = None) -> None:
    base = runs[0]
    print(f"\n== {label}")
    print(f"{'mode':<18}{'wall s':>8}{'cpu s':>8}{'tokens':>8}{'tok/s':>8}{'ex/s':>8}{'x seq':>7}  identical")
    for run in runs:
        same = sum(a == b for a, b in zip(run.texts, base.texts, strict=True))
        print(f"{run.name:<18}{run.wall:>8.1f}{run.cpu:>8.1f}{run.tokens:>8d}{run.tokens / run.wall:>8.1f}"
              f"{len(run.results) / run.wall:>8.2f}{base.wall / run.wall:>7.2f}  {same}/{len(run.results)}")
    lengths = [r.finish_reason for r in base.results].count("length")
    print(f"finish_reason length: {lengths}/{len(base.results)}; all texts identical to sequential: "
          f"{all(r.texts == base.texts for r in runs)}")
    if reference is not None:
        same = sum(a == b for a, b in zip(base.texts, reference, strict=True))
        print(f"texts equal to float32's: {same}/{len(reference)}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="requests (the batch size of run b)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--many-batch-size", type=int, default=8)
    p.add_argument("--model", choices=["baseline", "tiny"], default="baseline")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/data/bitext/bitext_customer_support.csv")
    p.add_argument("--store", type=Path, default=None, help="model store (default: $CSRA_DATA_DIR/models or temp)")
    p.add_argument("--bf16", action="store_true", help="also run everything in bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--hf", action="store_true", help="also run stock model.generate one at a time")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = os.environ.get("CSRA_DATA_DIR")
    tmp = tempfile.TemporaryDirectory()
    store = args.store or (Path(data_dir) / "models" if data_dir else Path(tmp.name) / "models")
    folder = model_folder(args.model, store)
    messages = load_messages(args.data, args.n)

    def prompts_of(loaded: LoadedModel) -> list[str]:
        return [example_prompt(loaded.tokenizer, DEFAULT_INSTRUCTION, m) for m in messages]

    print(f"model {folder}; {args.n} requests, greedy, max_new_tokens {args.max_new_tokens}; "
          f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}")
    fp32 = run_all(folder, torch.float32, prompts_of, args)
    report("float32", fp32)
    if args.bf16:
        bf16 = run_all(folder, torch.bfloat16, prompts_of, args)
        report("bfloat16", bf16, reference=fp32[0].texts)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
