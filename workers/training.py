"""Fine-tuning: the training domain function (no Celery, no database).

``run_training`` turns rows of (instruction, input, output) into a fine-tuned model folder.
Design points (see the issue):

* Prompts come from ``workers.prompting.example_prompt``; the target is the reply plus the
  template's end-of-turn token. Labels are built explicitly so the end token is learned even
  when pad == eos (SmolLM2), and the loss covers reply tokens only.
* Batches are grouped by length and padded dynamically (right padding, never to max length).
* For causal LMs the output layer and the loss run only at reply positions.
* Checkpoints (atomic, last + best) make a killed job resume where it stopped.

A plain loop rather than ``transformers.Trainer``: the Trainer computes full-vocabulary logits
at every position, and its callbacks make cancel/resume/keep-best-on-cancel awkward.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import get_linear_schedule_with_warmup
from transformers.trainer_pt_utils import get_length_grouped_indices

from csra.jobctx import JobCancelled, JobContext, JobError
from csra.specs import TrainSpec
from models_store.loading import LoadedModel, load_model_and_tokenizer
from workers.cpu_share import CpuYielder, yield_inside_steps
from workers.prompting import example_prompt, has_chat_template
from workers.sampling import composition, stratified_sample

logger = logging.getLogger(__name__)

IGNORE = -100
MAX_GRAD_NORM = 1.0  # transformers.Trainer's default
# Measured with bench/train.py (SmolLM2-135M, 64 Bitext rows, 8 steps of 8) on the project's 2-core
# AVX512-BF16 machine: bf16 autocast 254 real tokens/s vs fp32 148, validation loss 1.7470 vs 1.7446;
# so "auto" uses bf16 on CPUs with native bf16 instructions.
CPU_AUTO_BF16 = True


# =========================================================================== examples and batches


@dataclass
class Example:
    """One tokenized training example.

    causal: ``input_ids`` = prompt + reply + end, ``labels`` the same length with IGNORE on the
    prompt. seq2seq: ``input_ids`` = encoder prompt, ``labels`` = reply + eos (decoder targets).
    """

    input_ids: list[int]
    labels: list[int]
    seq2seq: bool = False

    @property
    def length(self) -> int:
        """Tokens the example costs: the sequence (causal) or encoder + decoder (seq2seq)."""
        return len(self.input_ids) + (len(self.labels) if self.seq2seq else 0)


@dataclass
class Batch:
    """A padded batch; for causal LMs also the flat positions where a reply token is predicted."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    target_index: torch.Tensor | None  # causal: flat (b * T + t) indices of hidden states to score
    targets: torch.Tensor  # the token ids to predict, in target_index order (causal) / flat (seq2seq)
    real_tokens: int  # non-padding tokens (encoder + decoder for seq2seq)

    @property
    def n_targets(self) -> int:
        return int(self.targets.numel())

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.attention_mask),
                     move(self.target_index), move(self.targets), self.real_tokens)


def end_token_ids(tokenizer: Any, arch: str) -> list[int]:
    """The token(s) that end a reply: the chat template's end-of-turn (``<|im_end|>``) or eos."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if arch != "causal" or not has_chat_template(tokenizer):
        return eos
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    marker = "\x1fREPLY\x1f"
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": marker}], tokenize=False)
    if not full.startswith(prompt + marker):
        return eos
    end_text = full[len(prompt) + len(marker):].strip()
    return tokenizer(end_text, add_special_tokens=False)["input_ids"] if end_text else eos


class ExampleEncoder:
    """Tokenizes rows into ``Example``s with explicit labels (see the module docstring)."""

    def __init__(self, tokenizer: Any, arch: str, max_input_length: int, max_target_length: int) -> None:
        self.tokenizer, self.arch = tokenizer, arch
        self.max_input, self.max_target = max_input_length, max_target_length
        self.chat = has_chat_template(tokenizer)
        self.end_ids = end_token_ids(tokenizer, arch)

    def _ids(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _reply_ids(self, reply: str) -> list[int]:
        text = reply if (self.chat or self.arch == "seq2seq") else " " + reply  # after "Agent:"
        keep = max(self.max_target - len(self.end_ids), 1)
        return self._ids(text, False)[:keep] + self.end_ids

    def encode(self, row: dict[str, Any]) -> Example:
        prompt = example_prompt(self.tokenizer, row["instruction"], row["input"])
        # Chat templates carry their own special tokens; plain prompts get the tokenizer's (BOS, T5's </s>).
        prompt_ids = self._ids(prompt, special=not self.chat or self.arch == "seq2seq")[-self.max_input:]
        reply_ids = self._reply_ids(str(row["output"]))
        if self.arch == "seq2seq":
            return Example(prompt_ids, reply_ids, seq2seq=True)
        return Example(prompt_ids + reply_ids, [IGNORE] * len(prompt_ids) + reply_ids)

    def encode_all(self, rows: Sequence[dict[str, Any]]) -> list[Example]:
        return [self.encode(r) for r in rows]


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate(examples: Sequence[Example], arch: str, pad_id: int) -> Batch:
    """Right-pad to the longest example of the batch; build the reply-position index."""
    input_ids = _pad([e.input_ids for e in examples], pad_id)
    labels = _pad([e.labels for e in examples], IGNORE)
    if arch == "seq2seq":
        mask = _pad([[1] * len(e.input_ids) for e in examples], 0)
        real = sum(len(e.input_ids) + len(e.labels) for e in examples)
        return Batch(input_ids, labels, mask, None, labels[labels != IGNORE], real)
    # Position t predicts token t + 1; with right padding and a causal mask no real token ever
    # attends to padding, so causal LMs need no attention mask (and SDPA takes its causal fast path).
    next_labels = labels[:, 1:]
    rows, cols = (next_labels != IGNORE).nonzero(as_tuple=True)
    target_index = rows * labels.shape[1] + cols
    real = sum(len(e.input_ids) for e in examples)
    return Batch(input_ids, labels, None, target_index, next_labels[rows, cols], real)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of similar-length examples (transformers' grouping), in a seeded random order."""
    gen = torch.Generator().manual_seed(seed)
    order = get_length_grouped_indices(list(lengths), batch_size, generator=gen)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


