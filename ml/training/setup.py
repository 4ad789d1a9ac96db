"""Before the first step: precision, seeds and random state, input checks, LoRA adapters."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch

from csra.jobctx import JobError
from csra.specs import TrainSpec
from ml import device as devices

# Measured with bench/train.py (SmolLM2-135M, 64 Bitext rows, 8 steps of 8) on the project's 2-core
# AVX512-BF16 machine: bf16 autocast 254 real tokens/s vs fp32 148, validation loss 1.7470 vs 1.7446;
# so "auto" uses bf16 on CPUs with native bf16 instructions.
CPU_AUTO_BF16 = True



def resolve_precision(requested: str, device: torch.device) -> str:
    """spec.precision -> "fp32" | "bf16" | "fp16" for this device."""
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if devices.cuda_bf16_supported() else "fp32"
        return "bf16" if CPU_AUTO_BF16 and devices.cpu_supports_bf16() else "fp32"
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


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"python": random.getstate(), "numpy": (kind, [int(k) for k in keys], pos, has_gauss, cached),
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
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
