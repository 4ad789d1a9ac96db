"""Device choice: CUDA when a GPU is present (faked at ``ml.device.cuda_available``), the CPU path for real."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from csra.jobctx import JobError
from csra.settings import Settings
from ml import device
from ml.training.setup import resolve_precision
from tests.fixtures_models import tiny_causal  # noqa: F401


@pytest.fixture()
def gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    monkeypatch.setattr(device, "cuda_bf16_supported", lambda: True)


def test_auto_picks_cuda_when_a_gpu_is_present(gpu: None) -> None:
    assert device.pick_device("auto") == torch.device("cuda")
    assert device.pick_device("cuda:1") == torch.device("cuda:1")
    assert device.pick_device("cpu") == torch.device("cpu")  # the override wins
    assert device.inference_dtype(torch.device("cuda")) == torch.bfloat16
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"


def test_a_gpu_without_bf16_runs_fp32(gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cuda_bf16_supported", lambda: False)
    assert device.inference_dtype(torch.device("cuda")) == torch.float32
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"


def test_without_a_gpu_auto_is_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cuda_available", lambda: False)
    assert device.pick_device("auto") == torch.device("cpu")
    assert device.inference_dtype(torch.device("cpu")) == torch.float32
    with pytest.raises(JobError, match="CSRA_DEVICE=cuda but torch sees no GPU"):
        device.pick_device("cuda")
    info = device.describe("cuda")
    assert info["device"] is None and "CSRA_DEVICE" in info["error"]


def test_the_device_setting_is_checked_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().device == "auto"
    monkeypatch.setenv("CSRA_DEVICE", "gpu")
    with pytest.raises(ValidationError, match="device"):
        Settings()
    monkeypatch.setenv("CSRA_DEVICE", "cuda:0")
    assert Settings().device == "cuda:0"


def test_the_cpu_path_for_real(tiny_causal: Path) -> None:  # noqa: F811
    """On this machine (no GPU): describe says cpu, and a prepared model generates on the CPU in float32."""
    from ml.inference.batches import generate_many
    from ml.inference.types import GenerationRequest
    from models_store.loading import load_model_and_tokenizer

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: this checks the CPU path")
    info = device.describe()
    assert info["device"] == "cpu" and info["inference_dtype"] == "float32" and info["setting"] == "auto"
    loaded = load_model_and_tokenizer(tiny_causal)
    assert device.place_for_inference(loaded) == torch.device("cpu")
    results = generate_many(loaded, [GenerationRequest(prompt="I want to cancel my order", max_new_tokens=4)])
    assert results[0].completion_tokens > 0
    param = next(loaded.model.parameters())
    assert param.device.type == "cpu" and param.dtype == torch.float32
