"""Llama in GGUF (SmolLM2 is a Llama): hyper-parameters and tensors as llama.cpp reads them.

Follows llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel`` and ``TextModel.set_gguf_parameters``):
tensor names through ``gguf.get_tensor_name_map``; q/k projections permuted back from the
Hugging Face rotary layout (halves) to llama.cpp's (interleaved pairs); no ``output.weight`` when
the embeddings are tied (llama.cpp then reuses ``token_embd``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gguf
import numpy as np
import torch

from ml.export.errors import ExportError

ARCH = gguf.MODEL_ARCH.LLAMA
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]


def _heads(config: dict[str, Any]) -> tuple[int, int, int]:
    """(attention heads, key/value heads, head dimension)."""
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
    return n_head, n_kv, head_dim


def rope_settings(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE base and scaling (transformers 5 ``rope_parameters``, or the older ``rope_theta``/``rope_scaling``)."""
    rope = dict(config.get("rope_parameters") or {})
    if not rope:
        rope = {"rope_theta": config.get("rope_theta", 10000.0), **(config.get("rope_scaling") or {})}
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def check_config(config: dict[str, Any]) -> None:
    """ExportError for Llama variants this converter does not write (other RoPE scalings, activations)."""
    rope = rope_settings(config)
    if rope["rope_type"] not in ("default", "linear"):
        raise ExportError(f"GGUF export supports RoPE types 'default' and 'linear', not {rope['rope_type']!r}")
    if config.get("hidden_act", "silu") != "silu":
        raise ExportError(f"GGUF export of Llama models needs hidden_act 'silu', not {config['hidden_act']!r}")


def add_hparams(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    """The ``llama.*`` keys: sizes, heads, context length, RoPE, RMS norm epsilon."""
    check_config(config)
    n_head, n_kv, head_dim = _heads(config)
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    rope = rope_settings(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """Hugging Face's rotary layout -> llama.cpp's (``LlamaModel.permute`` in convert_hf_to_gguf.py)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def tensors(model: Any, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF tensor name, float32 array) for every weight llama.cpp needs, in the model's order."""
    n_head, n_kv, _ = _heads(config)
    names = gguf.get_tensor_name_map(ARCH, int(config["num_hidden_layers"]))
    tied = bool(config.get("tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ExportError(f"the tensor {name!r} has no name in llama.cpp's Llama architecture")
        data = tensor.detach().to(torch.float32)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute(data, n_head, n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute(data, n_head, n_kv)
        yield new_name, data.contiguous().numpy()
