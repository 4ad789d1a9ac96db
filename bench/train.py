"""Training throughput: the original design's loop vs csra's, same model, rows and steps, one run.

    python bench/train.py [--rows 64 --steps 8 --model baseline|tiny --data PATH]

(a) reference: every example padded to 192 tokens, full-vocabulary logits + the model's own
    loss, fp32, examples in random order.
(b) csra: ``ml.training.run.TrainingRun`` (length-grouped dynamic padding, lm_head + loss only
    at reply positions, bf16 autocast where "auto" picks it), and the same loop in fp32.
Prints real (non-padding) and padded tokens/s, losses, matmul peak, MFU and peak RSS.

    python bench/train.py --grounded [--rows 64 --steps 8]

(c) grounded vs ungrounded: csra's loop at the production prompt lengths (TrainSpec defaults), once
    on plain prompts and once on grounded ones (``Grounding()`` defaults: each example shown the
    approved answers to its nearest messages, found with the answer memory's own embedder and
    index among 3,000 other rows, never its own group). Prints the wall-time ratio per epoch
    (same rows, same steps); the goal is at most 2x.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import get_linear_schedule_with_warmup  # noqa: E402

from csra.jobctx import LocalContext  # noqa: E402
from csra.specs import DEFAULT_INSTRUCTION, Grounding, TrainSpec  # noqa: E402
from ml.device import cpu_supports_bf16  # noqa: E402
from ml.training.data import IGNORE, ExampleEncoder, collate  # noqa: E402
from ml.training.loss import LossFn  # noqa: E402
from ml.training.run import Grounder, TrainingRun, _with_exemplars  # noqa: E402
from models_store.loading import (  # noqa: E402
    build_tiny_causal,
    ensure_baseline,
    load_model_and_tokenizer,
)

REF_LENGTH = 192
MAX_INPUT, MAX_TARGET = 64, 128  # prompt + reply <= 192, so both loops train on the same tokens


# --------------------------------------------------------------------------- measurement helpers


class PeakRSS:
    """Peak resident memory of this process during a block (sampled every 20 ms)."""

    def __enter__(self) -> PeakRSS:
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.02)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 6) -> float:
    """Measured matmul throughput: the machine's practical peak for this dtype."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    start = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