# =========================================================================== loss


def _plain_lm_head(base: Any) -> bool:
    """Whether logits are just ``lm_head(hidden)`` (no soft-capping or scaling we would skip)."""
    cfg = base.config
    return all(getattr(cfg, k, None) in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale"))


class LossFn:
    """Summed cross-entropy over reply tokens of a batch.

    Causal LMs: the transformer body gives hidden states; only the hidden states at reply
    positions go through ``lm_head`` (the full-vocabulary projection dominates a small model's
    cost otherwise). Encoder-decoder models: every decoder position is a reply token already.
    """

    def __init__(self, model: Any, arch: str) -> None:
        self.model, self.arch = model, arch
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.body = getattr(base, base.base_model_prefix, None)
        self.head = base.get_output_embeddings()
        self.fast = arch == "causal" and self.body is not None and self.head is not None and _plain_lm_head(base)

    def __call__(self, batch: Batch) -> torch.Tensor:
        if self.arch == "seq2seq":
            return self._seq2seq(batch)
        if self.fast:
            hidden = self.body(input_ids=batch.input_ids, use_cache=False).last_hidden_state
            logits = self.head(hidden.flatten(0, 1).index_select(0, batch.target_index))
        else:  # e.g. soft-capped logits: let the model compute them, then keep the reply positions
            logits = self.model(input_ids=batch.input_ids, use_cache=False).logits
            logits = logits.flatten(0, 1).index_select(0, batch.target_index)
        return F.cross_entropy(logits.float(), batch.targets, reduction="sum")

    def _seq2seq(self, batch: Batch) -> torch.Tensor:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        decoder_input_ids = base._shift_right(batch.labels)  # pads -100 and prepends the start token
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         decoder_input_ids=decoder_input_ids, use_cache=False)
        return F.cross_entropy(out.logits.flatten(0, 1).float(), batch.labels.flatten(),
                               ignore_index=IGNORE, reduction="sum")


# =========================================================================== precision and setup


def cpu_supports_bf16() -> bool:
    """Native bf16 instructions (AVX512-BF16 or AMX) on this CPU."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_precision(requested: str, device: torch.device) -> str:
    """spec.precision -> "fp32" | "bf16" | "fp16" for this device."""
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if CPU_AUTO_BF16 and cpu_supports_bf16() else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise JobError("precision fp16 needs a GPU; use bf16 or fp32 (or auto) on CPU")
    return requested


def autocast_for(precision: str, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of autocast contexts (weights stay fp32; matmuls run in bf16/fp16)."""
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
            "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def context_limit(config: Any) -> int | None:
    """Positions the model can attend over (None for relative-position models like T5)."""
    if getattr(config, "is_encoder_decoder", False):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def validate_inputs(spec: TrainSpec, train_rows: Sequence[dict], config: Any) -> None:
    """Fail early, with a message a person can act on."""
    if not train_rows:
        raise JobError("the dataset has no training rows: import a dataset with a non-empty train split")
    limit = context_limit(config)
    total = spec.max_input_length + spec.max_target_length
    if limit is not None and total > limit:
        raise JobError(
            f"max_input_length + max_target_length = {total} exceeds the model's context of {limit} "
            "tokens: lower them"
        )


# =========================================================================== LoRA


def default_lora_targets(model: Any) -> list[str] | None:
    """The attention projections: q/k/v/o_proj (Llama-like) or q/v (T5); None: peft's default."""
    names = module_names(model)
    llama = ["q_proj", "k_proj", "v_proj", "o_proj"]
    if set(llama) <= names:
        return llama
    if {"q", "v"} <= names:
        return ["q", "v"]
    return None


