"""Saving without half-written folders: atomic model folders and resumable checkpoints."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from csra.jobctx import JobError


def replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final`` (replacing it) so ``final`` is never half-written."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)



def disk_full(exc: OSError, where: Path) -> JobError | None:
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
        replace_dir(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise (disk_full(exc, final) or exc) from exc
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