@dataclass
class Result:
    name: str
    precision: str
    real_tokens: int
    padded_tokens: int
    seconds: float
    first_loss: float
    last_loss: float
    val_loss: float
    peak_rss: int

    @property
    def real_tps(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def padded_tps(self) -> float:
        return self.padded_tokens / self.seconds


# --------------------------------------------------------------------------- data and model


def load_rows(path: Path, n: int, seed: int = 0) -> list[dict[str, str]]:
    df = pd.read_csv(path).sample(n=n, random_state=seed)
    return [{"instruction": DEFAULT_INSTRUCTION, "input": r.instruction, "output": r.response,
             "intent": r.intent, "category": r.category} for r in df.itertuples()]


def model_folder(kind: str, store: Path) -> Path:
    if kind == "tiny":
        return build_tiny_causal(store / "tiny")
    started = time.perf_counter()
    folder = ensure_baseline(store)
    print(f"baseline model: {folder} (ready in {time.perf_counter() - started:.1f} s)")
    return folder


def val_loss(model: Any, batches: list, arch: str = "causal") -> float:
    """fp32 mean loss per reply token, the same measure for every loop."""
    loss_fn, total, count = LossFn(model, arch), 0.0, 0
    model.eval()
    with torch.no_grad():
        for b in batches:
            total += loss_fn(b).item()
            count += b.n_targets
    model.train()
    return total / count


# --------------------------------------------------------------------------- (a) reference


def reference_batch(examples: list, pad_id: int) -> dict[str, torch.Tensor]:
    """The original design: pad (right) every example to REF_LENGTH."""
    ids = torch.full((len(examples), REF_LENGTH), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run_reference(folder: Path, rows: list, val_rows: list, args: argparse.Namespace) -> Result:
    torch.manual_seed(0)
    lm = load_model_and_tokenizer(folder, for_training=True)
    model, tok = lm.model, lm.tokenizer
    encoder = ExampleEncoder(tok, "causal", MAX_INPUT, MAX_TARGET)
    examples = encoder.encode_all(rows)
    order = torch.randperm(len(examples)).tolist()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sched = get_linear_schedule_with_warmup(opt, 0, args.steps)
    losses, real, padded = [], 0, 0
    with PeakRSS() as rss:
        start = time.perf_counter()
        for step in range(args.steps):
            idx = [order[(step * args.batch_size + j) % len(order)] for j in range(args.batch_size)]
            batch = reference_batch([examples[i] for i in idx], tok.pad_token_id)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            real += int(batch["attention_mask"].sum())
            padded += batch["input_ids"].numel()
            print(f"  reference step {step + 1}/{args.steps}: loss {losses[-1]:.4f}", flush=True)
        seconds = time.perf_counter() - start
    val = val_loss(model, val_batches(encoder, val_rows, tok.pad_token_id))
    return Result("reference", "fp32", real, padded, seconds, losses[0], losses[-1], val, rss.peak)


# --------------------------------------------------------------------------- (b) csra


def val_batches(encoder: ExampleEncoder, rows: list, pad_id: int, bs: int = 8) -> list:
    ex = sorted(encoder.encode_all(rows), key=lambda e: e.length)
    return [collate(ex[i: i + bs], "causal", pad_id) for i in range(0, len(ex), bs)]


def run_csra(folder: Path, rows: list, val_rows: list, args: argparse.Namespace, precision: str,
             lengths: dict[str, int] | None = None, grounding: Grounding | None = None,
             ground: Grounder | None = None, name: str | None = None) -> Result:
    sizes = {"max_input_length": MAX_INPUT, "max_target_length": MAX_TARGET} if lengths is None else lengths
    spec = TrainSpec(dataset_id=0, epochs=max(1, math.ceil(args.steps * args.batch_size / len(rows))),
                     learning_rate=args.lr, batch_size=args.batch_size, precision=precision, seed=0,
                     grounding=grounding, **sizes)
    lm = load_model_and_tokenizer(folder, for_training=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = TrainingRun(spec, lm, rows, [], Path(tmp), LocalContext(work_dir=Path(tmp)), ground=ground)
    losses, real, padded = [], 0, 0
    with PeakRSS() as rss:
        start = time.perf_counter()
        for step in range(args.steps):
            batches = run.step_batches(step)
            loss, tokens = run.train_step(batches)
            losses.append(loss)
            real += tokens
            padded += sum(b.input_ids.numel() for b in batches)
            print(f"  csra-{run.precision} step {step + 1}/{args.steps}: loss {loss:.4f}", flush=True)
        seconds = time.perf_counter() - start
    encoder = ExampleEncoder(lm.tokenizer, "causal", spec.max_input_length, spec.max_target_length, grounding)
    val = val_loss(run.model, val_batches(encoder, _with_exemplars(val_rows, ground) if ground else val_rows,
                                          lm.tokenizer.pad_token_id))
    return Result(name or f"csra ({spec.precision})", run.precision, real, padded, seconds, losses[0], losses[-1],
                  val, rss.peak)


def memory_grounder(pool: list[dict[str, str]]) -> Grounder:
    """Exemplars as training finds them: the memory's embedder and index over ``pool``, never a row's own group."""
    from csra.memory import group_keys
    from ml.memory.embedder import Embedder
    from ml.memory.export import export_embedder
    from ml.memory.memory import AnswerMemory, Entry
    from ml.metrics import embedding_model_dir

    embedder = Embedder(export_embedder(embedding_model_dir(), Path(tempfile.mkdtemp()) / "embedder"))
    keys = group_keys([r["input"] for r in pool])
    memory = AnswerMemory(exact=True)
    entries = [Entry(i, r["input"], r["output"], r["intent"], group=k)
               for i, (r, k) in enumerate(zip(pool, keys, strict=True))]
    memory.add(entries, embedder.embed([r["input"] for r in pool]), embedder.embed_replies([r["output"] for r in pool]))

    def ground(rows: Any) -> list[list[str]]:
        own = group_keys([r["input"] for r in rows])
        vectors = embedder.embed([r["input"] for r in rows])
        hits = [memory.similar(v, 8, exclude_group=k) for v, k in zip(vectors, own, strict=True)]
        return [[h.entry.reply for h in found] for found in hits]

    return ground


def grounded_pair(folder: Path, train: list, val: list, args: argparse.Namespace) -> None:
    """(c): the same rows and steps, plain prompts then grounded ones, at production prompt lengths."""
    pool = load_rows(args.data, 3000, seed=1)
    defaults = TrainSpec(dataset_id=0)
    plain = {"max_input_length": defaults.max_input_length, "max_target_length": defaults.max_target_length}
    grounding = Grounding()
    grounded = {**plain, "max_input_length": TrainSpec(dataset_id=0, grounding=grounding).max_input_length}
    results = [run_csra(folder, train, val, args, "auto", plain, name="ungrounded"),
               run_csra(folder, train, val, args, "auto", grounded, grounding, memory_grounder(pool), "grounded")]
    params = load_model_and_tokenizer(folder).model.num_parameters()
    peaks = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    report(results, params, peaks, baseline_name="ungrounded")
    plain_run, grounded_run = results
    print(f"grounding: k={grounding.k} exemplars of <= {grounding.max_exemplar_tokens} tokens, max_input_length "
          f"{grounded['max_input_length']} (ungrounded {plain['max_input_length']})")
    print(f"grounded / ungrounded wall time for the same {args.steps} steps: "
          f"{grounded_run.seconds / plain_run.seconds:.2f}x (goal <= 2x); real tokens "
          f"{grounded_run.real_tokens / plain_run.real_tokens:.2f}x")


# --------------------------------------------------------------------------- report


def report(results: list[Result], params: int, peaks: dict[str, float], baseline_name: str = "reference") -> None:
    print(f"\nmodel parameters: {params / 1e6:.1f} M; matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16']:.0f} GFLOP/s; torch threads {torch.get_num_threads()}")
    head = f"{'loop':<16}{'prec':>6}{'real tok/s':>12}{'padded tok/s':>14}{'loss 1st':>10}{'loss last':>10}"
    print(head + f"{'val loss':>10}{'MFU':>8}{'peak RSS':>10}{'seconds':>9}")
    for r in results:
        mfu = 6 * params * r.real_tps / (peaks[r.precision] * 1e9)
        print(f"{r.name:<16}{r.precision:>6}{r.real_tps:>12.1f}{r.padded_tps:>14.1f}{r.first_loss:>10.4f}"
              f"{r.last_loss:>10.4f}{r.val_loss:>10.4f}{mfu:>8.1%}{r.peak_rss / 2**20:>8.0f}MB{r.seconds:>9.1f}")
    ref = results[0]
    for r in results[1:]:
        print(f"{r.name} / {baseline_name} real tokens/s: {r.real_tps / ref.real_tps:.2f}x")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64, help="training rows (each loop sees steps*batch of them)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-rows", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--model", choices=["baseline", "tiny"], default="baseline")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/data/bitext/bitext_customer_support.csv")
    p.add_argument("--store", type=Path, default=None, help="model store (default: $CSRA_DATA_DIR/models or temp)")
    p.add_argument("--no-fp32", action="store_true", help="skip the csra fp32 run")
    p.add_argument("--grounded", action="store_true", help="(c) only: grounded vs ungrounded wall time")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    data_dir = os.environ.get("CSRA_DATA_DIR")
    tmp = tempfile.TemporaryDirectory()
    store = args.store or (Path(data_dir) / "models" if data_dir else Path(tmp.name) / "models")
    peaks = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    print(f"bf16 instructions: {cpu_supports_bf16()}")
    folder = model_folder(args.model, store)
    rows = load_rows(args.data, args.rows + args.eval_rows)
    train, val = rows[: args.rows], rows[args.rows:]
    if args.grounded:
        grounded_pair(folder, train, val, args)
        tmp.cleanup()
        return
    results = [run_reference(folder, train, val, args), run_csra(folder, train, val, args, "auto")]
    if not args.no_fp32:
        results.append(run_csra(folder, train, val, args, "fp32"))
    params = load_model_and_tokenizer(folder).model.num_parameters()
    report(results, params, peaks)
    print(f"process peak RSS (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    tmp.cleanup()


if __name__ == "__main__":
    main()
