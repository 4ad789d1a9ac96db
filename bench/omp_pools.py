"""torch and llama.cpp in one process: how each engine decodes while the other's thread lives, and after it ended.

    python bench/omp_pools.py [--alone 5 --n 16 --seed 0 --max-new-tokens 64 --threads N
                               --store DIR --out DIR --data CSV]

torch and llama.cpp (ggml) share one OpenMP runtime (libgomp) in a generate worker. libgomp keeps a
team of threads for every thread that ran a parallel region while that thread lives, and with more
OpenMP threads than CPUs it stops spin-waiting at barriers (``ml.inference.owner_thread``). Both
engines' threads therefore end after ``idle_exit_seconds`` without work. Side by side in one run, on
the same prompts (Bitext messages drawn with ``--seed``, greedy, SmolLM2-135M-Instruct, llama.cpp at
f16):

* llama.cpp before torch ran in this process;
* llama.cpp after one torch request, torch's engine thread kept alive (what csra did before);
* llama.cpp after one torch request, torch's engine thread ended (csra now);
* torch with llama.cpp's engine thread kept alive, and after it ended.

Each line: p50 of ``--alone`` replies one at a time, then ``--n`` at once (aggregate tokens/s), and the
process's thread count.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.gguf_agreement import draw_messages  # noqa: E402
from bench.llamacpp_engine import parse_args  # noqa: E402
from csra.specs import DEFAULT_INSTRUCTION  # noqa: E402
from ml.export import export_gguf  # noqa: E402
from ml.inference.cache import ModelCache  # noqa: E402
from ml.inference.engine import BatchingEngine  # noqa: E402
from ml.inference.invariance import cpu_description  # noqa: E402
from ml.inference.llamacpp import LlamaCppEngine, ReplyDecoder  # noqa: E402
from ml.inference.owner_thread import IDLE_EXIT_SECONDS  # noqa: E402
from ml.inference.tokens import encode_prompt  # noqa: E402
from ml.inference.types import GenerationRequest, GenerationResult  # noqa: E402
from ml.prompting import example_prompt  # noqa: E402
from models_store.loading import LoadedModel, ensure_baseline, load_model_and_tokenizer  # noqa: E402

FOREVER = 1e9


def threads_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return -1


def measure(label: str, submit: object, n: int, alone: int) -> None:
    call = submit  # Callable[[int], Future[GenerationResult]]
    times = []
    for i in range(alone):
        t0 = time.perf_counter()
        call(i).result()  # type: ignore[operator]
        times.append((time.perf_counter() - t0) * 1000)
    threads = threads_now()
    t0 = time.perf_counter()
    futures: list[Future[GenerationResult]] = [call(i) for i in range(n)]  # type: ignore[operator]
    tokens = sum(f.result().completion_tokens for f in futures)
    wall = time.perf_counter() - t0
    print(f"{label:<58} alone p50 {statistics.median(times):6.0f} ms | {n} at once {tokens / wall:6.1f} tok/s "
          f"| {threads} threads", flush=True)


def settle(engine: object) -> None:
    """Wait until the engine's thread has ended."""
    while engine._thread.alive:  # type: ignore[attr-defined]
        time.sleep(0.05)


@dataclass
class Bench:
    args: argparse.Namespace
    gguf: Path
    loaded: LoadedModel
    prompts: list[str]
    ids: list[list[int]]
    decoder: ReplyDecoder

    def request(self, i: int) -> GenerationRequest:
        return GenerationRequest(self.prompts[i], max_new_tokens=self.args.max_new_tokens)

    def torch_engine(self, idle_exit_seconds: float) -> BatchingEngine:
        return BatchingEngine(cache=ModelCache(), max_batch_size=16, idle_exit_seconds=idle_exit_seconds).start()

    def llama_engine(self, idle_exit_seconds: float) -> LlamaCppEngine:
        return LlamaCppEngine(n_threads=self.args.threads, max_batch_size=16,
                              idle_exit_seconds=idle_exit_seconds).start()

    def llama_beside_torch(self) -> None:
        a = self.args
        llama, kept, ending = self.llama_engine(IDLE_EXIT_SECONDS), self.torch_engine(FOREVER), \
            self.torch_engine(IDLE_EXIT_SECONDS)

        def llama_submit(i: int) -> Future[GenerationResult]:
            return llama.submit(self.gguf, self.ids[i], self.request(i), self.decoder)

        llama.load(self.gguf)
        settle(llama)
        measure("llama.cpp, torch not run yet", llama_submit, a.n, a.alone)
        kept.submit("baseline", lambda: self.loaded, self.request(0)).result()
        settle(llama)
        measure("llama.cpp, torch's engine thread alive (before)", llama_submit, a.n, a.alone)
        kept.stop()
        ending.submit("baseline", lambda: self.loaded, self.request(0)).result()
        settle(ending)
        settle(llama)
        measure("llama.cpp, torch's engine thread ended when idle (now)", llama_submit, a.n, a.alone)
        llama.stop()
        ending.stop()

    def torch_beside_llama(self) -> None:
        a = self.args
        torch_engine = self.torch_engine(IDLE_EXIT_SECONDS)

        def torch_submit(i: int) -> Future[GenerationResult]:
            return torch_engine.submit("baseline", lambda: self.loaded, self.request(i))

        for idle_exit, label in ((FOREVER, "alive (before)"), (IDLE_EXIT_SECONDS, "ended when idle (now)")):
            llama = self.llama_engine(idle_exit)
            llama.submit(self.gguf, self.ids[0], self.request(0), self.decoder).result()
            settle(torch_engine)
            if idle_exit != FOREVER:
                settle(llama)
            measure(f"torch, llama.cpp's engine thread {label}", torch_submit, a.n, a.alone)
            llama.stop()
        torch_engine.stop()


def prepare(args: argparse.Namespace, scratch: Path) -> Bench:
    """The baseline, its f16 GGUF, the prompts; loaded on a thread that ends (the torch ops of loading
    would leave the main thread an OpenMP team)."""
    store = args.store or scratch / "store"
    out_dir = args.out or scratch / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf = out_dir / "smollm2-135m-instruct-f16.gguf"

    def load() -> LoadedModel:
        folder = ensure_baseline(store)
        if not gguf.is_file():
            export_gguf(folder, gguf, "f16")
        return load_model_and_tokenizer(folder)

    with ThreadPoolExecutor(1) as once:
        loaded = once.submit(load).result()
    prompts = [example_prompt(loaded.tokenizer, DEFAULT_INSTRUCTION, m)
               for m in draw_messages(args.data, args.n, args.seed)]
    return Bench(args, gguf, loaded, prompts, [encode_prompt(loaded, p) for p in prompts],
                 ReplyDecoder.from_loaded(loaded))


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_description()}; {platform.platform()}; load average {os.getloadavg()}")
    print(f"llama-cpp-python {version('llama-cpp-python')}, torch {torch.__version__}, {args.threads} threads")
    with tempfile.TemporaryDirectory(prefix="csra-bench-omp-") as scratch:
        bench = prepare(args, Path(scratch))
        print(f"{args.n} Bitext messages (seed {args.seed}), greedy, {args.max_new_tokens} new tokens at most")
        bench.llama_beside_torch()
        bench.torch_beside_llama()
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
