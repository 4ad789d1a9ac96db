"""The tokenizer in GGUF: a byte-level BPE vocabulary (``gpt2`` model) with the chat template csra uses.

Everything comes from the tokenizer object csra prompts the model with (``models_store.loading``),
saved once to a scratch folder so that ``gguf.SpecialVocab`` reads merges and special-token ids
from exactly that tokenizer. Token types and the ``tokenizer.ggml.pre`` name follow llama.cpp's
``convert_hf_to_gguf.py`` (``get_vocab_base``); the pre-tokenizer name is chosen from the
tokenizer's own pre-tokenizer (not from the hash table of known models), because a tokenizer that
csra loads from a GGUF (the SmolLM2 baseline) or trains may differ from the original model's.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import gguf

from ml.export.errors import ExportError
from ml.prompting import end_token_ids, has_chat_template

# A Jinja chat template that renders like ``ml.prompting.render_prompt`` does for a model without
# one (a transcript ending in "Agent:"), so llama.cpp-based runtimes prompt such models as csra does.
TRANSCRIPT_TEMPLATE = (
    "{%- set names = {'system': 'Instruction', 'user': 'Customer', 'assistant': 'Agent'} -%}"
    "{%- for message in messages -%}{{ names[message['role']] }}: {{ message['content'] }}\n{% endfor -%}"
    "{%- if add_generation_prompt -%}Agent:{%- endif -%}"
)

def _is_byte_level(pre: dict[str, Any]) -> bool:
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the tokenizer's pre-tokenizer; ExportError if none fits.

    ``gpt-2``: byte-level with GPT-2's split regex. ``smollm``: individual digits first, then the
    same (SmolLM/SmolLM2's original tokenizer; llama.cpp's starcoder/smollm regexes).
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if tokenizer_json.get("normalizer") is None:
        if len(steps) == 1 and _is_byte_level(steps[0]):
            return "gpt-2"
        if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
                and _is_byte_level(steps[1]):
            return "smollm"
    raise ExportError(
        "GGUF export supports byte-level BPE tokenizers with GPT-2's pre-tokenizer (optionally splitting "
        f"digits, as SmolLM2's does); this tokenizer's normalizer is {tokenizer_json.get('normalizer')} and its "
        f"pre-tokenizer {json.dumps(pre)[:300]}"
    )


def _check_bpe(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers) tokenizer; this model's is a slow one")
    data: dict[str, Any] = json.loads(backend.to_str())
    model_type = data.get("model", {}).get("type")
    if model_type != "BPE":
        raise ExportError(f"GGUF export supports BPE tokenizers; this model's tokenizer is {model_type}")
    return data


def _looks_special(token: str) -> bool:
    """llama.cpp's ``does_token_look_special`` for the tokens csra's models use."""
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def token_list(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id (padded to ``vocab_size`` with unused ``[PADn]``) and their GGUF token types."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise ExportError(f"the tokenizer has token ids up to {max(vocab.values())}, beyond the model's "
                          f"vocab_size {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            if not added[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = added[i].special or _looks_special(token)
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def adds_special_tokens(tokenizer: Any) -> tuple[bool, bool]:
    """(adds BOS, adds EOS): what the tokenizer does to a text when asked for its special tokens."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    return add_bos, add_eos


def chat_template(tokenizer: Any) -> str:
    """The template csra renders prompts with: the tokenizer's, else the transcript csra falls back to."""
    if has_chat_template(tokenizer):
        return str(tokenizer.chat_template)
    return TRANSCRIPT_TEMPLATE


def add_vocab(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """Write the tokenizer: model, pre-tokenizer, tokens, types, merges, special ids, flags, chat template."""
    data = _check_bpe(tokenizer)
    tokens, types = token_list(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="csra-gguf-tokenizer-") as scratch:
        tokenizer.save_pretrained(scratch)
        special = gguf.SpecialVocab(Path(scratch), load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ExportError("the tokenizer has no BPE merges to export")
    special.chat_template = None  # written below: the template csra renders with, whatever the files say
    special.add_special_token = {}  # measured below on the tokenizer itself
    special.add_to_gguf(writer, quiet=True)
    add_bos, add_eos = adds_special_tokens(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    end = end_token_ids(tokenizer, "causal")
    if len(end) == 1 and end[0] != tokenizer.eos_token_id:
        writer.add_eot_token_id(end[0])
    writer.add_chat_template(chat_template(tokenizer))
