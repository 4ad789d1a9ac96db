"""Fine-tuning: the training run (no Celery, no database).

``run_training`` turns rows of (instruction, input, output) into a fine-tuned model folder:
the step loop with gradient accumulation, evaluation, early stopping, checkpoints (atomic, last
+ best) from which a killed job resumes, cancellation at every step, and the final model.

A plain loop rather than ``transformers.Trainer``: the Trainer computes full-vocabulary logits
at every position, and its callbacks make cancel/resume/keep-best-on-cancel awkward.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import get_linear_schedule_with_warmup

from csra.jobctx import JobCancelled, JobContext, JobError
from csra.specs import TrainSpec
from ml.cpu_share import CpuYielder, yield_inside_steps
from ml.device import pick_device
from ml.sampling import composition, stratified_sample
from ml.training.checkpoints import (
    checkpoint_steps,
    disk_full,
    load_trainable_state,
    replace_dir,
    save_model_atomic,
    trainable_state,
)
from ml.training.data import Batch, ExampleEncoder, collate, length_grouped_batches
from ml.training.loss import LossFn
from ml.training.setup import (
    apply_lora,
    autocast_for,
    resolve_precision,
    rng_state,
    seed_everything,
    set_rng_state,
    validate_inputs,
)
from models_store.loading import LoadedModel, load_model_and_tokenizer

logger = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0  # transformers.Trainer's default
# rows -> each row's exemplars (the approved answers to its nearest training messages, never its own)
Grounder = Callable[[Sequence[dict[str, Any]]], list[list[str]]]


def _with_exemplars(rows: Sequence[dict[str, Any]], ground: Grounder) -> list[dict[str, Any]]:
    return [{**row, "exemplars": found} for row, found in zip(rows, ground(rows), strict=True)]


@dataclass
class TrainState:
    """Everything besides weights/optimizer/scheduler that a resumed run needs."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    last_train_loss: float | None = None
    final_val_loss: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Window:
    """Losses and tokens since the last log line."""

    loss_sum: float = 0.0
    steps: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, tokens: int) -> None:
        self.loss_sum, self.steps, self.tokens = self.loss_sum + loss, self.steps + 1, self.tokens + tokens


