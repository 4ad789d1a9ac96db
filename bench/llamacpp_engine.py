"""csra's llama.cpp engine (continuous batching over one llama context) against csra's torch engine.

    python bench/llamacpp_engine.py [--n 16 --seed 0 --max-new-tokens 64 --alone 5 --threads N
                                     --store DIR --out DIR --data CSV]

The baseline (SmolLM2-135M-Instruct, ``models_store.loading.ensure_baseline``) is exported at f16
(``ml.export.export_gguf``). ``--n`` Bitext messages drawn with ``--seed`` are rendered as an
evaluation prompt (``ml.prompting.example_prompt``) and tokenized by csra. Each engine, on the same
threads and prompts, greedy, ``--max-new-tokens`` at most:

* alone: ``--alone`` requests one after the other (p50 latency of one reply);
* concurrent: all ``--n`` submitted at once (wall time, aggregate generated tokens/s, p50 latency),
  the torch ``BatchingEngine`` at ``max_batch_size=16`` and ``LlamaCppEngine`` with 16 sequences,
  with its prefix cache (prompt starts computed once) and without (every prompt in full).

Also printed: how many llama.cpp replies are the same alone and batched (token ids), and the same as
torch's. The engines run one after the other; the load average is printed (numbers from a busy
machine mean little).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.gguf_agreement import BITEXT, draw_messages  # noqa: E402
from csra.specs import DEFAULT_INSTRUCTION  # noqa: E402
from ml.export import export_gguf  # noqa: E402
from ml.inference.cache import ModelCache  # noqa: E402
from ml.inference.engine import BatchingEngine  # noqa: E402
from ml.inference.invariance import cpu_description  # noqa: E402
from ml.inference.llamacpp import LlamaCppEngine, ReplyDecoder  # noqa: E402
from ml.inference.tokens import encode_prompt  # noqa: E402
from ml.inference.types import GenerationRequest, GenerationResult  # noqa: E402
from ml.prompting import example_prompt  # noqa: E402
from models_store.loading import LoadedModel, ensure_baseline, load_model_and_tokenizer  # noqa: E402

Submit = Callable[[int], "Future[GenerationResult]"]


def measure(name: str, submit: Submit, n: int, alone: int) -> tuple[list[GenerationResult], list[GenerationResult]]:
    """Alone (one after the other) and concurrent runs of one engine; prints a line for each."""
    submit(0).result()  # warm-up (and, for torch, the load-time self-check)
    singles, single_ms = [], []
    for i in range(alone):
        t0 = time.perf_counter()
        singles.append(submit(i).result())
        single_ms.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    futures = [submit(i) for i in range(n)]
    batched = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    tokens = sum(r.completion_tokens for r in batched)
    print(f"{name:<27} alone: p50 {statistics.median(single_ms):7.0f} ms/reply "
          f"({sum(r.completion_tokens for r in singles) / (sum(single_ms) / 1000):5.1f} tok/s) | "
          f"{n} concurrent: {wall:6.2f} s, {tokens / wall:6.1f} tok/s aggregate, "
          f"p50 latency {statistics.median(r.latency_ms for r in batched):7.0f} ms, "
          f"largest batch {max(r.batch_size for r in batched)}")
    return singles, batched


def parse_args(description: str | None = __doc__) -> argparse.Namespace:
    """This benchmark's options (``bench/omp_pools.py`` takes the same, with its own description)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="concurrent requests (and messages drawn)")
    p.add_argument("--alone", type=int, default=5, help="requests timed one at a time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--store", type=Path, default=None, help="model store for the baseline (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="where the GGUF goes (default: a temp dir)")
    p.add_argument("--data", type=Path, default=BITEXT)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="csra-bench-llamacpp-") as scratch:
        store = args.store or Path(scratch) / "store"
        out_dir = args.out or Path(scratch) / "gguf"
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"CPU: {cpu_description()}; {platform.platform()}; load average {os.getloadavg()}")
        print(f"llama-cpp-python {version('llama-cpp-python')}, torch {torch.__version__}, {args.threads} threads")
        folder = ensure_baseline(store)
        gguf = out_dir / "smollm2-135m-instruct-f16.gguf"
        if not gguf.is_file():
            export_gguf(folder, gguf, "f16")
        loaded: LoadedModel = load_model_and_tokenizer(folder)
        prompts = [example_prompt(loaded.tokenizer, DEFAULT_INSTRUCTION, m)
                   for m in draw_messages(args.data, args.n, args.seed)]
        ids = [encode_prompt(loaded, p) for p in prompts]
        decoder = ReplyDecoder.from_loaded(loaded)
        print(f"{args.n} Bitext messages (seed {args.seed}), prompts of {min(map(len, ids))}-{max(map(len, ids))} "
              f"tokens, greedy, {args.max_new_tokens} new tokens at most")

        common = next((i for i in range(min(map(len, ids))) if len({p[i] for p in ids}) > 1), min(map(len, ids)))
        print(f"the prompts' common start: {common} tokens")
        for cache in (False, True):
            with LlamaCppEngine(n_threads=args.threads, max_batch_size=16, prefix_cache=cache) as engine:
                def llama_submit(i: int, engine: LlamaCppEngine = engine) -> Future[GenerationResult]:
                    request = GenerationRequest(prompts[i], max_new_tokens=args.max_new_tokens)
                    return engine.submit(gguf, ids[i], request, decoder)

                name = "llama.cpp" if cache else "llama.cpp, no prefix cache"
                l_alone, l_batched = measure(name, llama_submit, args.n, args.alone)
                stats = engine.stats()
                print(f"{'':<12} prompt tokens computed: {stats['prompt_tokens_computed']} of "
                      f"{stats['prompt_tokens']} (the others' cells shared)")
        with BatchingEngine(cache=ModelCache(), max_batch_size=16) as torch_engine:
            def torch_submit(i: int) -> Future[GenerationResult]:
                request = GenerationRequest(prompts[i], max_new_tokens=args.max_new_tokens)
                return torch_engine.submit("baseline", lambda: loaded, request)

            _, t_batched = measure("torch", torch_submit, args.n, args.alone)
        same_alone = sum(a.token_ids == b.token_ids for a, b in zip(l_alone, l_batched, strict=False))
        same_torch = sum(a.token_ids == b.token_ids for a, b in zip(l_batched, t_batched, strict=True))
        print(f"llama.cpp batched == alone (token ids): {same_alone}/{len(l_alone)}; "
              f"llama.cpp batched == torch batched: {same_torch}/{args.n}; load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
