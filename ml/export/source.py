"""What is exported: a model folder, or a LoRA adapter folder merged into its base, loaded as csra loads it.

csra's own LoRA runs are merged before they are saved (``ml.training.checkpoints.save_model_atomic``),
so every model in the store is a plain folder. A folder holding a peft adapter
(``adapter_config.json``, e.g. one saved outside csra) is merged here with ``merge_and_unload``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.export.errors import ExportError
from models_store.loading import load_model_and_tokenizer

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class ExportSource:
    """The model to convert (float32, merged), the tokenizer csra prompts it with, and its config."""

    model: Any
    tokenizer: Any
    config: dict[str, Any]
    name: str
    lora: bool


def is_lora_adapter(folder: Path) -> bool:
    """Whether ``folder`` holds a peft adapter rather than a whole model."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def base_model_of(adapter_dir: Path, base_model: Path | None = None) -> Path:
    """The base model folder of a LoRA adapter: ``base_model`` if given, else the adapter config's."""
    if base_model is not None:
        return Path(base_model)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    ref = config.get("base_model_name_or_path")
    if not ref:
        raise ExportError(f"the LoRA adapter in {adapter_dir} does not name its base model: pass base_model")
    path = Path(ref).expanduser()
    if not path.is_absolute() and (adapter_dir / path).is_dir():
        path = adapter_dir / path
    if not path.is_dir():
        raise ExportError(
            f"the LoRA adapter in {adapter_dir} names its base model {ref!r}, which is not a local "
            "folder: pass base_model (the base model's folder)"
        )
    return path


def read_config(model_dir: Path, base_model: Path | None = None) -> dict[str, Any]:
    """``config.json`` of the model (of the base model for an adapter), read without loading weights."""
    model_dir = Path(model_dir)
    folder = base_model_of(model_dir, base_model) if is_lora_adapter(model_dir) else model_dir
    path = folder / "config.json"
    if not path.is_file():
        raise ExportError(f"model folder {folder} has no config.json")
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except ValueError as exc:
        raise ExportError(f"model folder {folder} has an unreadable config.json: {exc}") from exc
    return config


def _merged_adapter(adapter_dir: Path, base: Path) -> tuple[Any, Any]:
    """The base model with the adapter merged in, and the adapter's tokenizer (else the base's)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    loaded = load_model_and_tokenizer(base)
    try:
        model = PeftModel.from_pretrained(loaded.model, str(adapter_dir)).merge_and_unload()
    except Exception as exc:  # peft raises ValueError, KeyError, RuntimeError for a mismatched adapter
        raise ExportError(f"could not merge the LoRA adapter in {adapter_dir} into {base}: {exc}") from exc
    tokenizer = loaded.tokenizer
    if any((adapter_dir / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model, tokenizer


def load_source(model_dir: Path, base_model: Path | None = None) -> ExportSource:
    """Load the model to export, in float32, through the store's loader (same code path as serving)."""
    model_dir = Path(model_dir)
    lora = is_lora_adapter(model_dir)
    if lora:
        model, tokenizer = _merged_adapter(model_dir, base_model_of(model_dir, base_model))
    else:
        loaded = load_model_and_tokenizer(model_dir)
        model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    return ExportSource(model=model, tokenizer=tokenizer, config=model.config.to_dict(),
                        name=model_dir.name, lora=lora)
