"""Model-store names and folders.

Torch-free on purpose: the API imports this module to validate names before it enqueues a job.
"""

from __future__ import annotations

import logging
from pathlib import Path

from csra.specs import MODEL_NAME_RE

logger = logging.getLogger(__name__)

__all__ = ["model_dir", "validate_model_name"]


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