class TrainingRun:
    """One fine-tuning run: data plan, optimizer, the step loop, eval, checkpoints."""

    def __init__(self, spec: TrainSpec, loaded: LoadedModel, train_rows: Sequence[dict],
                 val_rows: Sequence[dict], out_dir: Path, ctx: JobContext,
                 yield_cpu: CpuYielder | None = None, ground: Grounder | None = None,
                 device: torch.device | None = None, checkpoint_seconds: float | None = None) -> None:
        self.ground = ground
        self.checkpoint_seconds = checkpoint_seconds  # also checkpoint on time, between evaluations (None: never)
        self.spec, self.ctx, self.arch = spec, ctx, loaded.arch
        self.out_dir, self.ckpt_root = out_dir, out_dir / "checkpoints"
        self.tokenizer = loaded.tokenizer
        self.device = device or pick_device()  # CSRA_DEVICE: auto = CUDA when a GPU is present
        self.precision = resolve_precision(spec.precision, self.device)
        self.autocast = autocast_for(self.precision, self.device)
        self.yield_cpu = yield_cpu
        self.model = self._prepare_model(loaded.model)
        if yield_cpu is not None:  # chat first: pause inside steps too (a step takes seconds)
            yield_inside_steps(self.model, yield_cpu)
        self.loss_fn = LossFn(self.model, self.arch)
        self._encode(train_rows, val_rows)
        self.optimizer, self.scheduler = self._optimizer()
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.state = TrainState()
        self.resumed_from_step = 0
        self.stopped_early = False
        self._epoch_cache: dict[int, list[list[int]]] = {}
        self._started, self._start_step, self._run_tokens = time.perf_counter(), 0, 0
        self._last_checkpoint = time.perf_counter()
        self.optimizer_seconds = 0.0

    # ----------------------------------------------------------------- setup

    def _prepare_model(self, model: Any) -> Any:
        seed_everything(self.spec.seed)
        if self.spec.method == "lora":
            model = apply_lora(model, self.spec, self.arch)
        model.to(self.device)
        model.train()
        return model

    def _encode(self, train_rows: Sequence[dict], val_rows: Sequence[dict]) -> None:
        spec = self.spec
        encoder = ExampleEncoder(self.tokenizer, self.arch, spec.max_input_length, spec.max_target_length,
                                 spec.grounding)
        self.pad_id = self.tokenizer.pad_token_id
        # Drawn, never sliced: a split stored in intent order would otherwise lose whole intents.
        self.train_rows = stratified_sample(train_rows, spec.max_train_samples, spec.seed)
        self.val_rows = stratified_sample(val_rows, spec.max_eval_samples, spec.seed)
        if spec.grounding is not None:  # the exemplars of the rows actually drawn
            if self.ground is None:
                raise JobError("a grounded run needs the answer memory of its train split")
            self.train_rows = _with_exemplars(self.train_rows, self.ground)
            self.val_rows = _with_exemplars(self.val_rows, self.ground)
        self.train = encoder.encode_all(self.train_rows)
        val = encoder.encode_all(self.val_rows)
        val.sort(key=lambda e: e.length)  # eval order does not matter: pad as little as possible
        self.val_batches = [collate(val[i: i + spec.batch_size], self.arch, self.pad_id)
                            for i in range(0, len(val), spec.batch_size)]
        n_batches = math.ceil(len(self.train) / spec.batch_size)
        self.steps_per_epoch = math.ceil(n_batches / spec.gradient_accumulation)
        self.total_steps = math.ceil(spec.epochs * self.steps_per_epoch)

    def _optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        # No weight decay on biases and norm weights (1-D), as transformers.Trainer does.
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": self.spec.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        fused = self.device.type in ("cpu", "cuda")
        optimizer = torch.optim.AdamW(groups, lr=self.spec.learning_rate, fused=fused)
        warmup = math.ceil(self.spec.warmup_ratio * self.total_steps)
        return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, self.total_steps)

    # ----------------------------------------------------------------- data plan

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches (example indices): deterministic from seed and epoch, so resumable."""
        if epoch not in self._epoch_cache:
            lengths = [e.length for e in self.train]
            self._epoch_cache = {epoch: length_grouped_batches(lengths, self.spec.batch_size,
                                                               self.spec.seed + epoch)}
        return self._epoch_cache[epoch]

    def step_batches(self, step: int) -> list[Batch]:
        """The micro-batches accumulated into optimizer step ``step`` (0-based)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        ga = self.spec.gradient_accumulation
        chunks = self.epoch_batches(epoch)[index * ga: (index + 1) * ga]
        return [collate([self.train[i] for i in c], self.arch, self.pad_id) for c in chunks]

    # ----------------------------------------------------------------- one step

    def train_step(self, batches: list[Batch]) -> tuple[float, int]:
        """Forward/backward over the micro-batches, then one optimizer step; (mean loss, real tokens)."""
        n_targets = max(sum(b.n_targets for b in batches), 1)
        loss_total = 0.0
        for batch in batches:
            with self.autocast():
                loss = self.loss_fn(batch.to(self.device)) / n_targets
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_total += loss.item()
        started = time.perf_counter()
        self._optimizer_step()
        self.optimizer_seconds = time.perf_counter() - started  # calibrations time it apart from the tokens
        return loss_total, sum(b.real_tokens for b in batches)

    def _optimizer_step(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per reply token over the validation batches (None without validation rows)."""
        if not self.val_batches:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for batch in self.val_batches:
            with self.autocast():
                total += self.loss_fn(batch.to(self.device)).item()
            count += batch.n_targets
        self.model.train()
        return total / max(count, 1)

    # ----------------------------------------------------------------- loop

    def run(self) -> None:
        """Train from ``state.step`` to the end (or early stop); cancellation is checked every step."""
        self._maybe_resume()
        self._started = time.perf_counter()
        self._start_step = self.state.step
        self._run_tokens = 0
        window = _Window()
        while self.state.step < self.total_steps and not self.stopped_early:
            self.ctx.check_cancelled()
            if self.yield_cpu is not None:
                self.yield_cpu()
            loss, tokens = self.train_step(self.step_batches(self.state.step))
            self.state.step += 1
            self.state.tokens_seen += tokens
            self._run_tokens += tokens
            self.state.last_train_loss = loss
            window.add(loss, tokens)
            if self.state.step % self.spec.logging_steps == 0 or self.state.step == self.total_steps:
                self._log(window)
                window = _Window()
            if self._eval_due():
                self._eval_and_checkpoint()
            elif self._checkpoint_due():
                self.save_checkpoint()
                self.ctx.event("log", f"checkpoint at step {self.state.step} (every {self.checkpoint_seconds:g} s "
                                      "between evaluations)", step=self.state.step)
        if self.val_batches and self.state.final_val_loss is None:
            self._eval_and_checkpoint()  # e.g. resumed at the very end: make sure there is a final eval

    def _log(self, window: _Window) -> None:
        step, total = self.state.step, self.total_steps
        loss = window.loss_sum / window.steps
        tps = window.tokens / max(time.perf_counter() - window.started, 1e-9)
        lr = self.scheduler.get_last_lr()[0]
        self.state.history.append({"step": step, "loss": loss})
        self.ctx.event("metric", step=step, epoch=round(step / self.steps_per_epoch, 4), loss=loss,
                       learning_rate=lr, tokens_per_second=tps)
        done = step - self._start_step
        eta = (time.perf_counter() - self._started) / done * (total - step) if done else None
        self.ctx.progress(step / total, f"training: step {step}/{total}, loss {loss:.4f}", eta)

    def _eval_due(self) -> bool:
        step, every = self.state.step, self.spec.eval_every
        if step == self.total_steps:
            return True
        return step % (self.steps_per_epoch if every == "epoch" else int(every)) == 0

    def _checkpoint_due(self) -> bool:
        limit = self.checkpoint_seconds
        return limit is not None and time.perf_counter() - self._last_checkpoint >= limit

    def _eval_and_checkpoint(self) -> None:
        val = self.evaluate()
        state = self.state
        if val is not None:
            state.final_val_loss = val
            state.history.append({"step": state.step, "eval_loss": val})
            self.ctx.event("metric", step=state.step, eval_loss=val)
            if state.best_val_loss is None or val < state.best_val_loss:
                state.best_val_loss, state.best_step, state.evals_without_improvement = val, state.step, 0
            else:
                state.evals_without_improvement += 1
        self.save_checkpoint()
        patience = self.spec.early_stopping_patience
        if patience is not None and state.evals_without_improvement >= patience:
            self.stopped_early = True
            self.ctx.event("log", f"early stopping at step {state.step}: no improvement in {patience} evaluations")

    # ----------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """``checkpoints/step-N``: weights, optimizer, scheduler, RNG and TrainState; keeps last + best."""
        step = self.state.step
        final = self.ckpt_root / f"step-{step}"
        tmp = self.ckpt_root / f".step-{step}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            save_file(trainable_state(self.model), str(tmp / "weights.safetensors"))
            torch.save(self._state_dict(), tmp / "state.pt")
            replace_dir(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise (disk_full(exc, final) or exc) from exc
        self._prune_checkpoints()
        self._last_checkpoint = time.perf_counter()
        return final

    def _state_dict(self) -> dict[str, Any]:
        return {"trainer": vars(self.state).copy(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def _prune_checkpoints(self) -> None:
        keep = {self.state.step, self.state.best_step}
        for step in checkpoint_steps(self.ckpt_root):
            if step not in keep:
                shutil.rmtree(self.ckpt_root / f"step-{step}", ignore_errors=True)

    def _remove_stale_temp(self) -> None:
        """Temporary folders a killed attempt left behind (never complete, never used)."""
        for stale in [*self.ckpt_root.glob(".step-*.tmp-*"), *self.out_dir.glob(".model.tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True)

    def _maybe_resume(self) -> None:
        self._remove_stale_temp()
        steps = checkpoint_steps(self.ckpt_root)
        if not steps:
            return
        folder = self.ckpt_root / f"step-{steps[-1]}"
        load_trainable_state(self.model, folder)
        saved = torch.load(folder / "state.pt", weights_only=False)  # our own file: optimizer + RNG state
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
        self.state = TrainState(**saved["trainer"])
        self.resumed_from_step = self.state.step
        logger.info("resuming %s from step %d", self.out_dir, self.state.step)
        self.ctx.event("log", f"resumed from step {self.state.step}", step=self.state.step)

    def best_checkpoint(self) -> int | None:
        """Step of the checkpoint with the best val loss (the last one without validation rows)."""
        steps = checkpoint_steps(self.ckpt_root)
        step = self.state.best_step if self.val_batches else (steps[-1] if steps else None)
        return step if step in steps else None

    # ----------------------------------------------------------------- result

    def finish(self, cancelled: bool = False) -> dict[str, Any]:
        """Write the final model (best by val loss, else last) and return the result dict."""
        best = self.best_checkpoint()
        # Cancellation is checked before a step starts, so the weights in memory are those of state.step.
        if best is not None and best != self.state.step:
            load_trainable_state(self.model, self.ckpt_root / f"step-{best}")
        model_dir = save_model_atomic(self.model, self.tokenizer, self.out_dir / "model")
        logger.info("saved the %s model (step %s of %d) to %s", "best" if best else "last", best or self.state.step,
                    self.state.step, model_dir)
        return self._result(model_dir, cancelled)

    def _result(self, model_dir: Path, cancelled: bool) -> dict[str, Any]:
        st = self.state
        wall = time.perf_counter() - self._started
        return {
            "model_dir": str(model_dir), "best_val_loss": st.best_val_loss, "final_val_loss": st.final_val_loss,
            "final_train_loss": st.last_train_loss, "steps": st.step,
            "epochs": round(st.step / self.steps_per_epoch, 4), "tokens_seen": st.tokens_seen,
            "wall_seconds": wall, "tokens_per_second": self._run_tokens / wall if wall > 0 else 0.0,
            "precision": self.precision, "device": self.device.type, "resumed_from_step": self.resumed_from_step,
            "best_step": st.best_step, "early_stopped": self.stopped_early, "cancelled": cancelled,
            "train_rows": len(self.train_rows), "train_intents": len(composition(self.train_rows)),
            "yielded_to_chat_seconds": round(self.yield_cpu.waited, 1) if self.yield_cpu else 0.0,
            "history": st.history,
        }




def _load_base(model_source: str | Path, spec: TrainSpec, train_rows: Sequence[dict]) -> LoadedModel:
    loaded = load_model_and_tokenizer(model_source, dtype=torch.float32, for_training=True)
    validate_inputs(spec, train_rows, loaded.model.config)
    return loaded


def run_training(
    spec: TrainSpec,
    train_rows: list[dict],
    val_rows: list[dict],
    model_source: str | Path,
    out_dir: Path,
    ctx: JobContext,
    num_threads: int | None = None,
    yield_cpu: CpuYielder | None = None,
    ground: Grounder | None = None,
    checkpoint_seconds: float | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model_source`` (a resolved folder or HF id) on ``train_rows``; see the module docs.

    Resumes from ``out_dir/checkpoints`` when a previous attempt left checkpoints there. Writes
    the final model to ``out_dir/model``. ``num_threads`` sets torch's intra-op threads for the
    duration of the run only. ``yield_cpu`` (``ml.cpu_share``) pauses the run while chats are
    answered on this machine. ``checkpoint_seconds``: also checkpoint when that long has passed
    since the last checkpoint (evaluations checkpoint too), so a killed run loses at most that much.
    """
    if not train_rows:
        raise JobError("the dataset has no training rows: import a dataset with a non-empty train split")
    out_dir = Path(out_dir)
    previous_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        run = TrainingRun(spec, _load_base(model_source, spec, train_rows), train_rows, val_rows, out_dir, ctx,
                          yield_cpu, ground, checkpoint_seconds=checkpoint_seconds)
        drawn, split = composition(run.train_rows), composition(train_rows)
        ctx.event("log", f"training {run.total_steps} steps ({run.steps_per_epoch}/epoch) on {run.device}, "
                         f"precision {run.precision}, {len(run.train)} examples drawn from {len(train_rows)}, covering "
                         f"{len(drawn)} of the split's {len(split)} intents", per_intent=drawn)
        try:
            run.run()
        except JobCancelled:
            if spec.keep_best_on_cancel and run.best_checkpoint() is not None:
                ctx.event("log", "cancelled: keeping the best checkpoint so far")
                return run.finish(cancelled=True)
            raise
        return run.finish()
    finally:
        if num_threads:
            torch.set_num_threads(previous_threads)
