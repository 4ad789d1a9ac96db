"""Model-store names and folders.

Torch-free on purpose: the API imports this module to validate names before it enqueues a job.
"""

from __future__ import annotations

import logging
from pathlib import Path

from csra.specs import EXPORTS_DIR, MODEL_NAME_RE

logger = logging.getLogger(__name__)

__all__ = ["gguf_exports", "model_dir", "preferred_gguf", "validate_model_name"]


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is a valid model-store name, else raise ``ValueError``.

    A name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit; it can
    never be a path (no '/', no '..', not absolute).
    """
    if not isinstance(name, str) or not name:
        raise ValueError("model name must be a non-empty string")
    if "/" in name or "\\" in name or ".." in name or Path(name).is_absolute():
        raise ValueError(f"invalid model name {name!r}: a model name cannot be a path ('/', '\\' or '..')")
    if not MODEL_NAME_RE.match(name):
        raise ValueError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def model_dir(store_dir: Path, name: str) -> Path:
    """The folder of model ``name`` in the store (validated; always inside ``store_dir``)."""
    validate_model_name(name)
    store = Path(store_dir).resolve()
    path = (store / name).resolve()
    if path.parent != store:
        raise ValueError(f"model name {name!r} resolves outside the model store {store}")
    return path


def gguf_exports(model_folder: Path) -> list[Path]:
    """A model's GGUF exports (``POST /models/{ref}/export``), newest first."""
    folder = model_folder / EXPORTS_DIR
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix == ".gguf"),
                  key=lambda p: p.stat().st_mtime, reverse=True)


def preferred_gguf(model_folder: Path, preference: list[str]) -> Path | None:
    """The export llama.cpp serves: the first quantization in ``preference`` that was exported."""
    by_quant = {p.stem.rsplit("-", 1)[-1]: p for p in gguf_exports(model_folder)}
    return next((by_quant[q] for q in preference if q in by_quant), None)
