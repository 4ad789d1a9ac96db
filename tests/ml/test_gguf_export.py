"""GGUF export (``ml.export``) of the tiny Llama, read back by llama.cpp (llama-cpp-python).

The tests that run the exported file need ``llama_cpp`` and skip without it; the others check the
file with ``gguf``'s reader alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from csra.specs import DEFAULT_INSTRUCTION
from ml.export import QUANTIZATIONS, GgufExport, UnsupportedArchitecture, export_gguf, gguf_metadata
from ml.export.errors import ExportError
from ml.export.vocab import TRANSCRIPT_TEMPLATE
from ml.inference.batches import generate_batch
from ml.inference.tokens import encode_prompt, stop_tokens
from ml.inference.types import GenerationRequest
from ml.prompting import build_messages, example_prompt, render_prompt, system_message
from models_store.loading import LoadedModel, load_model_and_tokenizer
from tests.fixtures_models import tiny_causal, tiny_seq2seq  # noqa: F401

MESSAGES = ("I want to cancel my order {{Order Number}}", "How can I get a refund for my last purchase")
NO_LLAMA_CPP = "llama-cpp-python is not installed (pip install llama-cpp-python): cannot run the exported GGUF"


@pytest.fixture(scope="module")
def llama_cpp() -> Any:
    return pytest.importorskip("llama_cpp", reason=NO_LLAMA_CPP)


@pytest.fixture(scope="module")
def tiny(tiny_causal: Path) -> LoadedModel:  # noqa: F811
    return load_model_and_tokenizer(tiny_causal)


@pytest.fixture(scope="module")
def exports(tiny_causal: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, GgufExport]:  # noqa: F811
    out = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(tiny_causal, out / f"tiny-{q}.gguf", q) for q in ("f16", "bf16", "q8_0")}


def _open(llama_cpp: Any, path: Path) -> Any:
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)


def _last_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[len(ids) - 1])


def _hf_last_logits(model: Any, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].float().numpy()


def _greedy(llm: Any, ids: list[int], n: int, stop: frozenset[int]) -> list[int]:
    out: list[int] = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if token in stop or len(out) >= n:
            break
    return out


# --------------------------------------------------------------------------- the file


@pytest.mark.parametrize("quantization", ["f16", "bf16", "q8_0"])
def test_metadata_has_the_chat_template_csra_renders_with(exports: dict[str, GgufExport], tiny: LoadedModel,
                                                         quantization: str) -> None:
    result = exports[quantization]
    assert result.path.is_file() and result.size_bytes == result.path.stat().st_size
    assert (result.architecture, result.gguf_architecture, result.quantization) == (
        "LlamaForCausalLM", "llama", quantization)
    assert len(result.sha256) == 64
    meta = gguf_metadata(result.path)
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.chat_template"] == tiny.tokenizer.chat_template
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.add_bos_token"] is False  # csra never prepends BOS to a chat prompt
    assert meta["tokenizer.ggml.eos_token_id"] == tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = tiny.model.config
    assert meta["llama.block_count"] == config.num_hidden_layers
    assert meta["llama.attention.head_count_kv"] == config.num_key_value_heads
    assert meta["llama.context_length"] == config.max_position_embeddings
    weights = {"q8_0": "Q8_0", "bf16": "BF16"}.get(quantization, "F16")
    assert set(result.tensor_types) == {weights, "F32"}  # norms stay F32; tied embeddings: no output.weight


def test_unsupported_architecture_names_it_and_the_supported_ones(tiny_seq2seq: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(UnsupportedArchitecture, match=r"'T5ForConditionalGeneration'.*supported: LlamaForCausalLM"):
        export_gguf(tiny_seq2seq, tmp_path / "t5.gguf", "f16")
    assert issubclass(UnsupportedArchitecture, ValueError)
    assert list(tmp_path.iterdir()) == []


def test_unknown_quantization_is_a_value_error(tiny_causal: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(ValueError, match=r"unknown GGUF quantization 'q3'.*f16, bf16, q8_0, q4_k_m"):
        export_gguf(tiny_causal, tmp_path / "x.gguf", "q3")  # type: ignore[arg-type]
    assert QUANTIZATIONS == ("f16", "bf16", "q8_0", "q4_k_m", "q4_0")


def test_a_failed_export_leaves_the_old_file_and_no_temporary_one(tiny_causal: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous export")
    stages: list[tuple[float, str]] = []

    def progress(fraction: float, stage: str) -> None:
        stages.append((fraction, stage))
        if stage == "converting tensors" and len(stages) > 5:
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        export_gguf(tiny_causal, out, "f16", progress=progress)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    done: list[tuple[float, str]] = []
    export_gguf(tiny_causal, out, "f16", progress=lambda f, s: done.append((f, s)))
    assert done[-1] == (1.0, "done") and [f for f, _ in done] == sorted(f for f, _ in done)


def test_the_transcript_template_renders_like_csra_without_a_chat_template(tiny: LoadedModel) -> None:
    from jinja2 import Environment

    tokenizer = tiny.tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        messages = build_messages(system_message(DEFAULT_INSTRUCTION, "friendly"), MESSAGES[0],
                                  [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}])
        expected = render_prompt(tokenizer, messages)
    finally:
        tokenizer.chat_template = saved
    rendered = Environment().from_string(TRANSCRIPT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert rendered == expected


# --------------------------------------------------------------------------- run by llama.cpp


@pytest.mark.parametrize("quantization", ["f16", "bf16", "q8_0"])
def test_llama_cpp_runs_the_export_like_csra(llama_cpp: Any, exports: dict[str, GgufExport], tiny: LoadedModel,
                                             quantization: str) -> None:
    llm = _open(llama_cpp, exports[quantization].path)
    assert llm.metadata["tokenizer.chat_template"] == tiny.tokenizer.chat_template
    assert llm.metadata["general.architecture"] == "llama"
    stop = stop_tokens(tiny).every
    tolerance = 2e-3 if quantization == "f16" else 3e-2
    for message in MESSAGES:
        prompt = example_prompt(tiny.tokenizer, DEFAULT_INSTRUCTION, message)
        ids = encode_prompt(tiny, prompt)
        # llama.cpp tokenizes csra's rendered prompt into csra's token ids (vocab, merges, pre-tokenizer, specials)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        expected = _hf_last_logits(tiny.model, ids)
        got = _last_logits(llm, ids)
        assert np.abs(got - expected).max() <= tolerance * max(np.abs(expected).max(), 1.0)
        reference = generate_batch(tiny, [GenerationRequest(prompt, max_new_tokens=6)])[0].token_ids
        tokens = _greedy(llm, ids, 6, stop)
        if quantization == "f16":
            assert tokens == reference
        assert len(tokens) >= 1


@pytest.mark.parametrize(("quantization", "file_type", "tensor_type"), [("q4_k_m", 15, None), ("q4_0", 2, "Q4_0")])
def test_4_bit_files_are_quantized_by_llama_cpp(llama_cpp: Any, tiny_causal: Path, tiny: LoadedModel,  # noqa: F811
                                                tmp_path: Path, quantization: str, file_type: int,
                                                tensor_type: str | None) -> None:
    result = export_gguf(tiny_causal, tmp_path / f"tiny-{quantization}.gguf", quantization)  # type: ignore[arg-type]
    assert [p.name for p in tmp_path.iterdir()] == [f"tiny-{quantization}.gguf"]  # the f16 intermediate is gone
    meta = gguf_metadata(result.path)
    assert meta["general.file_type"] == file_type  # LLAMA_FTYPE_MOSTLY_Q4_K_M, LLAMA_FTYPE_MOSTLY_Q4_0
    if tensor_type is not None:
        assert tensor_type in result.tensor_types
    assert meta["tokenizer.chat_template"] == tiny.tokenizer.chat_template
    llm = _open(llama_cpp, result.path)
    ids = encode_prompt(tiny, example_prompt(tiny.tokenizer, DEFAULT_INSTRUCTION, MESSAGES[0]))
    assert len(_greedy(llm, ids, 4, stop_tokens(tiny).every)) >= 1


def test_a_lora_adapter_is_merged_before_export(llama_cpp: Any, tiny_causal: Path, tiny: LoadedModel,  # noqa: F811
                                                tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = load_model_and_tokenizer(tiny_causal).model
    with torch.random.fork_rng():
        torch.manual_seed(1)  # init_lora_weights=False: B is random, so the adapter changes the model
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)  # adapter_config.json names the tiny model's folder as its base
    merged = peft_model.merge_and_unload()
    result = export_gguf(adapter, tmp_path / "lora.gguf", "f16")
    assert result.lora_merged and gguf_metadata(result.path)["tokenizer.chat_template"] == tiny.tokenizer.chat_template
    ids = encode_prompt(tiny, example_prompt(tiny.tokenizer, DEFAULT_INSTRUCTION, MESSAGES[1]))
    got = _last_logits(_open(llama_cpp, result.path), ids)
    expected, unmerged = _hf_last_logits(merged, ids), _hf_last_logits(tiny.model, ids)
    assert np.abs(got - expected).max() <= 2e-3 * max(np.abs(expected).max(), 1.0)
    assert np.abs(got - unmerged).max() > 10 * np.abs(got - expected).max()


def test_an_adapter_whose_base_is_not_a_folder_says_so(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "some-org/some-model"}')
    with pytest.raises(ExportError, match=r"'some-org/some-model', which is not a local folder: pass base_model"):
        export_gguf(adapter, tmp_path / "x.gguf", "f16")


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_round_trips_to_the_shipped_gguf(tmp_path_factory: pytest.TempPathFactory,
                                                 smollm2_folder: Path) -> None:
    """The baseline (converted by transformers from the SmolLM2 GGUF csra ships) exports back to the
    same vocabulary and, within F16 rounding, the same weights: the q/k permutation is right."""
    import gguf

    from models_store.loading import smollm2_gguf_path

    result = export_gguf(smollm2_folder, tmp_path_factory.mktemp("gguf") / "smollm2-f16.gguf", "f16")
    shipped, ours = gguf.GGUFReader(smollm2_gguf_path()), gguf.GGUFReader(result.path)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "llama.rope.freq_base"):
        assert ours.fields[key].contents() == shipped.fields[key].contents(), key
    theirs = {t.name: t for t in shipped.tensors}
    assert {t.name for t in ours.tensors} == set(theirs)
    for t in ours.tensors:
        a = gguf.quants.dequantize(theirs[t.name].data, theirs[t.name].tensor_type).reshape(-1)
        b = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1).astype(np.float32)
        assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max(), t.name


def test_the_api_and_the_converter_agree_on_what_exports() -> None:
    """The API refuses (422) what ml.export cannot convert, from csra.specs: the two lists are one."""
    from csra.specs import GGUF_ARCHITECTURES
    from ml.export import QUANTIZATIONS, SUPPORTED_ARCHITECTURES

    assert set(GGUF_ARCHITECTURES) == set(SUPPORTED_ARCHITECTURES)
    assert QUANTIZATIONS == ("f16", "bf16", "q8_0", "q4_k_m", "q4_0")