def module_names(model: Any) -> set[str]:
    """Short names (last path component) of the model's Linear-like modules."""
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def apply_lora(model: Any, spec: TrainSpec, arch: str) -> Any:
    """Wrap ``model`` with LoRA adapters (peft); unknown target modules are a JobError."""
    from peft import LoraConfig, TaskType, get_peft_model

    available = module_names(model)
    targets = spec.lora_target_modules or default_lora_targets(model)
    unknown = [t for t in targets or [] if t not in available]
    if unknown:
        raise JobError(
            f"LoRA target module(s) {', '.join(unknown)} not found in the model; "
            f"available module names: {', '.join(sorted(available))}"
        )
    config = LoraConfig(
        r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, target_modules=targets,
        task_type=TaskType.SEQ_2_SEQ_LM if arch == "seq2seq" else TaskType.CAUSAL_LM,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise JobError(f"could not add LoRA adapters: {exc}") from exc


# =========================================================================== checkpoints and saving


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final`` (replacing it) so ``final`` is never half-written."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)



def _disk_full(exc: OSError, where: Path) -> JobError | None:
    if exc.errno == errno.ENOSPC:
        return JobError(f"disk full while saving the model to {where}: free space and retry")
    return None


def save_model_atomic(model: Any, tokenizer: Any, final: Path) -> Path:
    """``save_pretrained`` model + tokenizer into ``final`` via a temporary folder and a rename.

    A LoRA model is merged first, so every model in the store loads the same way.
    """
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.config.use_cache = True
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise (_disk_full(exc, final) or exc) from exc
    return final


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The parameters being trained (all of them, or only LoRA's): what a checkpoint must keep."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: Any, folder: Path) -> None:
    result = model.load_state_dict(load_file(str(folder / "weights.safetensors")), strict=False)
    if result.unexpected_keys:
        raise JobError(f"checkpoint {folder} does not match the model (unexpected {result.unexpected_keys[:3]})")


def checkpoint_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints under ``root`` (temporary folders are ignored)."""
    if not root.is_dir():
        return []
    found = (re.fullmatch(r"step-(\d+)", p.name) for p in root.iterdir() if (p / "state.pt").is_file())
    return sorted(int(m.group(1)) for m in found if m)


# =========================================================================== the run


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
                 yield_cpu: CpuYielder | None = None) -> None:
        self.spec, self.ctx, self.arch = spec, ctx, loaded.arch
        self.out_dir, self.ckpt_root = out_dir, out_dir / "checkpoints"
        self.tokenizer = loaded.tokenizer
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
        encoder = ExampleEncoder(self.tokenizer, self.arch, spec.max_input_length, spec.max_target_length)
        self.pad_id = self.tokenizer.pad_token_id
        # Drawn, never sliced: a split stored in intent order would otherwise lose whole intents.
        self.train_rows = stratified_sample(train_rows, spec.max_train_samples, spec.seed)
        self.val_rows = stratified_sample(val_rows, spec.max_eval_samples, spec.seed)
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
        self._optimizer_step()
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
            _replace_dir(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise (_disk_full(exc, final) or exc) from exc
        self._prune_checkpoints()
        return final

    def _state_dict(self) -> dict[str, Any]:
        return {"trainer": vars(self.state).copy(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": _rng_state(),
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
        _set_rng_state(saved["rng"])
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
            "precision": self.precision, "resumed_from_step": self.resumed_from_step,
            "best_step": st.best_step, "early_stopped": self.stopped_early, "cancelled": cancelled,
            "train_rows": len(self.train_rows), "train_intents": len(composition(self.train_rows)),
            "yielded_to_chat_seconds": round(self.yield_cpu.waited, 1) if self.yield_cpu else 0.0,
            "history": st.history,
        }


# =========================================================================== entry point


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
) -> dict[str, Any]:
    """Fine-tune ``model_source`` (a resolved folder or HF id) on ``train_rows``; see the module docs.

    Resumes from ``out_dir/checkpoints`` when a previous attempt left checkpoints there. Writes
    the final model to ``out_dir/model``. ``num_threads`` sets torch's intra-op threads for the
    duration of the run only. ``yield_cpu`` (``workers.cpu_share``) pauses the run while chats are
    answered on this machine.
    """
    if not train_rows:
        raise JobError("the dataset has no training rows: import a dataset with a non-empty train split")
    out_dir = Path(out_dir)
    previous_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        run = TrainingRun(spec, _load_base(model_source, spec, train_rows), train_rows, val_rows, out_dir, ctx,
                          yield_cpu)
        drawn, split = composition(run.train_rows), composition(train_rows)
        ctx.event("log", f"training {run.total_steps} steps ({run.steps_per_epoch}/epoch), precision "
                         f"{run.precision}, {len(run.train)} examples drawn from {len(train_rows)}, covering "
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
