"""Where training and torch generation run: CUDA when a GPU is present (``CSRA_DEVICE=auto``), else CPU.

``CSRA_DEVICE`` overrides it (``cpu``, ``cuda``, ``cuda:N``). Nothing depends on a GPU: without one
``auto`` is the CPU, as before. On CUDA, inference runs in bf16 where the GPU supports it (training
keeps fp32 weights and autocasts, ``ml.training.setup.resolve_precision``); on CPU inference stays
fp32 (the batch-invariant kernels in ``ml.inference.invariance`` are float32 ones).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from csra.jobctx import JobError

if TYPE_CHECKING:
    from models_store.loading import LoadedModel

SETTING = "CSRA_DEVICE"


def cuda_available() -> bool:
    """Whether torch sees a usable GPU (the one place that asks; tests fake it here)."""
    return bool(torch.cuda.is_available())


def cuda_bf16_supported() -> bool:
    return bool(torch.cuda.is_bf16_supported())


def cpu_supports_bf16() -> bool:
    """Native bf16 instructions (AVX512-BF16 or AMX) on this CPU."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def configured() -> str:
    from csra.settings import get_settings

    return get_settings().device


def pick_device(setting: str | None = None) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``; ``cpu`` / ``cuda[:N]`` as asked.

    Asking for CUDA on a machine without one is a ``JobError`` naming the setting (not a silent CPU run).
    """
    setting = setting or configured()
    if setting == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not cuda_available():
        raise JobError(f"{SETTING}={setting} but torch sees no GPU on this worker; set {SETTING}=auto or cpu")
    return device


def bf16_supported(device: torch.device) -> bool:
    return cuda_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()


def inference_dtype(device: torch.device) -> torch.dtype:
    """The weights' dtype for generation and evaluation: bf16 on a GPU that supports it, else float32."""
    return torch.bfloat16 if device.type == "cuda" and cuda_bf16_supported() else torch.float32


def describe(setting: str | None = None) -> dict[str, Any]:
    """This worker's device for ``GET /health``: what is used, why, and its precision."""
    setting = setting or configured()
    try:
        device = pick_device(setting)
    except JobError as e:
        return {"setting": setting, "device": None, "error": str(e)}
    info: dict[str, Any] = {"setting": setting, "device": str(device), "bf16": bf16_supported(device),
                            "inference_dtype": str(inference_dtype(device)).removeprefix("torch.")}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    return info


def place_for_inference(loaded: LoadedModel, setting: str | None = None) -> torch.device:
    """Move a loaded model to the inference device in its dtype there (bf16 on a GPU that has it).

    A no-op on the CPU, so the CPU path (float32 and its batch-invariant kernels) stays as it was.
    """
    device = pick_device(setting)
    model: Any = loaded.model  # transformers types .to() loosely
    if device.type != "cpu" and model.device != device:
        model.to(device=device, dtype=inference_dtype(device))
    return device
